//! `runtime check` as a user runs it: the built binary on broken configs in `tests/fixtures/`
//! (exact output, exit 78) and on every shipped config under `config/` (exit 0).
//!
//! The environment of the child is cleared and set per case, so the results do not depend on
//! the machine's variables.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const EX_CONFIG: i32 = 78;

/// Runs `runtime check --config <config> <flags…>` from the package root with exactly `vars`
/// in its environment.
fn check(config: &str, flags: &[&str], vars: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runtime"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_clear()
        .envs(vars.iter().copied())
        .arg("check")
        .arg("--config")
        .arg(config)
        .args(flags)
        .output()
        .expect("run the runtime binary")
}

/// Asserts the exact stdout lines, an empty stderr and the exit code.
fn assert_output(output: &Output, expected: &[&str], code: i32, case: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, expected, "stdout of {case}");
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "",
        "stderr of {case}"
    );
    assert_eq!(output.status.code(), Some(code), "exit code of {case}");
}

struct Case {
    fixture: &'static str,
    flags: &'static [&'static str],
    vars: &'static [(&'static str, &'static str)],
    expected: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        fixture: "unknown_key",
        flags: &[],
        vars: &[],
        expected: &[
            "error: queues.chat.tiem_limit: unknown key, did you mean `time_limit`? (line 4, \
             column 1)",
        ],
    },
    Case {
        fixture: "undefined_queue",
        flags: &[],
        vars: &[],
        expected: &[
            "error: tasks.process_chat_message.queue: queue \"chats\" is not defined; did you \
             mean \"chat\"? defined queues: chat, default",
        ],
    },
    Case {
        fixture: "soft_above_hard",
        flags: &[],
        vars: &[],
        expected: &[
            "error: tasks.process_chat_message.soft_time_limit: 120s is not below time_limit \
             100s: the soft limit would never fire",
        ],
    },
    Case {
        fixture: "seed_conflict",
        flags: &["--deny-warnings"],
        vars: &[],
        expected: &[
            "warning: tasks.process_chat_message.time_limit: 120s is above \
             queues.chat.time_limit 60s; the task's 120s wins (the most specific limit wins: \
             task, then queue, then runtime)",
        ],
    },
    Case {
        fixture: "concurrency_zero",
        flags: &[],
        vars: &[],
        expected: &["error: queues.notifications.concurrency: must be at least 1, got 0"],
    },
    Case {
        fixture: "min_idle_above_max",
        flags: &[],
        vars: &[],
        expected: &[
            "error: pools.voice.min_idle: 4 is above max 3: the pool could never keep that \
             many idle",
        ],
    },
    Case {
        fixture: "undefined_resource",
        flags: &[],
        vars: &[("OPENAI_API_KEY", "sk-test")],
        expected: &[
            "error: tasks.extract_preferences_async.uses: resource \"zep\" is not defined; \
             defined resources: openai",
        ],
    },
    Case {
        fixture: "public_bind_without_token",
        flags: &[],
        vars: &[],
        expected: &[
            "error: http.bind: 0.0.0.0:7070 is not a loopback address and \
             http.admin_token_env is not set: the mutating routes would be open to the network",
        ],
    },
    Case {
        fixture: "blank_admin_token",
        flags: &[],
        vars: &[("RT_ADMIN_TOKEN", " \t ")],
        expected: &[
            "error: http.admin_token_env: environment variable RT_ADMIN_TOKEN holds only \
             whitespace: no request could present that token, so the mutating routes would \
             refuse everyone",
        ],
    },
    Case {
        fixture: "missing_secret",
        flags: &["--deny-warnings"],
        vars: &[],
        expected: &[
            "warning: resources.zep.api_key_env: environment variable ZEP_API_KEY is not set: \
             calls to resource zep will fail and the tasks that use it with them",
        ],
    },
    Case {
        fixture: "max_entry_bytes_zero",
        flags: &[],
        vars: &[],
        expected: &[
            "error: broker.max_entry_bytes: must be from 1024 to 536870912 bytes (512 MiB, \
             Redis' largest string), got 0",
        ],
    },
    Case {
        fixture: "bad_duration",
        flags: &[],
        vars: &[],
        expected: &[
            "error: queues.chat.time_limit: invalid duration \"120 secs please\": expected \
             number at 9 (write e.g. \"120s\", \"500ms\", \"5m\")",
        ],
    },
    Case {
        fixture: "syntax_error",
        flags: &[],
        vars: &[],
        expected: &["error: line 4, column 19: invalid basic string, expected `\"`"],
    },
    Case {
        fixture: "duplicate_key",
        flags: &[],
        vars: &[],
        expected: &["error: line 5, column 9: duplicate key `chat`"],
    },
    Case {
        fixture: "bad_cron",
        flags: &[],
        vars: &[],
        expected: &[
            "error: schedules.update-router-centroids.cron: invalid cron expression \
             \"0 25 * * *\": the hour field \"25\": number out of bounds (hour is 0-23; five \
             fields: minute hour day-of-month month day-of-week)",
        ],
    },
    Case {
        fixture: "undefined_link",
        flags: &[],
        vars: &[],
        expected: &["error: tasks.extract_preferences_async.link_error: task \
             \"record_preference_failure\" is not defined; defined tasks: \
             extract_preferences_async"],
    },
    Case {
        fixture: "bad_name",
        flags: &[],
        vars: &[],
        expected: &[
            "error: queues.chat/priority: name \"chat/priority\" is not usable in actor paths \
             and Redis keys: use only letters, digits, '_' and '-'",
        ],
    },
    Case {
        fixture: "bad_broker_scheme",
        flags: &[],
        vars: &[],
        expected: &[
            "error: broker.url: unsupported broker scheme \"amqp\": use memory://, redis://, \
             rediss:// or redis+cluster://",
        ],
    },
    Case {
        fixture: "every_and_cron",
        flags: &[],
        vars: &[],
        expected: &[
            "error: schedules.health-check-5min: sets both `every` and `cron`: set exactly one",
        ],
    },
    Case {
        fixture: "bad_regex",
        flags: &[],
        vars: &[],
        expected: &[
            "error: pools.voice.ready_pattern: invalid regex \"Pipeline (started\": unclosed \
             group",
        ],
    },
    Case {
        fixture: "undefined_pool",
        flags: &[],
        vars: &[],
        expected: &[
            "error: tasks.assign_voice_agent.handler.pool: pool \"voice\" is not defined (no \
             pools are defined)",
        ],
    },
    Case {
        fixture: "undefined_schedule_task",
        flags: &[],
        vars: &[],
        expected: &[
            "error: schedules.health-check-5min.task: task \"worker_health_check\" is not \
             defined; defined tasks: ping",
        ],
    },
    Case {
        fixture: "http_timeout_above_limit",
        flags: &["--deny-warnings"],
        vars: &[],
        expected: &[
            "warning: tasks.send_whatsapp_message_task.handler.timeout: 45s is above the task's \
             time_limit 30s (from queues.notifications.time_limit): the hard limit stops the \
             request first",
        ],
    },
    Case {
        fixture: "ready_matches_assigned",
        flags: &["--deny-warnings"],
        vars: &[],
        expected: &[
            "warning: pools.voice.ready_pattern: this and assigned_pattern both match the line \
             \"LiveKit transport created for room\": an agent confirming an assignment could \
             be taken for ready, or a ready one for confirming (checked on the literal text of \
             each pattern, not on every possible line)",
        ],
    },
    Case {
        fixture: "python_buffered",
        flags: &["--deny-warnings"],
        vars: &[],
        expected: &[
            "warning: pools.voice.env: python3 runs without -u and without PYTHONUNBUFFERED: \
             its stdout is block-buffered on a pipe, so the lines ready_pattern and \
             assigned_pattern wait for arrive late or only at exit (add PYTHONUNBUFFERED = \
             \"1\" to env, or -u to args)",
        ],
    },
    Case {
        fixture: "unregistered_native",
        flags: &[],
        vars: &[],
        expected: &[
            "error: tasks.summarize_thread.handler: no native function `summarize_thread` is \
             registered in this binary (built-in: rt_add, rt_echo, rt_fail, rt_noop, rt_sleep)",
        ],
    },
    Case {
        fixture: "misspelt_native",
        flags: &[],
        vars: &[],
        expected: &[
            "error: tasks.rt_ecko.handler: no native function `rt_ecko` is registered in this \
             binary; did you mean `rt_echo`? (built-in: rt_add, rt_echo, rt_fail, rt_noop, \
             rt_sleep)",
        ],
    },
    Case {
        fixture: "unreachable_broker",
        flags: &[],
        vars: &[],
        expected: &[
            "error: broker.url: broker at redis://127.0.0.1:9/0 is unreachable: \
             Connection refused (os error 111)",
        ],
    },
    Case {
        fixture: "five_mistakes",
        flags: &[],
        vars: &[],
        expected: &[
            "error: queues.chat.concurency: unknown key, did you mean `concurrency`? (line 4, \
             column 1)",
            "error: queues.background.prefetch: invalid type: string \"two\", expected u32 \
             (line 7, column 12)",
            "error: pools.voice.ready_pattern: required key is missing (line 9, column 1)",
            "error: tasks.process_chat_message.queue: queue \"chta\" is not defined; did you \
             mean \"chat\"? defined queues: chat, background",
            "error: schedules.update-router-centroids.cron: invalid cron expression \
             \"0 25 * * *\": the hour field \"25\": number out of bounds (hour is 0-23; five \
             fields: minute hour day-of-month month day-of-week)",
        ],
    },
    Case {
        fixture: "bad_failure_rate",
        flags: &["--no-environment"],
        vars: &[],
        expected: &["error: resources.zep.breaker.failure_rate.rate: must be in (0, 1], got 1.5"],
    },
];

