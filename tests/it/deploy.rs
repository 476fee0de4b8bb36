//! The deploy files (`deploy/`) against the binary: the Dockerfile, the compose file, the
//! systemd unit and the Kubernetes example. What a container engine or a cluster would find
//! out only at run time is checked here: every config they ship or mount passes `runtime
//! check`, the command lines they run are accepted by the binary, ports, paths and the admin
//! token's variable agree with the config, stop timeouts cover `runtime.shutdown_grace`, and
//! the node on that config — with Redis and the example worker, as compose runs them — serves
//! its tasks, `/health` and the image's health check. (No container is built: the machines
//! that run this have the docker CLI but no engine.)

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::common::{Node, Scratch, repo};
use actors::test_util::RedisServer;
use serde_json::{Value, json};
use tokio::time::Instant;
use yaml_rust2::{Yaml, YamlLoader};

/// What the tests read out of a config: the HTTP port, the token variable, the grace, the
/// broker URL, whether a stop may drain first, and the `http` tasks' URLs.
#[derive(Debug)]
struct ConfigFacts {
    port: u16,
    admin_token_env: Option<String>,
    shutdown_grace: Duration,
    drains: bool,
    broker_url: String,
    task_urls: BTreeMap<String, String>,
}

impl ConfigFacts {
    fn read(path: &Path) -> ConfigFacts {
        let text = std::fs::read_to_string(path).unwrap();
        let toml: toml::Table = text.parse().unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let get = |table: &str, key: &str| toml.get(table).and_then(|t| t.get(key));
        let bind = get("http", "bind")
            .and_then(|v| v.as_str())
            .unwrap_or("127.0.0.1:7070");
        let grace = get("runtime", "shutdown_grace")
            .and_then(|v| v.as_str())
            .unwrap_or("30s");
        let mut task_urls = BTreeMap::new();
        for (name, task) in toml
            .get("tasks")
            .and_then(|t| t.as_table())
            .into_iter()
            .flatten()
        {
            if let Some(url) = task.get("handler").and_then(|h| h.get("url")) {
                task_urls.insert(name.clone(), url.as_str().unwrap().to_string());
            }
        }
        ConfigFacts {
            port: bind.rsplit_once(':').unwrap().1.parse().unwrap(),
            admin_token_env: get("http", "admin_token_env")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            shutdown_grace: humantime::parse_duration(grace).unwrap(),
            drains: get("broker", "drain_on_shutdown").and_then(|v| v.as_bool()) == Some(true),
            broker_url: get("broker", "url")
                .and_then(|v| v.as_str())
                .unwrap_or("memory://")
                .to_string(),
            task_urls,
        }
    }

    /// The least a service manager must wait after SIGTERM before SIGKILL: the grace (twice
    /// it when a `memory://` stop drains first) and 5 s for the rest of the stop.
    fn stop_timeout(&self) -> Duration {
        let graces = if self.drains { 2 } else { 1 };
        self.shutdown_grace * graces + Duration::from_secs(5)
    }
}

/// `host:port` of a URL (`redis://redis:6379/0` → `("redis", 6379)`).
fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").unwrap().1;
    let authority = rest.split('/').next().unwrap();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = authority.rsplit_once(':').unwrap();
    (host.to_string(), port.parse().unwrap())
}

