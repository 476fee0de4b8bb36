//! Build script of the `runtime` binary: what `rt_build_info` says about the build.
//!
//! Sets two variables for `env!`:
//! - `RT_GIT_SHA`: `$RT_GIT_SHA` when set (a container build from a context without `.git`
//!   passes it as a build argument), else `git rev-parse HEAD` of the checkout, else `unknown`
//!   (a source tarball, no `git` installed);
//! - `RT_RUSTC`: the version of the compiler cargo uses (`rustc 1.95.0 (…)` → `1.95.0`), else
//!   `unknown`.
//!
//! It reruns only when those can change: `$RT_GIT_SHA`, and the checkout's `HEAD`, the branch
//! it names and `packed-refs` (found through `git rev-parse`, so a worktree works too). Paths
//! that do not exist are not listed (cargo would rerun the script on every build).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=RT_GIT_SHA");
    println!("cargo:rerun-if-changed=build.rs");
    let sha = std::env::var("RT_GIT_SHA")
        .ok()
        .filter(|sha| is_sha(sha))
        .or_else(git_sha)
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=RT_GIT_SHA={sha}");
    println!("cargo:rustc-env=RT_RUSTC={}", rustc_version());
}

/// A commit id as git writes it: 7 to 64 hex digits (so nothing odd reaches a label).
fn is_sha(text: &str) -> bool {
    (7..=64).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit())
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8(out.stdout).ok()?.trim().to_string())
}

fn git_sha() -> Option<String> {
    let sha = git(&["rev-parse", "HEAD"]).filter(|sha| is_sha(sha))?;
    let git_dir = PathBuf::from(git(&["rev-parse", "--git-dir"])?);
    let common =
        git(&["rev-parse", "--git-common-dir"]).map_or_else(|| git_dir.clone(), PathBuf::from);
    watch(&git_dir.join("HEAD"));
    watch(&common.join("packed-refs"));
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch(&common.join(&branch));
        watch(&git_dir.join(&branch));
    }
    Some(sha)
}

fn watch(path: &Path) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

fn rustc_version() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.split_whitespace().nth(1).map(str::to_string))
        .filter(|version| {
            !version.is_empty()
                && version
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-+".contains(&b))
        })
        .unwrap_or_else(|| "unknown".to_string())
}