#[test]
fn every_broken_fixture_prints_its_diagnostic_and_exits_78() {
    for case in CASES {
        let config = format!("tests/fixtures/{}.toml", case.fixture);
        let output = check(&config, case.flags, case.vars);
        let errors = case
            .expected
            .iter()
            .filter(|l| l.starts_with("error:"))
            .count();
        let warnings = case.expected.len() - errors;
        // Each fixture breaks one rule, but for the one that shows that a run reports all.
        let summary = match (errors, warnings) {
            (1, 0) => "1 error".to_string(),
            (0, 1) => "1 warning".to_string(),
            (n, 0) if case.fixture == "five_mistakes" => format!("{n} errors"),
            _ => panic!("each fixture breaks one rule: {}", case.fixture),
        };
        let summary = format!("{config}: {summary}");
        let mut expected = case.expected.to_vec();
        expected.push(&summary);
        assert_output(&output, &expected, EX_CONFIG, case.fixture);
    }
}

#[test]
fn every_fixture_file_has_a_case() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for path in toml_files(&dir) {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        assert!(
            CASES.iter().any(|case| case.fixture == stem),
            "{} has no case in tests/it/check.rs",
            path.display()
        );
    }
}

#[test]
fn warnings_alone_exit_0_without_deny_warnings() {
    let output = check("tests/fixtures/seed_conflict.toml", &[], &[]);
    assert_output(
        &output,
        &[
            "warning: tasks.process_chat_message.time_limit: 120s is above \
             queues.chat.time_limit 60s; the task's 120s wins (the most specific limit wins: \
             task, then queue, then runtime)",
            "tests/fixtures/seed_conflict.toml: 1 warning",
        ],
        0,
        "seed_conflict without --deny-warnings",
    );
}