fn runtime(args: &[&str]) -> Output {
    Command::new(common::binary())
        .args(args)
        .env_remove("RT_BROKER_URL")
        .env_remove("RT_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The binary accepts `args` as a command line (every subcommand and flag exists and takes
/// what follows it): clap parses them up to an appended `--help`.
fn assert_accepted(args: &[&str], what: &str) {
    let mut with_help = args.to_vec();
    with_help.push("--help");
    let out = runtime(&with_help);
    assert!(
        out.status.success(),
        "{what}: `runtime {}` is not a command line the binary accepts:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `runtime check --no-environment` passes on `path`.
fn assert_checks(path: &Path) {
    let out = runtime(&[
        "check",
        "--no-environment",
        "--config",
        &path.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "runtime check {path:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn duration_secs(text: &str) -> Duration {
    humantime::parse_duration(text.trim()).unwrap_or_else(|e| panic!("`{text}`: {e}"))
}

/// The instructions of a Dockerfile (continuation lines joined, comments dropped), each as
/// (INSTRUCTION, arguments).
fn dockerfile(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (word, rest) = current.split_once(' ').unwrap_or((&current, ""));
        out.push((word.to_uppercase(), rest.trim().to_string()));
        current.clear();
    }
    out
}

/// A JSON-array instruction's words (`["runtime", "run"]`).
fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("not an exec-form array: {args}: {e}"))
}

#[test]
fn the_dockerfile_builds_the_binary_in_stages_and_runs_it_unprivileged_on_a_checked_config() {
    let steps = dockerfile(&repo("deploy/Dockerfile"));
    let froms: Vec<&String> = steps
        .iter()
        .filter(|(i, _)| i == "FROM")
        .map(|(_, a)| a)
        .collect();
    assert_eq!(
        froms.len(),
        2,
        "a builder stage and a runtime stage: {froms:?}"
    );
    assert!(froms[0].starts_with("rust:") && froms[0].ends_with(" AS builder"));
    assert!(
        froms[1].contains("-slim"),
        "a small runtime image: {}",
        froms[1]
    );
    let last_from = steps.iter().rposition(|(i, _)| i == "FROM").unwrap();
    let (builder, image) = steps.split_at(last_from);
    let arg = |steps: &[(String, String)], instruction: &str| -> Vec<String> {
        steps
            .iter()
            .filter(|(i, _)| i == instruction)
            .map(|(_, a)| a.clone())
            .collect()
    };

    // The builder runs the release build of this package's binary.
    let run = arg(builder, "RUN").join(" ");
    assert!(
        run.contains("cargo build --release --locked --bin runtime"),
        "{run}"
    );
    assert!(run.contains("target/release/runtime"), "{run}");
    let manifest = std::fs::read_to_string(repo("Cargo.toml")).unwrap();
    assert!(manifest.contains("[[bin]]\nname = \"runtime\""));

    // What it copies exists and passes the build context's ignore file.
    let ignore = std::fs::read_to_string(repo("deploy/Dockerfile.dockerignore")).unwrap();
    let allowed: Vec<&str> = ignore.lines().filter_map(|l| l.strip_prefix('!')).collect();
    assert!(ignore.lines().any(|l| l.trim() == "*"), "an allow-list");
    for copy in arg(builder, "COPY").iter().chain(&arg(image, "COPY")) {
        if copy.starts_with("--from=") {
            continue;
        }
        let words: Vec<&str> = copy.split_whitespace().collect();
        for source in &words[..words.len() - 1] {
            assert!(
                repo(source).exists(),
                "COPY {source}: not in the repository"
            );
            assert!(
                allowed
                    .iter()
                    .any(|a| source == a || source.starts_with(&format!("{a}/"))),
                "COPY {source}: left out by Dockerfile.dockerignore"
            );
        }
    }
    // Every source file the build needs is in the context.
    for needed in ["actors/src/lib.rs", "src/main.rs", "build.rs", "Cargo.lock"] {
        assert!(
            allowed
                .iter()
                .any(|a| needed == *a || needed.starts_with(&format!("{a}/"))),
            "{needed} is not in the build context"
        );
    }

    // The runtime stage: its config, checked; a non-root user; the port; the stop signal.
    let copies = arg(image, "COPY");
    let config_copy = copies
        .iter()
        .find(|c| c.starts_with("deploy/"))
        .expect("the config is copied into the image");
    let (source, target) = config_copy.split_once(' ').unwrap();
    assert_checks(&repo(source));
    let facts = ConfigFacts::read(&repo(source));
    assert!(arg(image, "ENV").contains(&format!("RT_CONFIG={target}")));
    let user = arg(image, "USER");
    assert_eq!(user.len(), 1);
    let uid = user[0].split(':').next().unwrap();
    assert!(uid != "root" && uid != "0", "USER {}", user[0]);
    assert_eq!(arg(image, "EXPOSE"), [facts.port.to_string()]);
    assert_eq!(arg(image, "STOPSIGNAL"), ["SIGTERM"]);

    // The command lines the image runs are the binary's: ENTRYPOINT + CMD, and the health check.
    let entrypoint = exec_form(&arg(image, "ENTRYPOINT")[0]);
    let cmd = exec_form(&arg(image, "CMD")[0]);
    assert_eq!(entrypoint, ["runtime"]);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    assert_accepted(&cmd, "CMD");
    assert_eq!(&cmd[..], ["run", "--config", target]);
    let health = arg(image, "HEALTHCHECK");
    let exec = health[0]
        .split_once("CMD ")
        .expect("HEALTHCHECK … CMD [..]")
        .1;
    let check = exec_form(exec);
    assert_eq!(check[0], "runtime");
    let check: Vec<&str> = check[1..].iter().map(String::as_str).collect();
    assert_accepted(&check, "HEALTHCHECK");
    assert_eq!(
        check,
        [
            "inspect",
            "ping",
            "--url",
            &format!("http://127.0.0.1:{}", facts.port)
        ]
    );
}

/// A compose service (its mapping).
fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    let service = &compose["services"][name];
    assert!(!service.is_badvalue(), "no service `{name}`");
    service
}

fn strings(yaml: &Yaml) -> Vec<String> {
    yaml.as_vec()
        .map(|items| {
            items
                .iter()
                .map(|i| match i {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(n) => n.to_string(),
                    other => panic!("not a string: {other:?}"),
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_compose_file_agrees_with_its_config_and_the_binary() {
    let deploy = repo("deploy");
    let text = std::fs::read_to_string(deploy.join("compose.yaml")).unwrap();
    let compose = &YamlLoader::load_from_str(&text).expect("compose.yaml is YAML")[0];

    // The node: built from deploy/Dockerfile, running the mounted config, which passes check.
    let node = service(compose, "node");
    assert_eq!(
        node["build"]["dockerfile"].as_str(),
        Some("deploy/Dockerfile")
    );
    let context = deploy.join(node["build"]["context"].as_str().unwrap());
    assert!(context.join("deploy/Dockerfile").is_file());
    let mount = strings(&node["volumes"])
        .into_iter()
        .find(|v| v.ends_with(".toml:ro") || v.contains(".toml:"))
        .expect("the config is mounted");
    let parts: Vec<&str> = mount.split(':').collect();
    let config = deploy.join(parts[0]);
    assert_checks(&config);
    let facts = ConfigFacts::read(&config);
    let command = strings(&node["command"]);
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    assert_accepted(&command, "node command");
    assert_eq!(command, ["run", "--config", parts[1]]);

    // Its port, published on loopback only; the token from the environment, required.
    let ports = strings(&node["ports"]);
    assert_eq!(ports, [format!("127.0.0.1:{0}:{0}", facts.port)]);
    let token_var = facts
        .admin_token_env
        .as_deref()
        .expect("a non-loopback bind needs an admin token");
    let token = node["environment"][token_var]
        .as_str()
        .unwrap_or_else(|| panic!("the node's environment has no {token_var}"));
    assert!(
        token.starts_with(&format!("${{{token_var}:?")),
        "{token_var} must come from the environment and be required, never written: {token}"
    );

    // Stopping: SIGTERM, and longer than the grace before SIGKILL.
    assert_eq!(node["stop_signal"].as_str(), Some("SIGTERM"));
    let grace = duration_secs(node["stop_grace_period"].as_str().unwrap());
    assert!(
        grace >= facts.stop_timeout(),
        "stop_grace_period {grace:?} < {:?}",
        facts.stop_timeout()
    );

    // The broker and the task endpoints are services of this file, on their ports.
    let (host, port) = host_port(&facts.broker_url);
    assert_eq!((host.as_str(), port), ("redis", 6379));
    let redis = strings(&service(compose, "redis")["command"]).join(" ");
    assert!(redis.contains("--appendonly yes"), "{redis}");
    assert!(redis.contains("--maxmemory-policy noeviction"), "{redis}");
    let worker = service(compose, "worker");
    let worker_command = strings(&worker["command"]).join(" ");
    assert!(!facts.task_urls.is_empty());
    for (task, url) in &facts.task_urls {
        let (host, port) = host_port(url);
        assert!(!service(compose, &host).is_badvalue(), "{task}: {url}");
        assert!(
            worker_command.ends_with(&format!("--port {port}")),
            "{task}: {url} but the worker runs `{worker_command}`"
        );
    }
    for volume in strings(&worker["volumes"]) {
        assert!(
            deploy.join(volume.split(':').next().unwrap()).exists(),
            "{volume}"
        );
    }

    // Prometheus scrapes the node; Grafana gets the dashboard.
    let prometheus = std::fs::read_to_string(deploy.join("prometheus/prometheus.yml")).unwrap();
    assert!(prometheus.contains(&format!("\"node:{}\"", facts.port)));
    for name in ["prometheus", "grafana"] {
        for volume in strings(&service(compose, name)["volumes"]) {
            assert!(
                deploy.join(volume.split(':').next().unwrap()).exists(),
                "{volume}"
            );
        }
    }
}

/// The `[Section]` → key → values of a systemd unit (a key may repeat).
fn unit(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("{line}"));
        out.entry(section.clone())
            .or_default()
            .entry(key.to_string())
            .or_default()
            .push(value.to_string());
    }
    out
}

#[test]
fn the_systemd_unit_runs_the_binary_and_outlasts_the_grace() {
    let text = std::fs::read_to_string(repo("deploy/systemd/runtime.service")).unwrap();
    let parsed = unit(&text);
    let service = &parsed["Service"];
    let one = |key: &str| -> &str {
        let values = service
            .get(key)
            .unwrap_or_else(|| panic!("[Service] has no {key}"));
        assert_eq!(values.len(), 1, "{key}");
        &values[0]
    };
    let exec: Vec<&str> = one("ExecStart").split_whitespace().collect();
    assert!(exec[0].ends_with("/runtime"), "{exec:?}");
    assert_accepted(&exec[1..], "ExecStart");
    assert_eq!(exec[1..3], ["run", "--config"]);
    for (key, value) in [
        ("Type", "exec"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "78"),
        ("KillSignal", "SIGTERM"),
        ("KillMode", "mixed"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
    ] {
        assert_eq!(one(key), value, "{key}");
    }
    // Long enough for the default config a host starts from (twice its grace: with memory://
    // and drain_on_shutdown a stop can take that long).
    let defaults = ConfigFacts::read(&repo("config/actors.toml"));
    let stop = duration_secs(one("TimeoutStopSec"));
    assert!(
        stop >= defaults.shutdown_grace * 2 + Duration::from_secs(5),
        "TimeoutStopSec {stop:?} for a grace of {:?}",
        defaults.shutdown_grace
    );
    // Secrets come from the EnvironmentFile; its example names the token variable the
    // containers' config uses.
    assert!(one("EnvironmentFile").starts_with("-/etc/runtime/"));
    let example = std::fs::read_to_string(repo("deploy/systemd/runtime.env.example")).unwrap();
    let facts = ConfigFacts::read(&repo("deploy/actors.toml"));
    let token_var = facts.admin_token_env.unwrap();
    assert!(
        example.lines().any(|l| l == format!("{token_var}=")),
        "{example}"
    );

    // systemd's own verdict, on a copy whose ExecStart is the built binary.
    let Some(analyze) = common::tool(
        "SYSTEMD_ANALYZE",
        &["systemd-analyze"],
        &[],
        "`apt-get install -y systemd`",
        true,
    ) else {
        return;
    };
    let scratch = Scratch::new();
    let copy = scratch.write("runtime.service", &text.replace(exec[0], common::binary()));
    let out = Command::new(analyze)
        .args(["verify", &copy.display().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
}

/// Every document of the YAML files under `deploy/kubernetes`, by `kind/name`.
fn manifests() -> BTreeMap<String, Yaml> {
    let mut out = BTreeMap::new();
    let dir = repo("deploy/kubernetes");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}")) {
            let key = format!(
                "{}/{}",
                doc["kind"].as_str().unwrap(),
                doc["metadata"]["name"].as_str().unwrap()
            );
            out.insert(key, doc);
        }
    }
    out
}

#[test]
fn the_kubernetes_example_agrees_with_its_config_and_the_binary() {
    let deploy = repo("deploy");
    let text = std::fs::read_to_string(deploy.join("kustomization.yaml")).unwrap();
    let kustomization = &YamlLoader::load_from_str(&text).unwrap()[0];
    for resource in strings(&kustomization["resources"]) {
        assert!(deploy.join(&resource).is_file(), "{resource}");
    }
    // The ConfigMaps are generated from files: the node's config is the one checked here.
    let mut generated: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for generator in kustomization["configMapGenerator"].as_vec().unwrap() {
        let files = strings(&generator["files"]);
        for file in &files {
            assert!(deploy.join(file).is_file(), "{file}");
        }
        generated.insert(generator["name"].as_str().unwrap().to_string(), files);
    }
    let config_files = &generated["runtime-config"];
    assert_eq!(config_files.len(), 1);
    let config = deploy.join(&config_files[0]);
    assert_checks(&config);
    let facts = ConfigFacts::read(&config);

    let all = manifests();
    let deployment = &all["Deployment/runtime"];
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args = strings(&container["args"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_accepted(&args, "the container's args");
    assert_eq!(args[..2], ["run", "--config"]);
    // --config points at the generated file, where the ConfigMap is mounted.
    let (dir, file) = args[2].rsplit_once('/').unwrap();
    let mounts = container["volumeMounts"].as_vec().unwrap();
    let mount = mounts
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(dir))
        .expect("a volume at the config's directory");
    assert_eq!(file, Path::new(&config_files[0]).file_name().unwrap());
    let volume = pod["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(volume["configMap"]["name"].as_str(), Some("runtime-config"));
    assert!(
        mounts
            .iter()
            .any(|m| m["mountPath"].as_str() == Some("/tmp")),
        "a writable /tmp for the watchdog's ledger (the root file system is read-only)"
    );

    // The port, the probes, the Service.
    let port = &container["ports"][0];
    assert_eq!(port["containerPort"].as_i64(), Some(i64::from(facts.port)));
    let port_name = port["name"].as_str().unwrap();
    let readiness = &container["readinessProbe"]["httpGet"];
    assert_eq!(readiness["path"].as_str(), Some("/health"));
    assert_eq!(readiness["port"].as_str(), Some(port_name));
    for probe in ["livenessProbe", "startupProbe"] {
        assert_eq!(
            container[probe]["tcpSocket"]["port"].as_str(),
            Some(port_name),
            "{probe}"
        );
    }
    let service = &all["Service/runtime"];
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"].as_str(),
        Some(port_name)
    );

    // Stopping, resources, privileges, the token from a Secret.
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(
        Duration::from_secs(grace as u64) >= facts.stop_timeout(),
        "terminationGracePeriodSeconds {grace} < {:?}",
        facts.stop_timeout()
    );
    let resources = &container["resources"];
    assert!(!resources["requests"]["memory"].is_badvalue());
    assert!(!resources["limits"]["memory"].is_badvalue());
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let image_user = dockerfile(&repo("deploy/Dockerfile"))
        .into_iter()
        .rfind(|(i, _)| i == "USER")
        .unwrap()
        .1;
    assert_eq!(
        pod["securityContext"]["runAsUser"]
            .as_i64()
            .map(|u| u.to_string()),
        image_user.split(':').next().map(str::to_string)
    );
    assert_eq!(
        container["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
    let token_var = facts.admin_token_env.as_deref().unwrap();
    let env = container["env"].as_vec().unwrap();
    let token = env
        .iter()
        .find(|e| e["name"].as_str() == Some(token_var))
        .unwrap_or_else(|| panic!("no {token_var} in the container's env"));
    assert!(
        token["value"].is_badvalue(),
        "{token_var} written in the manifest"
    );
    assert!(!token["valueFrom"]["secretKeyRef"]["name"].is_badvalue());

    // The broker and the task endpoints are Services of the example, on their ports.
    let (host, port) = host_port(&facts.broker_url);
    let redis = &all[&format!("Service/{host}")];
    assert_eq!(
        redis["spec"]["ports"][0]["port"].as_i64(),
        Some(i64::from(port))
    );
    for (task, url) in &facts.task_urls {
        let (host, port) = host_port(url);
        let service = all
            .get(&format!("Service/{host}"))
            .unwrap_or_else(|| panic!("{task}: no Service {host}"));
        assert_eq!(
            service["spec"]["ports"][0]["port"].as_i64(),
            Some(i64::from(port))
        );
    }

    // kubectl's own rendering, where kubectl is installed (optional: no Debian package of a
    // current one).
    let kubectl = common::tool(
        "KUBECTL",
        &["kubectl"],
        &[],
        "kubectl from the Kubernetes project",
        false,
    );
    if let Some(kubectl) = kubectl {
        let out = Command::new(kubectl)
            .args(["kustomize", &deploy.display().to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rendered = String::from_utf8(out.stdout).unwrap();
        let docs = YamlLoader::load_from_str(&rendered).unwrap();
        let map = docs
            .iter()
            .find(|d| {
                d["kind"].as_str() == Some("ConfigMap")
                    && d["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("runtime-config-"))
            })
            .expect("the generated ConfigMap");
        let embedded = map["data"][config_files[0].as_str()].as_str().unwrap();
        assert_eq!(embedded, std::fs::read_to_string(&config).unwrap());
        let name = map["metadata"]["name"].as_str().unwrap();
        assert!(rendered.contains(&format!("name: {name}\n")));
        assert_eq!(rendered.matches(name).count(), 2, "the map and its mount");
    }
}

/// The example worker (deploy/worker/app.py) on a free loopback port.
struct Worker {
    child: std::process::Child,
    url: String,
}

impl Worker {
    fn start() -> Worker {
        let port = common::fakes::free_port();
        let child = Command::new("python3")
            .arg(repo("deploy/worker/app.py"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .env("FAIL_RATE", "0")
            .env("CHAT_MS", "10")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs the example worker");
        let url = format!("http://127.0.0.1:{port}");
        let at = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                at.elapsed() < Duration::from_secs(10),
                "the worker never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Worker { child, url }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replaces `from` (which must be in `text`) by `to`.
fn swap(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "`{from}` is no longer in the config");
    text.replace(from, to)
}

#[tokio::test]
async fn the_container_config_runs_its_tasks_on_the_example_worker_and_answers_the_health_check() {
    let redis = RedisServer::start();
    let worker = Worker::start();
    // deploy/actors.toml as compose runs it, with this machine's addresses for the services.
    let text = std::fs::read_to_string(repo("deploy/actors.toml")).unwrap();
    let text = swap(&text, "redis://redis:6379/0", &redis.url());
    let text = swap(&text, "bind = \"0.0.0.0:7070\"", "bind = \"127.0.0.1:0\"");
    let text = swap(&text, "http://worker:8000", &worker.url);
    let token = "deploy-test-token";
    let node = Node::start(&text, &[("RT_ADMIN_TOKEN", token)]);

    // Probes and scrapes.
    assert_eq!(node.get("/health").await.status(), 200, "{}", node.log());
    assert_eq!(node.get("/metrics").await.status(), 200);
    // The image's health check, against this node.
    let out = runtime(&["inspect", "ping", "--url", &node.url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Mutating routes need the token.
    let client = reqwest::Client::new();
    let refused = client
        .post(format!("{}/tasks", node.url))
        .json(&json!({ "task": "rt_echo" }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    // Every task of the config, run by the worker (or built in), succeeds.
    let facts = ConfigFacts::read(&repo("deploy/actors.toml"));
    let mut ids = BTreeMap::new();
    let bodies = facts
        .task_urls
        .keys()
        .map(|task| {
            json!({ "task": task, "kwargs": { "text": "hello from the deploy test", "to": "+100" },
                    "args": [{ "reply": "a reply long enough" }] })
        })
        .chain([json!({ "task": "rt_echo", "args": ["hi"] })]);
    for body in bodies {
        let task = body["task"].as_str().unwrap().to_string();
        let answer: Value = client
            .post(format!("{}/tasks", node.url))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.insert(task, answer["id"].as_str().unwrap().to_string());
    }
    let at = Instant::now();
    for (task, id) in &ids {
        let left = Duration::from_secs(30).saturating_sub(at.elapsed());
        let record = node.until_ended(id, left).await;
        assert_eq!(record["state"], "succeeded", "{task}: {record}");
    }
    // process_chat_message's link ran on the worker too (extract_preferences_async).
    let metric = "rt_tasks_succeeded_total{task=\"extract_preferences_async\",queue=\"default\"}";
    common::eventually(
        "two extract_preferences_async",
        Duration::from_secs(30),
        async || {
            let seen = node.metric(metric).await;
            if seen == Some(2.0) {
                Ok(())
            } else {
                Err(format!("{seen:?}; log:\n{}", node.log()))
            }
        },
    )
    .await;
}
