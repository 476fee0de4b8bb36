//! No top-level module of this crate imports one that imports it back (issue 17).
//!
//! Reads every `src/**/*.rs`, strips comments and string/char literals, and takes an edge
//! `a → b` for every `crate::b` path (and `super::…` that climbs to the crate root) written in
//! a file of module `a`. Test code counts: a test that needs a module above its own is a sign
//! the layering is wrong. The test fails naming each strongly connected group and one cycle
//! through it, with the files that make its edges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (from the crate root) of a source file: `broker/redis/keys.rs` → `[broker,
/// redis, keys]`; `lib.rs` → `[]`; `x/mod.rs` → `[x]`.
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && !(parts.is_empty() && stem == "lib") {
        parts.push(stem.to_owned());
    }
    parts
}

/// The source with comments and string/char literals replaced by spaces (newlines kept).
fn strip(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        let prev_ident = i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_');
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if !prev_ident
            && (c == 'r' || (c == 'b' && next == Some('r')))
            && matches!(
                b.get(i + if c == 'b' { 2 } else { 1 }),
                Some('"') | Some('#')
            )
        {
            // Raw string: r"…", r#"…"#, br"…".
            let mut j = i + if c == 'b' { 2 } else { 1 };
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                match b.get(j) {
                    None => break,
                    Some('"') if (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) => {
                        j += 1 + hashes;
                        break;
                    }
                    Some(&ch) => {
                        blank(&mut out, ch);
                        j += 1;
                    }
                }
            }
            i = j;
        } else if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    i += 1;
                }
                if let Some(&ch) = b.get(i) {
                    blank(&mut out, ch);
                }
                i += 1;
            }
            i += 1;
        } else if c == '\'' && (b.get(i + 2) == Some(&'\'') || next == Some('\\')) {
            // Char literal ('x', '\n', '\u{..}'); a lifetime has no closing quote nearby.
            i += 1;
            while i < b.len() && b[i] != '\'' {
                if b[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Top-level modules named by the paths in `code` of a file at module path `here`.
fn targets(code: &str, here: &[String]) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let b: Vec<char> = code.chars().collect();
    let ident_at = |mut i: usize| {
        let start = i;
        while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
            i += 1;
        }
        (b[start..i].iter().collect::<String>(), i)
    };
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let mut i = 0;
    while i < b.len() {
        let boundary =
            i == 0 || !(b[i - 1].is_alphanumeric() || b[i - 1] == '_' || b[i - 1] == '$');
        if !boundary || !(b[i].is_alphabetic() || b[i] == '_') {
            i += 1;
            continue;
        }
        let (word, end) = ident_at(i);
        // A path starting with `crate` or `super`: resolve to a module path from the root.
        let mut base: Vec<String> = match word.as_str() {
            "crate" => Vec::new(),
            "super" => here[..here.len().saturating_sub(1)].to_vec(),
            _ => {
                i = end;
                continue;
            }
        };
        let mut j = end;
        let mut climbing = word == "super";
        loop {
            let k = skip_ws(j);
            if !(b.get(k) == Some(&':') && b.get(k + 1) == Some(&':')) {
                break;
            }
            let k = skip_ws(k + 2);
            if b.get(k) == Some(&'{') {
                // `crate::{a, b::c}`: each first segment of the group.
                let mut depth = 0;
                let mut m = k;
                while m < b.len() {
                    match b[m] {
                        '{' => {
                            depth += 1;
                            if depth == 1 && base.is_empty() {
                                let s = skip_ws(m + 1);
                                let (w, _) = ident_at(s);
                                if !w.is_empty() {
                                    found.insert(w);
                                }
                            }
                        }
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        ',' if depth == 1 && base.is_empty() => {
                            let s = skip_ws(m + 1);
                            let (w, _) = ident_at(s);
                            if !w.is_empty() {
                                found.insert(w);
                            }
                        }
                        _ => {}
                    }
                    m += 1;
                }
                j = m;
                break;
            }
            let (seg, e) = ident_at(k);
            if seg.is_empty() {
                break;
            }
            j = e;
            if climbing && seg == "super" {
                base.pop();
                continue;
            }
            climbing = false;
            base.push(seg);
            break;
        }
        if let Some(top) = base.first() {
            found.insert(top.clone());
        }
        i = j.max(end);
    }
    found.retain(|t| t != "self" && t != "super" && t != "crate");
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `module → (imported module → files that import it)`.
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut g = Graph::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let here = module_path(rel);
        let Some(top) = here.first().cloned() else {
            continue; // lib.rs: the root re-exports whatever it likes.
        };
        let code = strip(&std::fs::read_to_string(&file).expect("read source"));
        let edges = g.entry(top.clone()).or_default();
        for t in targets(&code, &here) {
            if t != top {
                edges
                    .entry(t)
                    .or_default()
                    .insert(rel.display().to_string());
            }
        }
    }
    g
}

/// Strongly connected groups of more than one module (Tarjan).
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flat_map(|e| e.keys()) {
            let w = w.as_str();
            if !t.g.contains_key(w) {
                continue; // not a module of this crate (e.g. a macro's name)
            }
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut group = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                group.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if group.len() > 1 {
                group.sort();
                t.out.push(group);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

/// One cycle inside `group`, from its first module back to it (breadth-first, shortest).
fn one_cycle(g: &Graph, group: &[String]) -> Vec<String> {
    let start = &group[0];
    let inside: BTreeSet<&String> = group.iter().collect();
    let mut prev: BTreeMap<&String, &String> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in g[v].keys().filter(|w| inside.contains(w)) {
            if w == start {
                let mut path = vec![start.clone()];
                let mut at = v;
                while at != start {
                    path.push(at.clone());
                    at = prev[at];
                }
                path.push(start.clone());
                path.reverse();
                return path;
            }
            if !prev.contains_key(w) {
                prev.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    unreachable!("a strongly connected group has a cycle")
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&src);
    let found = cycles(&g);
    let mut report = String::new();
    for group in &found {
        let path = one_cycle(&g, group);
        report.push_str(&format!("CYCLE among {}: ", group.join(", ")));
        report.push_str(&path.join(" → "));
        report.push('\n');
        for pair in path.windows(2) {
            let files: Vec<&str> = g[&pair[0]][&pair[1]].iter().map(String::as_str).collect();
            report.push_str(&format!(
                "  {} → {} in {}\n",
                pair[0],
                pair[1],
                files.join(", ")
            ));
        }
    }
    assert!(found.is_empty(), "import cycles in actors/src:\n{report}");
}

#[test]
fn the_reader_sees_paths_and_skips_comments_and_strings() {
    let here = vec!["broker".to_owned(), "redis".to_owned()];
    let code = strip(concat!(
        "use crate::tree::Tree; // crate::metrics\n",
        "/* crate::pool /* nested */ crate::gate */ let s = \"crate::caps\";\n",
        "let r = r#\"crate::child\"#; let c = '\"'; fn f<'a>(x: &'a crate::handler::X) {}\n",
        "use super::super::supervisor::Backoff; use super::keys; use crate::{task, consumer::C};\n",
        "$crate::history::X\n",
    ));
    let got: Vec<String> = targets(&code, &here).into_iter().collect();
    assert_eq!(
        got,
        [
            "broker",
            "consumer",
            "handler",
            "supervisor",
            "task",
            "tree"
        ]
    );
}