#[test]
fn a_set_secret_or_no_environment_silences_the_missing_secret_warning() {
    let config = "tests/fixtures/missing_secret.toml";
    let ok = ["tests/fixtures/missing_secret.toml: ok"];
    let output = check(config, &["--deny-warnings"], &[("ZEP_API_KEY", "z-test")]);
    assert_output(&output, &ok, 0, "missing_secret with ZEP_API_KEY set");
    let output = check(config, &["--deny-warnings", "--no-environment"], &[]);
    assert_output(&output, &ok, 0, "missing_secret with --no-environment");
}

#[test]
fn a_missing_file_is_one_clear_error() {
    let config = "tests/fixtures/does-not-exist.toml";
    let output = check(config, &[], &[]);
    assert_output(
        &output,
        &[
            "error: tests/fixtures/does-not-exist.toml: cannot read: No such file or directory \
             (os error 2)",
            "tests/fixtures/does-not-exist.toml: 1 error",
        ],
        EX_CONFIG,
        "missing file",
    );
}

#[test]
fn rt_broker_url_is_checked_like_broker_url() {
    let output = check(
        "config/actors.toml",
        &[],
        &[("RT_BROKER_URL", "amqp://localhost")],
    );
    assert_output(
        &output,
        &[
            "error: broker.url: unsupported broker scheme \"amqp\" (set by RT_BROKER_URL): use \
             memory://, redis://, rediss:// or redis+cluster://",
            "config/actors.toml: 1 error",
        ],
        EX_CONFIG,
        "RT_BROKER_URL=amqp://…",
    );
}

#[test]
fn every_shipped_config_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let configs = toml_files(&root.join("config"));
    assert!(
        configs.len() >= 4,
        "expected the default config and the examples"
    );
    for path in configs {
        let relative = path
            .strip_prefix(root)
            .expect("under the package root")
            .to_string_lossy()
            .into_owned();
        let output = check(&relative, &["--no-environment", "--deny-warnings"], &[]);
        assert_output(&output, &[&format!("{relative}: ok")], 0, &relative);
    }
}

#[test]
fn the_default_config_needs_nothing_from_the_environment() {
    let output = check("config/actors.toml", &["--deny-warnings"], &[]);
    assert_output(
        &output,
        &["config/actors.toml: ok"],
        0,
        "config/actors.toml",
    );
}

/// Every `*.toml` under `dir`, recursively, sorted.
fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "toml") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}
