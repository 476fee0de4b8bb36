//! Unit tests of the config compiler: one or more per rule, against an injected environment.

use std::collections::HashMap;
use std::time::Duration;

use actors::supervisor::Strategy;

use super::{Config, Environment, Handler, Loaded, ResourceSettings, compile_str};
use actors::scheduler::{Missed, Trigger};

/// Compiles `text` with exactly `vars` in the environment.
fn compile_env(text: &str, vars: &[(&str, &str)]) -> Result<Loaded, Vec<String>> {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookup = move |name: &str| vars.get(name).cloned();
    compile_str(text, Environment::Lookup(&lookup))
        .map_err(|err| err.diagnostics.iter().map(ToString::to_string).collect())
}

/// Compiles `text` with an empty environment; panics (test failure) on errors.
fn ok(text: &str) -> (Config, Vec<String>) {
    match compile_env(text, &[]) {
        Ok(loaded) => (
            loaded.config,
            loaded.warnings.iter().map(ToString::to_string).collect(),
        ),
        Err(lines) => panic!("expected a valid config, got:\n{}", lines.join("\n")),
    }
}

/// Every diagnostic line (errors, then warnings) of a config that must fail.
fn fails(text: &str) -> Vec<String> {
    fails_env(text, &[])
}

fn fails_env(text: &str, vars: &[(&str, &str)]) -> Vec<String> {
    match compile_env(text, vars) {
        Ok(loaded) => panic!(
            "expected errors, got a config; warnings: {:?}",
            loaded.warnings
        ),
        Err(lines) => lines,
    }
}

const QUEUE: &str = "[queues.default]\n";

#[test]
fn an_empty_file_compiles_to_the_documented_defaults() {
    let (config, warnings) = ok("");
    assert!(warnings.is_empty());
    assert_eq!(config.runtime.shutdown_grace, Duration::from_secs(30));
    assert_eq!(config.runtime.heartbeat_interval, Duration::from_secs(1));
    assert_eq!(config.runtime.time_limit, Duration::from_secs(300));
    assert_eq!(config.runtime.soft_time_limit, None);
    assert_eq!(config.broker.url, "memory://");
    assert_eq!(config.broker.settings.prefix, "rt");
    assert_eq!(config.broker.lease, Duration::from_secs(30));
    assert_eq!(config.broker.settings.max_deliveries, 5);
    assert_eq!(
        config.broker.settings.result_ttl,
        Duration::from_secs(86_400)
    );
    assert_eq!(config.broker.settings.max_entry_bytes, 1024 * 1024);
    assert_eq!(config.http.bind.to_string(), "127.0.0.1:7070");
    assert_eq!(config.http.admin_token, None);
    assert_eq!(config.supervision.strategy, Strategy::OneForOne);
    assert_eq!(config.supervision.intensity.max_restarts(), 5);
    assert_eq!(
        config.supervision.intensity.within(),
        Duration::from_secs(10)
    );
    assert_eq!(
        config.supervision.backoff.ceiling(0),
        Duration::from_millis(20)
    );
    assert_eq!(
        config.supervision.backoff.ceiling(20),
        Duration::from_secs(5)
    );
    assert!(!config.chaos.enabled);
    assert!(config.metrics.enabled);
    assert!(config.events.enabled);
    assert_eq!(config.events.maxlen.get(), 10_000);
    assert!(config.queues.is_empty() && config.tasks.is_empty());
}

#[test]
fn tables_keep_declaration_order() {
    let (config, _) = ok("[queues.zeta]\n[queues.alpha]\n[queues.mid]\n");
    let names: Vec<&str> = config.queues.keys().map(String::as_str).collect();
    assert_eq!(names, ["zeta", "alpha", "mid"]);
}

#[test]
fn unknown_keys_are_named_by_path_with_position() {
    // A misspelt key: the closest one is suggested.
    assert_eq!(
        fails("[queues.chat]\nconcurency = 3\n"),
        [
            "error: queues.chat.concurency: unknown key, did you mean `concurrency`? (line 2, column 1)"
        ]
    );
    assert_eq!(
        fails("[queus.chat]\n"),
        ["error: queus: unknown key, did you mean `queues`? (line 1, column 2)"]
    );
    // Nothing close: the keys that are allowed.
    assert_eq!(
        fails("[queues.chat]\nflavour = 3\n"),
        [
            "error: queues.chat.flavour: unknown key, expected one of `concurrency`, \
             `prefetch`, `time_limit`, `soft_time_limit`, `partitions` (line 2, column 1)"
        ]
    );
    assert_eq!(
        fails("[broker]\nhostname = \"x\"\n"),
        [
            "error: broker.hostname: unknown key, expected one of `url`, `prefix`, `lease`, \
             `max_deliveries`, `result_ttl`, `max_entry_bytes`, `drain_on_shutdown`, \
             `ack_replicas`, `ack_replicas_timeout` (line 2, column 1)"
        ]
    );
    // Inside a tagged handler table too, and for its kind.
    assert_eq!(
        fails(&format!(
            "{QUEUE}[tasks.t]\nhandler = {{ kind = \"http\", urll = \"http://x\" }}\n"
        )),
        ["error: tasks.t.handler.urll: unknown key, did you mean `url`? (line 3, column 11)"]
    );
    assert_eq!(
        fails("[resources.r]\nkind = \"redis\"\n"),
        [
            "error: resources.r.kind: unknown variant `redis`, expected `zep` or `openai` (line 2, column 8)"
        ]
    );
    assert_eq!(
        fails(&format!(
            "{QUEUE}[tasks.t]\nhandler = {{ kind = \"htpp\", url = \"http://x\" }}\n"
        )),
        [
            "error: tasks.t.handler.kind: unknown variant `htpp`, did you mean `http`? (line 3, column 20)"
        ]
    );
}

#[test]
fn a_file_of_nothing_but_mistakes_stops_after_a_hundred() {
    let text: String = (0..500).map(|n| format!("nope_{n} = 1\n")).collect();
    let lines = fails(&text);
    assert_eq!(lines.len(), 101, "{lines:?}");
    assert_eq!(
        lines[0],
        "error: nope_0: unknown key, expected one of `runtime`, `broker`, `http`, `supervision`, `queues`, `tasks`, `resources`, `pools`, `workers`, `schedules`, `beat`, `chaos`, `celery`, `metrics`, `events` (line 1, column 1)"
    );
    assert_eq!(lines[100], "error: (file): stopped after 100 shape errors");
}

/// One run reports every shape error, however many tables have them, then the meaning
/// errors of what could be read — without a second error caused by the first.
#[test]
fn every_shape_error_is_reported_in_one_pass() {
    let text = "\
[runtime]
shutdown_grase = \"10s\"

[queues.chat]
concurency = 4
prefetch = \"two\"

[queues.default]

[tasks.t]
queue = \"chat\"
handler = \"native\"

[tasks.u]
queue = \"chat\"
handler = { kind = \"native\" }
link = [\"t\", \"w\"]

[pools.voice]
command = \"python3\"
max = 1

[tasks.v]
queue = \"defualt\"
handler = { kind = \"pool\", pool = \"voice\" }

[schedules.s]
task = \"u\"
every = \"0s\"
";
    assert_eq!(
        fails(text),
        [
            "error: runtime.shutdown_grase: unknown key, did you mean `shutdown_grace`? (line 2, \
             column 1)",
            "error: queues.chat.concurency: unknown key, did you mean `concurrency`? (line 5, \
             column 1)",
            "error: queues.chat.prefetch: invalid type: string \"two\", expected u32 (line 6, \
             column 12)",
            "error: tasks.t.handler: invalid type: string \"native\", expected an inline table \
             with kind = \"http\", \"exec\", \"native\", \"pool\" or \"python\" (line 12, column 11)",
            "error: pools.voice.ready_pattern: required key is missing (line 19, column 1)",
            // Meaning errors: `chat`, `t` and `voice` are defined, only unreadable (reported
            // above), so tasks.u and tasks.v are told nothing about them.
            "error: tasks.u.link: task \"w\" is not defined; defined tasks: t, u, v",
            "error: tasks.v.queue: queue \"defualt\" is not defined; did you mean \"default\"? \
             defined queues: chat, default",
            "error: schedules.s.every: must be longer than zero",
        ]
    );
}

#[test]
fn missing_required_keys_and_wrong_types_are_named() {
    assert_eq!(
        fails(&format!("{QUEUE}[tasks.t]\nqueue = \"default\"\n")),
        ["error: tasks.t.handler: required key is missing (line 2, column 1)"]
    );
    assert_eq!(
        fails(&format!("{QUEUE}[tasks.t]\nhandler = \"native\"\n")),
        [
            "error: tasks.t.handler: invalid type: string \"native\", expected an inline table \
          with kind = \"http\", \"exec\", \"native\", \"pool\" or \"python\" (line 3, column 11)"
        ]
    );
    assert_eq!(
        fails(&format!(
            "{QUEUE}[tasks.t]\nhandler = {{ kind = \"http\" }}\n"
        )),
        ["error: tasks.t.handler.url: required key is missing (line 3, column 11)"]
    );
    assert_eq!(
        fails("[queues.chat]\nconcurrency = \"four\"\n"),
        [
            "error: queues.chat.concurrency: invalid type: string \"four\", expected u32 (line 2, column 15)"
        ]
    );
}

#[test]
fn toml_syntax_errors_and_duplicate_keys_give_line_and_column() {
    assert_eq!(
        fails("[queues.chat]\nconcurrency = 3\n[queues.chat]\n"),
        ["error: line 3, column 9: duplicate key `chat`"]
    );
    assert_eq!(
        fails("[queues.default\n"),
        ["error: line 1, column 16: unclosed table, expected `]`"]
    );
}

#[test]
fn bad_durations_name_their_key_and_all_are_reported() {
    let lines =
        fails("[runtime]\nshutdown_grace = \"30 parsecs\"\n[queues.chat]\ntime_limit = \"1x\"\n");
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("error: runtime.shutdown_grace: invalid duration \"30 parsecs\""));
    assert!(lines[1].starts_with("error: queues.chat.time_limit: invalid duration \"1x\""));
    assert_eq!(
        fails("[runtime]\nshutdown_grace = 30\n"),
        [
            "error: runtime.shutdown_grace: a duration needs a unit: write \"30s\" (or ms, m, h), \
          not a bare number (line 2, column 18)"
        ]
    );
    assert_eq!(
        fails("[runtime]\nheartbeat_interval = \"0s\"\n"),
        ["error: runtime.heartbeat_interval: must be longer than zero"]
    );
}

#[test]
fn a_task_routed_to_an_undefined_queue_lists_the_defined_ones() {
    assert_eq!(
        fails(
            "[queues.chat]\n[queues.default]\n[tasks.t]\nqueue = \"chatt\"\nhandler = { kind = \"native\" }\n"
        ),
        [
            "error: tasks.t.queue: queue \"chatt\" is not defined; did you mean \"chat\"? \
             defined queues: chat, default"
        ]
    );
    assert_eq!(
        fails("[tasks.t]\nhandler = { kind = \"native\" }\n"),
        [
            "error: tasks.t.queue: queue \"default\" is not defined (no queues are defined) \
          (a task without `queue` goes to \"default\")"
        ]
    );
}

#[test]
fn soft_at_or_above_hard_is_an_error_at_every_level() {
    assert_eq!(
        fails("[runtime]\ntime_limit = \"60s\"\nsoft_time_limit = \"60s\"\n"),
        [
            "error: runtime.soft_time_limit: 60s is not below time_limit 60s: the soft limit would never fire"
        ]
    );
    assert_eq!(
        fails("[queues.chat]\ntime_limit = \"30s\"\nsoft_time_limit = \"45s\"\n"),
        [
            "error: queues.chat.soft_time_limit: 45s is not below time_limit 30s: the soft limit would never fire"
        ]
    );
    assert_eq!(
        fails(&format!(
            "{QUEUE}[tasks.t]\nhandler = {{ kind = \"native\" }}\ntime_limit = \"100s\"\nsoft_time_limit = \"120s\"\n"
        )),
        [
            "error: tasks.t.soft_time_limit: 120s is not below time_limit 100s: the soft limit would never fire"
        ]
    );
}

#[test]
fn soft_versus_hard_is_checked_after_precedence() {
    // The task's soft limit against the hard limit it inherits from the runtime.
    assert_eq!(
        fails(&format!(
            "[runtime]\ntime_limit = \"60s\"\n{QUEUE}[tasks.t]\nhandler = {{ kind = \"native\" }}\nsoft_time_limit = \"70s\"\n"
        )),
        [
            "error: tasks.t.soft_time_limit: 70s is not below the time_limit 60s inherited from \
          runtime.time_limit: the soft limit would never fire"
        ]
    );
    // The task's hard limit against the soft limit it inherits from its queue.
    assert_eq!(
        fails(
            "[queues.chat]\nsoft_time_limit = \"45s\"\n[tasks.t]\nqueue = \"chat\"\nhandler = { kind = \"native\" }\ntime_limit = \"30s\"\n"
        ),
        [
            "error: tasks.t.time_limit: 30s is not above the soft_time_limit 45s inherited from \
          queues.chat.soft_time_limit: the soft limit would never fire"
        ]
    );
}

#[test]
fn effective_limits_resolve_task_then_queue_then_runtime() {
    let (config, warnings) = ok(r#"
        [runtime]
        soft_time_limit = "45s"
        [queues.chat]
        time_limit = "150s"
        soft_time_limit = "130s"
        [queues.default]
        [tasks.chat_task]
        queue = "chat"
        handler = { kind = "native" }
        [tasks.own]
        queue = "chat"
        handler = { kind = "native" }
        time_limit = "20s"
        soft_time_limit = "10s"
        [tasks.plain]
        handler = { kind = "native" }
    "#);
    assert!(warnings.is_empty(), "{warnings:?}");
    let limits = |name: &str| {
        let task = &config.tasks[name];
        (task.time_limit, task.soft_time_limit)
    };
    let s = Duration::from_secs;
    assert_eq!(limits("chat_task"), (s(150), Some(s(130))));
    assert_eq!(limits("own"), (s(20), Some(s(10))));
    assert_eq!(limits("plain"), (s(300), Some(s(45))));
}

#[test]
fn the_seed_conflict_is_a_warning_that_says_the_task_wins() {
    // Celery's CELERY_TASK_TIME_LIMIT = 60 vs process_chat_message's time_limit = 120.
    let (config, warnings) = ok(r#"
        [queues.chat]
        time_limit = "60s"
        soft_time_limit = "45s"
        [tasks.process_chat_message]
        queue = "chat"
        handler = { kind = "native" }
        time_limit = "120s"
        soft_time_limit = "100s"
    "#);
    assert_eq!(
        warnings,
        [
            "warning: tasks.process_chat_message.time_limit: 120s is above \
          queues.chat.time_limit 60s; the task's 120s wins (the most specific limit wins: \
          task, then queue, then runtime)"
        ]
    );
    assert_eq!(
        config.tasks["process_chat_message"].time_limit,
        Duration::from_secs(120)
    );
}

#[test]
fn a_limit_above_a_written_runtime_default_is_a_warning() {
    let (_, warnings) = ok(&format!(
        "[runtime]\ntime_limit = \"60s\"\n{QUEUE}[tasks.t]\nhandler = {{ kind = \"native\" }}\ntime_limit = \"120s\"\n"
    ));
    assert_eq!(
        warnings,
        [
            "warning: tasks.t.time_limit: 120s is above runtime.time_limit 60s; the task's 120s \
          wins (the most specific limit wins: task, then queue, then runtime)"
        ]
    );
    let (_, warnings) =
        ok("[runtime]\ntime_limit = \"60s\"\n[queues.chat]\ntime_limit = \"90s\"\n");
    assert_eq!(
        warnings,
        [
            "warning: queues.chat.time_limit: 90s is above runtime.time_limit 60s; the queue's \
          90s wins (the most specific limit wins: task, then queue, then runtime)"
        ]
    );
    // The built-in default is not something anyone wrote: no warning against it.
    let (_, warnings) = ok(&format!(
        "{QUEUE}[tasks.t]\nhandler = {{ kind = \"native\" }}\ntime_limit = \"10m\"\n"
    ));
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn an_http_timeout_above_the_hard_limit_is_a_warning() {
    let (_, warnings) = ok(r#"
        [queues.notifications]
        time_limit = "30s"
        [tasks.send_whatsapp_message_task]
        queue = "notifications"
        handler = { kind = "http", url = "http://127.0.0.1:8000/tasks/whatsapp", timeout = "45s" }
    "#);
    assert_eq!(
        warnings,
        [
            "warning: tasks.send_whatsapp_message_task.handler.timeout: 45s is above the task's \
          time_limit 30s (from queues.notifications.time_limit): the hard limit stops the \
          request first"
        ]
    );
}

#[test]
fn handler_kinds_compile() {
    let (config, _) = ok(r#"
        [queues.default]
        [pools.voice]
        command = "python"
        max = 2
        ready_pattern = "Pipeline started"
        reusable = true
        [tasks.h]
        handler = { kind = "http", url = "https://app.internal/tasks/h", timeout = "5s" }
        [tasks.e]
        handler = { kind = "exec", command = "python", args = ["-m", "jobs.e"], cwd = "/srv" }
        [tasks.n]
        handler = { kind = "native" }
        [tasks.p]
        handler = { kind = "pool", pool = "voice" }
    "#);
    assert!(
        matches!(&config.tasks["h"].handler, Handler::Http { url, timeout: Some(_) } if url.as_str() == "https://app.internal/tasks/h")
    );
    assert!(matches!(&config.tasks["e"].handler, Handler::Exec { args, .. } if args.len() == 2));
    assert!(matches!(config.tasks["n"].handler, Handler::Native));
    assert!(matches!(&config.tasks["p"].handler, Handler::Pool { pool } if pool == "voice"));
    assert_eq!(config.tasks["n"].retry.max_retries, 3);
    assert!(config.pools["voice"].spec.settings().reusable);
}

#[test]
fn concurrency_zero_is_an_error() {
    assert_eq!(
        fails("[queues.chat]\nconcurrency = 0\n"),
        ["error: queues.chat.concurrency: must be at least 1, got 0"]
    );
}

#[test]
fn events_can_be_switched_off_and_their_cap_is_checked() {
    let (config, _) = ok("[events]\nenabled = false\nmaxlen = 500\n");
    assert!(!config.events.enabled);
    assert_eq!(config.events.maxlen.get(), 500);
    assert_eq!(
        fails("[events]\nmaxlen = 0\n"),
        ["error: events.maxlen: must be at least 1, got 0"]
    );
    assert_eq!(
        fails("[events]\nenabled = \"no\"\n"),
        [
            "error: events.enabled: invalid type: string \"no\", expected a boolean (line 2, column 11)"
        ]
    );
}

#[test]
fn pool_sizes_are_checked() {
    let pool = "[pools.voice]\ncommand = \"voice-agent\"\nready_pattern = \"ready\"\n";
    assert_eq!(
        fails(&format!("{pool}max = 2\nmin_idle = 3\n")),
        ["error: pools.voice.min_idle: 3 is above max 2: the pool could never keep that many idle"]
    );
    assert_eq!(
        fails(&format!("{pool}max = 0\n")),
        ["error: pools.voice.max: must be at least 1, got 0"]
    );
    let wrong_type = fails(&format!("{pool}reusable = \"yes\"\n"));
    assert!(wrong_type[0].contains("reusable"), "{wrong_type:?}");
}

#[test]
fn exec_env_and_pass_env_are_checked_like_a_pools() {
    let task =
        "[tasks.resize_image]\nhandler = { kind = \"exec\", command = \"/usr/bin/python3\", ";
    let (config, warnings) = ok(&format!(
        "{QUEUE}{task}env = {{ PYTHONPATH = \"/srv/app\" }}, pass_env = [\"AWS_SECRET_ACCESS_KEY\"] }}\n"
    ));
    let Handler::Exec { env, pass_env, .. } = &config.tasks["resize_image"].handler else {
        panic!("not an exec handler");
    };
    assert_eq!(env["PYTHONPATH"], "/srv/app");
    assert_eq!(pass_env, &["AWS_SECRET_ACCESS_KEY"]);
    assert_eq!(
        warnings,
        [
            "warning: tasks.resize_image.handler.pass_env: environment variable \
          AWS_SECRET_ACCESS_KEY is not set: its commands run without it"
        ]
    );
    let lines = fails(&format!(
        "{QUEUE}{task}env = {{ \"BAD NAME\" = \"1\", RT_TASK_ID = \"x\" }}, \
         pass_env = [\"sk-not-a-name\", \"RT_EGRESS_TOKEN\", \"HOME\", \"HOME\"] }}\n\
         [pools.voice]\ncommand = \"/opt/voice-agent\"\nmax = 1\nready_pattern = \"ready\"\n\
         env = {{ RT_POOL = \"x\" }}\n"
    ));
    assert_eq!(
        lines,
        [
            "error: pools.voice.env.RT_POOL: RT_POOL is set by the runtime in every child; \
             choose another name",
            "error: tasks.resize_image.handler.env.BAD NAME: not a valid environment variable \
             name ([A-Za-z_][A-Za-z0-9_]*)",
            "error: tasks.resize_image.handler.env.RT_TASK_ID: RT_TASK_ID is set by the runtime \
             in every child; choose another name",
            "error: tasks.resize_image.handler.pass_env: must name an environment variable \
             ([A-Za-z_][A-Za-z0-9_]*), not hold its value",
            "error: tasks.resize_image.handler.pass_env: RT_EGRESS_TOKEN is set by the runtime \
             in every child; choose another name",
            "error: tasks.resize_image.handler.pass_env: \"HOME\" is listed more than once",
            "warning: tasks.resize_image.handler.pass_env: environment variable HOME is not set: \
             its commands run without it",
        ],
        "{lines:#?}"
    );
}

#[test]
fn pool_regexes_signals_and_env_names_are_checked() {
    let lines = fails(
        "[pools.voice]\ncommand = \"voice-agent\"\nmax = 1\nready_pattern = \"(unclosed\"\n\
         assigned_pattern = \"[\"\nstop_signal = \"TERM\"\nenv = { \"BAD NAME\" = \"1\" }\n",
    );
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(
        lines[0],
        "error: pools.voice.env.BAD NAME: not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
    );
    assert!(
        lines[1].starts_with("error: pools.voice.ready_pattern: invalid regex \"(unclosed\": ")
    );
    assert!(lines[2].starts_with("error: pools.voice.assigned_pattern: invalid regex \"[\": "));
    assert_eq!(
        lines[3],
        "error: pools.voice.stop_signal: unknown signal \"TERM\": use one of SIGTERM, SIGINT, \
         SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGKILL"
    );
}

#[test]
fn references_to_undefined_names_are_errors() {
    let lines = fails(
        r#"
        [queues.default]
        [resources.zep]
        kind = "zep"
        api_key_env = "ZEP_API_KEY"
        [tasks.t]
        handler = { kind = "pool", pool = "voice" }
        uses = ["zep", "openai"]
        link = ["notify"]
        link_error = ["t", "report_failure"]
        [schedules.nightly]
        task = "cleanup"
        every = "1h"
    "#,
    );
    assert_eq!(
        lines[..5],
        [
            "error: tasks.t.handler.pool: pool \"voice\" is not defined (no pools are defined)",
            "error: tasks.t.uses: resource \"openai\" is not defined; defined resources: zep",
            "error: tasks.t.link: task \"notify\" is not defined; defined tasks: t",
            "error: tasks.t.link_error: task \"report_failure\" is not defined; defined tasks: t",
            "error: schedules.nightly.task: task \"cleanup\" is not defined; defined tasks: t",
        ]
    );
    assert_eq!(
        lines[5..],
        [
            "warning: resources.zep.api_key_env: environment variable ZEP_API_KEY is not set: \
             calls to resource zep will fail and the tasks that use it with them",
            "warning: tasks.t.link_error: t enqueues itself: every run starts another one, forever",
        ]
    );
}

#[test]
fn duplicates_inside_lists_are_errors() {
    assert_eq!(
        fails(&format!(
            "{QUEUE}[tasks.t]\nhandler = {{ kind = \"native\" }}\nlink = [\"u\", \"u\"]\n[tasks.u]\nhandler = {{ kind = \"native\" }}\n"
        )),
        ["error: tasks.t.link: \"u\" is listed more than once"]
    );
}

#[test]
fn names_must_fit_actor_paths_and_redis_keys() {
    assert_eq!(
        fails("[queues.\"chat{1}\"]\n[queues.\"a.b\"]\n"),
        [
            "error: queues.chat{1}: name \"chat{1}\" is not usable in actor paths and Redis keys: \
             use only letters, digits, '_' and '-'",
            "error: queues.a.b: name \"a.b\" is not usable in actor paths and Redis keys: use \
             only letters, digits, '_' and '-'",
        ]
    );
}

#[test]
fn schedules_need_exactly_one_valid_trigger() {
    let base = "[queues.default]\n[tasks.t]\nhandler = { kind = \"native\" }\n[schedules.s]\ntask = \"t\"\n";
    assert_eq!(
        fails(&format!("{base}every = \"5m\"\ncron = \"0 2 * * *\"\n")),
        ["error: schedules.s: sets both `every` and `cron`: set exactly one"]
    );
    assert_eq!(
        fails(base),
        ["error: schedules.s: sets neither `every` nor `cron`: set exactly one"]
    );
    // The field at fault is named, with the values it takes.
    for (expression, expected) in [
        (
            "0 25 * * *",
            "the hour field \"25\": number out of bounds (hour is 0-23; five fields: minute \
             hour day-of-month month day-of-week)",
        ),
        (
            "61 * * * *",
            "the minute field \"61\": number out of bounds (minute is 0-59; five fields: \
             minute hour day-of-month month day-of-week)",
        ),
        (
            "0 2 * FOO *",
            "the month field \"FOO\": contains illegal character 'F' in part 'FOO' (month is \
             1-12 or JAN-DEC;",
        ),
        ("0 2 * * 9", "the day-of-week field \"9\": "),
        (
            "0 2 * *",
            "4 fields, expected five: minute hour day-of-month month day-of-week (no seconds \
             field)",
        ),
    ] {
        let lines = fails(&format!("{base}cron = \"{expression}\"\n"));
        let prefix = format!(
            "error: schedules.s.cron: invalid cron expression \"{expression}\": {expected}"
        );
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with(&prefix), "{lines:?}");
    }
    assert_eq!(
        fails(&format!(
            "{base}cron = \"0 2 * * *\"\ntimezone = \"Mars/Olympus\"\n"
        )),
        [
            "error: schedules.s.timezone: unknown time zone \"Mars/Olympus\": use an IANA name such \
          as \"UTC\" or \"Europe/Istanbul\""
        ]
    );
    assert_eq!(
        fails(&format!(
            "{base}cron = \"0 2 * * *\"\ntimezone = \"Europe/Instanbul\"\n"
        )),
        [
            "error: schedules.s.timezone: unknown time zone \"Europe/Instanbul\": did you mean \
             \"Europe/Istanbul\"?"
        ]
    );
    let (config, _) = ok(&format!(
        "{base}cron = \"0 2 * * *\"\ntimezone = \"Europe/Istanbul\"\nmissed = \"run_once\"\n"
    ));
    let schedule = &config.schedules["s"];
    assert!(matches!(
        &schedule.trigger,
        Trigger::Cron { expression, timezone, .. }
            if expression == "0 2 * * *" && *timezone == chrono_tz::Europe::Istanbul
    ));
    assert_eq!(schedule.missed, Missed::RunOnce);
}

#[test]
fn the_beat_lease_defaults_to_ten_seconds_and_must_be_positive() {
    let (config, _) = ok("[queues.default]\n");
    assert_eq!(config.beat.lease, std::time::Duration::from_secs(10));
    let (config, _) = ok("[beat]\nlease = \"3s\"\n");
    assert_eq!(config.beat.lease, std::time::Duration::from_secs(3));
    let lines = fails("[beat]\nlease = \"0s\"\n");
    assert!(lines[0].starts_with("error: beat.lease: "), "{lines:?}");
    let lines = fails("[beat]\nleese = \"3s\"\n");
    assert!(
        lines[0].starts_with("error: beat.leese: unknown key"),
        "{lines:?}"
    );
}

#[test]
fn a_missing_secret_is_a_warning_a_set_one_is_resolved_and_no_environment_skips_both() {
    let text = "[resources.openai]\nkind = \"openai\"\napi_key_env = \"OPENAI_API_KEY\"\n";
    let (_, warnings) = ok(text);
    assert_eq!(
        warnings,
        [
            "warning: resources.openai.api_key_env: environment variable OPENAI_API_KEY is not \
          set: calls to resource openai will fail and the tasks that use it with them"
        ]
    );
    let loaded = compile_env(text, &[("OPENAI_API_KEY", "sk-test")]).expect("valid");
    assert!(loaded.warnings.is_empty());
    let ResourceSettings::OpenAi(openai) = &loaded.config.resources["openai"] else {
        panic!("expected openai");
    };
    assert_eq!(openai.api_key.as_deref(), Some("sk-test"));
    assert!(
        !format!("{:?}", loaded.config).contains("sk-test"),
        "Debug leaks the key"
    );

    let loaded = compile_str(text, Environment::Ignored).expect("valid");
    assert!(loaded.warnings.is_empty());
}

#[test]
fn a_secret_value_where_its_name_belongs_is_an_error_that_does_not_echo_it() {
    let lines = fails("[resources.zep]\nkind = \"zep\"\napi_key_env = \"z_live-abc123\"\n");
    assert_eq!(
        lines,
        [
            "error: resources.zep.api_key_env: must name an environment variable \
          ([A-Za-z_][A-Za-z0-9_]*), not hold its value"
        ]
    );
}

#[test]
fn a_non_loopback_bind_needs_an_admin_token() {
    assert_eq!(
        fails("[http]\nbind = \"0.0.0.0:7070\"\n"),
        [
            "error: http.bind: 0.0.0.0:7070 is not a loopback address and http.admin_token_env is \
          not set: the mutating routes would be open to the network"
        ]
    );
    let text = "[http]\nbind = \"0.0.0.0:7070\"\nadmin_token_env = \"RT_ADMIN_TOKEN\"\n";
    assert_eq!(
        fails(text),
        [
            "error: http.admin_token_env: environment variable RT_ADMIN_TOKEN is not set and \
          http.bind 0.0.0.0:7070 is not a loopback address: the mutating routes would be open \
          to the network"
        ]
    );
    let loaded = compile_env(text, &[("RT_ADMIN_TOKEN", "hunter2")]).expect("valid");
    assert_eq!(loaded.config.http.admin_token.as_deref(), Some("hunter2"));
    assert!(!format!("{:?}", loaded.config.http).contains("hunter2"));
    // On loopback a missing token is only a warning.
    let (_, warnings) = ok("[http]\nadmin_token_env = \"RT_ADMIN_TOKEN\"\n");
    assert_eq!(
        warnings,
        [
            "warning: http.admin_token_env: environment variable RT_ADMIN_TOKEN is not set: the \
          mutating routes accept requests without a token"
        ]
    );
    assert_eq!(
        fails("[http]\nbind = \"localhost:7070\"\n"),
        ["error: http.bind: \"localhost:7070\" is not IP:PORT (e.g. \"127.0.0.1:7070\")"]
    );
}

#[test]
fn max_entry_bytes_is_an_integer_within_bounds_named_when_wrong() {
    let (config, warnings) = ok("[broker]\nmax_entry_bytes = 4194304\n");
    assert_eq!(config.broker.settings.max_entry_bytes, 4 * 1024 * 1024);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(
        ok("[broker]\nmax_entry_bytes = 1024\n")
            .0
            .broker
            .settings
            .max_entry_bytes,
        1024
    );
    let bounds = "must be from 1024 to 536870912 bytes (512 MiB, Redis' largest string)";
    assert_eq!(
        fails("[broker]\nmax_entry_bytes = 0\n"),
        [format!("error: broker.max_entry_bytes: {bounds}, got 0")]
    );
    assert_eq!(
        fails("[broker]\nmax_entry_bytes = 1023\n"),
        [format!("error: broker.max_entry_bytes: {bounds}, got 1023")]
    );
    assert_eq!(
        fails("[broker]\nmax_entry_bytes = 536870913\n"),
        [format!(
            "error: broker.max_entry_bytes: {bounds}, got 536870913"
        )]
    );
    // Not a size string, not negative, not a float: named by path with the position.
    for (value, expected) in [
        ("\"1MiB\"", "invalid type: string \"1MiB\", expected u64"),
        ("-1", "invalid value: integer `-1`, expected u64"),
        ("1.5", "invalid type: floating point `1.5`, expected u64"),
    ] {
        let lines = fails(&format!("[broker]\nmax_entry_bytes = {value}\n"));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with(&format!(
                "error: broker.max_entry_bytes: {expected} (line 2"
            )),
            "{lines:?}"
        );
    }
}

#[test]
fn the_broker_url_scheme_is_checked_and_rt_broker_url_overrides_it() {
    assert_eq!(
        fails("[broker]\nurl = \"amqp://guest:secret@rabbit//\"\n"),
        [
            "error: broker.url: unsupported broker scheme \"amqp\": use memory://, redis://, rediss:// or redis+cluster://"
        ]
    );
    let text = "[broker]\nurl = \"redis://127.0.0.1:6379/0\"\n";
    assert_eq!(ok(text).0.broker.url, "redis://127.0.0.1:6379/0");
    let loaded =
        compile_env(text, &[("RT_BROKER_URL", "rediss://:pw@cache:6380/1")]).expect("valid");
    assert_eq!(loaded.config.broker.url, "rediss://:pw@cache:6380/1");
    assert!(!format!("{:?}", loaded.config.broker).contains("pw"));
    assert_eq!(
        fails_env(text, &[("RT_BROKER_URL", "kafka://x")]),
        [
            "error: broker.url: unsupported broker scheme \"kafka\" (set by RT_BROKER_URL): use \
          memory://, redis://, rediss:// or redis+cluster://"
        ]
    );
    // --no-environment does not apply the override.
    let loaded = compile_str(text, Environment::Ignored).expect("valid");
    assert_eq!(loaded.config.broker.url, "redis://127.0.0.1:6379/0");
}

#[test]
fn rt_http_bind_overrides_http_bind_and_terminate_grace_has_a_default() {
    let text = "[http]\nbind = \"127.0.0.1:7070\"\n";
    let (config, _) = ok(text);
    assert_eq!(config.http.bind.to_string(), "127.0.0.1:7070");
    assert_eq!(config.runtime.terminate_grace, Duration::from_secs(10));
    let loaded = compile_env(text, &[("RT_HTTP_BIND", "127.0.0.1:0")]).expect("valid");
    assert_eq!(loaded.config.http.bind.to_string(), "127.0.0.1:0");
    assert_eq!(
        fails_env(text, &[("RT_HTTP_BIND", "localhost")]),
        [
            "error: http.bind: \"localhost\" (set by RT_HTTP_BIND) is not IP:PORT (e.g. \"127.0.0.1:7070\")"
        ]
    );
    // The same rule as the file's: exposed without a token is refused.
    assert!(
        fails_env(text, &[("RT_HTTP_BIND", "0.0.0.0:7070")])[0].starts_with("error: http.bind")
    );
    let loaded = compile_str(text, Environment::Ignored).expect("valid");
    assert_eq!(loaded.config.http.bind.to_string(), "127.0.0.1:7070");
    let (config, _) = ok("[runtime]\nterminate_grace = \"2s\"\n");
    assert_eq!(config.runtime.terminate_grace, Duration::from_secs(2));
}

#[test]
fn supervision_values_are_built_by_their_validating_constructors() {
    let lines = fails("[supervision]\nwithin = \"0s\"\nbackoff = \"2s\"\nbackoff_max = \"1s\"\n");
    assert_eq!(
        lines,
        [
            "error: supervision.within: restart window must be longer than zero",
            "error: supervision.backoff_max: backoff_max (1s) is below backoff (2s)",
        ]
    );
    assert_eq!(
        fails("[supervision]\njitter = 1.5\n"),
        ["error: supervision.jitter: jitter must be between 0.0 and 1.0, got 1.5"]
    );
    assert_eq!(
        fails(&format!(
            "{QUEUE}[tasks.t]\nhandler = {{ kind = \"native\" }}\nbackoff = \"2m\"\n"
        )),
        ["error: tasks.t.backoff_max: backoff_max (60s) is below backoff (120s)"]
    );
}

#[test]
fn breaker_values_are_checked() {
    let lines = fails(
        "[resources.zep]\nkind = \"zep\"\napi_key_env = \"ZEP_API_KEY\"\n\
         breaker = { failure_threshold = 0, open_for = \"10m\", probes = 0 }\n",
    );
    assert_eq!(
        lines[..3],
        [
            "error: resources.zep.breaker.failure_threshold: must be at least 1, got 0",
            "error: resources.zep.breaker.open_for_max: 300s is below open_for 600s",
            "error: resources.zep.breaker.probes: must be at least 1, got 0",
        ]
    );
}

#[test]
fn every_error_of_a_file_is_reported_in_one_pass() {
    let lines = fails(
        r#"
        [http]
        bind = "0.0.0.0:7070"
        [queues.chat]
        concurrency = 0
        [pools.voice]
        command = "voice-agent"
        max = 1
        min_idle = 2
        ready_pattern = "ready"
        [tasks.t]
        queue = "nope"
        handler = { kind = "native" }
        uses = ["zep"]
    "#,
    );
    assert_eq!(lines.len(), 5, "{lines:?}");
}

#[test]
fn celery_names_mapped_to_nothing_are_named_by_key_path() {
    let base = "[broker]\nurl = \"redis://127.0.0.1:1/0\"\n[queues.default]\n[tasks.rt_add]\nhandler = { kind = \"native\" }\n";
    let (config, _) = ok(&format!(
        "{base}[celery]\nqueues = [\"celery\"]\n[celery.tasks.\"tasks.add\"]\ntask = \"rt_add\"\ntrack_started = true\n"
    ));
    let celery = config.celery.expect("[celery]");
    let on_default = ("rt_add".to_string(), "default".to_string());
    assert_eq!(celery.tasks["tasks.add"], on_default);
    assert_eq!(
        celery.tasks["rt_add"], on_default,
        "a runtime task maps its own name"
    );
    assert_eq!(celery.track_started, ["rt_add".to_string()].into());
    assert_eq!(celery.dead_letter_queue, "default");
    assert_eq!(celery.default_queue, "celery");

    let lines = fails(&format!(
        "{base}[celery]\n[celery.tasks.\"a.b\"]\ntask = \"nope\"\n[celery.tasks.\"c.d\"]\n"
    ));
    assert_eq!(
        lines,
        [
            "error: celery.tasks.\"a.b\".task: Celery task `a.b` is mapped to nothing: task \"nope\" is not defined; defined tasks: rt_add",
            "error: celery.tasks.\"c.d\": Celery task `c.d` is mapped to nothing: task \"c.d\" is not defined; defined tasks: rt_add (set `task` to the runtime task that runs it)",
        ]
    );
    let lines = fails("[queues.default]\n[celery]\nqueues = [\"celery\"]\n");
    assert!(
        lines[0].contains("celery: the Celery bridge needs a Redis broker"),
        "{lines:?}"
    );
    let lines = fails(
        "[broker]\nurl = \"redis+cluster://127.0.0.1:7000,127.0.0.1:7001\"\n[queues.default]\n\
         [celery]\nqueues = [\"celery\"]\n",
    );
    assert!(
        lines[0].contains("celery: the Celery bridge needs a single Redis server"),
        "{lines:?}"
    );
}

#[test]
fn partitions_are_bounded_and_reach_the_broker() {
    let redis = "[broker]\nurl = \"redis://127.0.0.1:6379/0\"\n";
    let loaded = ok(&format!(
        "{redis}[queues.chat]\npartitions = 4\n[queues.default]\npartitions = 1\n"
    ))
    .0;
    assert_eq!(
        loaded.broker.settings.partitions,
        [("chat".to_string(), 4)].into(),
        "a queue of one partition is not listed"
    );
    assert_eq!(
        fails(&format!("{redis}[queues.chat]\npartitions = 65\n")),
        ["error: queues.chat.partitions: must be from 1 to 64, got 65"]
    );
    assert_eq!(
        fails(&format!("{redis}[queues.chat]\npartitions = 0\n")),
        ["error: queues.chat.partitions: must be from 1 to 64, got 0"]
    );
    let (memory, warnings) = ok("[queues.chat]\npartitions = 4\n");
    assert!(memory.broker.settings.partitions.is_empty());
    assert_eq!(
        warnings,
        [
            "warning: queues.chat.partitions: has no effect with memory:// (one node, one queue in its memory)"
        ]
    );
}

#[test]
fn replicated_acknowledgement_is_bounded_and_needs_redis() {
    let redis = "[broker]\nurl = \"redis://127.0.0.1:6379/0\"\n";
    let loaded = ok(&format!(
        "{redis}ack_replicas = 2\nack_replicas_timeout = \"250ms\"\n"
    ))
    .0;
    assert_eq!(loaded.broker.settings.ack_replicas, 2);
    assert_eq!(
        loaded.broker.settings.ack_replicas_timeout,
        std::time::Duration::from_millis(250)
    );
    assert_eq!(
        ok(redis).0.broker.settings.ack_replicas,
        0,
        "off by default"
    );
    assert_eq!(
        fails(&format!("{redis}ack_replicas = 17\n")),
        ["error: broker.ack_replicas: must be from 0 to 16, got 17"]
    );
    assert_eq!(
        fails("[broker]\nack_replicas = 1\n"),
        ["error: broker.ack_replicas: needs a Redis broker with replicas: memory:// has none"]
    );
    assert_eq!(
        fails(&format!(
            "{redis}ack_replicas = 1\nack_replicas_timeout = \"2m\"\n"
        )),
        ["error: broker.ack_replicas_timeout: must be at most 60s, got 120s"]
    );
}

#[test]
fn a_redis_cluster_url_lists_its_nodes_and_hides_its_password() {
    let text = "[broker]\nurl = \"redis+cluster://app:s3cret@10.0.0.1:7000,10.0.0.2:7000\"\n";
    let loaded = ok(text).0;
    assert_eq!(
        loaded.broker.redacted_url(),
        "redis+cluster://app@10.0.0.1:7000,10.0.0.2:7000"
    );
    assert!(!format!("{:?}", loaded.broker).contains("s3cret"));
    for (url, expected) in [
        (
            "redis+cluster://10.0.0.1",
            "node `10.0.0.1` is not HOST:PORT",
        ),
        (
            "redis+cluster://10.0.0.1:7000,:7001",
            "node `:7001` is not HOST:PORT",
        ),
        (
            "redis+cluster://10.0.0.1:7000/3",
            "a cluster has only database 0",
        ),
        ("redis+cluster://10.0.0.1:7000?x=1", "no query or fragment"),
    ] {
        let lines = fails(&format!("[broker]\nurl = \"{url}\"\n"));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with("error: broker.url: redis+cluster:// URL: "),
            "{lines:?}"
        );
        assert!(lines[0].contains(expected), "{url}: {lines:?}");
    }
}

#[test]
fn the_celery_tables_own_rules_are_the_librarys_each_named_at_its_key() {
    let base = "[broker]\nurl = \"redis://127.0.0.1:1/0\"\n[queues.default]\n";
    let lines = fails(&format!(
        "{base}[celery]\nbackend_url = \"http://x\"\nqueues = [\"celery\", \"\", \"celery\"]\nbatch = 0\nresult_ttl = \"0s\"\npoll = \"0ms\"\n"
    ));
    assert_eq!(
        lines,
        [
            "error: celery.backend_url: expected a redis:// or rediss:// URL",
            "error: celery.queues: \"celery\" is listed more than once",
            "error: celery.queues[1]: empty queue name",
            "error: celery.batch: must be at least 1, got 0",
            "error: celery.result_ttl: must be longer than zero",
            "error: celery.poll: must be longer than zero",
        ]
    );
    let lines = fails(&format!(
        "{base}[celery]\nqueues = [\"celery\"]\nbatch = 10001\nmovers = 0\npoll = \"6m\"\n"
    ));
    assert_eq!(
        lines,
        [
            "error: celery.batch: must be at most 10000, got 10001",
            "error: celery.movers: must be at least 1, got 0",
            "error: celery.poll: must be at most 5m, got 6m",
        ]
    );
    let lines = fails(&format!("{base}[celery]\nmovers = 33\n"));
    assert_eq!(lines, ["error: celery.movers: must be at most 32, got 33"]);
    let (config, _) = ok(&format!(
        "{base}[celery]\nqueues = [\"celery\"]\nbatch = 500\nmovers = 4\npoll = \"5m\"\n"
    ));
    let celery = config.celery.expect("[celery]");
    assert_eq!((celery.batch, celery.movers), (500, 4));
    assert_eq!(celery.poll, std::time::Duration::from_secs(300));
    let (config, _) = ok(&format!("{base}[celery]\nqueues = [\"celery\"]\n"));
    let celery = config.celery.expect("[celery]");
    assert_eq!(
        (celery.batch, celery.movers, celery.poll),
        (100, 2, std::time::Duration::from_secs(1)),
        "the defaults"
    );
}

#[test]
fn degrades_compiles_into_the_gates_uses_and_its_names_are_checked() {
    use actors::gate::Use;

    let (config, _) = ok(r#"
        [queues.default]
        [resources.zep]
        kind = "zep"
        api_key_env = "ZEP_API_KEY"
        [resources.openai]
        kind = "openai"
        api_key_env = "OPENAI_API_KEY"
        [tasks.chat]
        handler = { kind = "native" }
        uses = ["openai"]
        degrades = ["zep"]
    "#);
    assert_eq!(
        config.tasks["chat"].uses,
        [Use::required("openai"), Use::degradable("zep")]
    );

    let lines = fails(
        r#"
        [queues.default]
        [resources.zep]
        kind = "zep"
        api_key_env = "ZEP_API_KEY"
        [tasks.chat]
        handler = { kind = "native" }
        uses = ["zep"]
        degrades = ["zep", "memory", "memory"]
    "#,
    );
    let errors: Vec<&String> = lines.iter().filter(|l| l.starts_with("error")).collect();
    assert_eq!(
        errors,
        [
            "error: tasks.chat.degrades: \"memory\" is listed more than once",
            "error: tasks.chat.degrades: resource \"memory\" is not defined; defined resources: \
             zep",
            "error: tasks.chat.degrades: resource \"memory\" is not defined; defined resources: \
             zep",
            "error: tasks.chat.degrades: \"zep\" is also in uses: a task either waits for a \
             resource (uses) or runs without it (degrades)",
        ]
    );
    let lines = fails(
        r#"
        [queues.default]
        [tasks.chat]
        handler = { kind = "native" }
        degrades = ["zep"]
    "#,
    );
    assert_eq!(
        lines,
        ["error: tasks.chat.degrades: resource \"zep\" is not defined (no resources are defined)"]
    );
}

#[test]
fn auth_probes_default_per_kind_and_are_checked() {
    use actors::resource::auth::DEFAULT_PROBE_EVERY;

    let (config, _) = ok(r#"
        [resources.zep]
        kind = "zep"
        api_key_env = "ZEP_API_KEY"
        [resources.openai]
        kind = "openai"
        api_key_env = "OPENAI_API_KEY"
        auth_probe_path = "/models/gpt-4o-mini"
        auth_probe_every = "2m"
    "#);
    let ResourceSettings::Zep(zep) = &config.resources["zep"] else {
        panic!("zep")
    };
    assert_eq!(
        zep.auth_probe.path(),
        "/users-ordered?pageNumber=1&pageSize=1"
    );
    assert_eq!(zep.auth_probe.every(), DEFAULT_PROBE_EVERY);
    let ResourceSettings::OpenAi(openai) = &config.resources["openai"] else {
        panic!("openai")
    };
    assert_eq!(openai.auth_probe.path(), "/models/gpt-4o-mini");
    assert_eq!(openai.auth_probe.every(), Duration::from_secs(120));

    let lines = fails(
        r#"
        [resources.zep]
        kind = "zep"
        api_key_env = "ZEP_API_KEY"
        auth_probe_path = "users"
        [resources.openai]
        kind = "openai"
        api_key_env = "OPENAI_API_KEY"
        auth_probe_every = "0s"
    "#,
    );
    let errors: Vec<&String> = lines.iter().filter(|l| l.starts_with("error")).collect();
    assert_eq!(
        errors,
        [
            "error: resources.zep.auth_probe_path: must start with `/`",
            "error: resources.openai.auth_probe_every: must be longer than zero",
        ]
    );
}

#[test]
fn a_python_agent_with_a_buffered_stdout_is_a_warning() {
    let pool = |command: &str, args: &str, env: &str| {
        let text = format!(
            "[pools.voice]\ncommand = \"{command}\"\nargs = {args}\nenv = {env}\nmax = 1\n\
             ready_pattern = \"Pipeline ready\"\n"
        );
        ok(&text).1
    };
    let warned = |warnings: Vec<String>| {
        warnings.len() == 1 && warnings[0].starts_with("warning: pools.voice.env: ")
    };
    for command in [
        "python",
        "python3",
        "/usr/bin/python3.12",
        "/app/.venv/bin/python",
    ] {
        assert!(warned(pool(command, "[\"bot.py\"]", "{}")), "{command}");
    }
    // -u among the interpreter's options, bundled or not, or PYTHONUNBUFFERED: no warning.
    for args in [
        "[\"-u\", \"bot.py\"]",
        "[\"-Bu\", \"-m\", \"bot\"]",
        "[\"-X\", \"utf8\", \"-u\", \"bot.py\"]",
        "[\"-W\", \"ignore\", \"-u\", \"-m\", \"bot\"]",
    ] {
        assert_eq!(pool("python3", args, "{}"), Vec::<String>::new(), "{args}");
    }
    let set = "{ PYTHONUNBUFFERED = \"1\" }";
    assert_eq!(pool("python3", "[\"bot.py\"]", set), Vec::<String>::new());
    // A -u after the script or the module is the program's own argument, not Python's.
    assert!(warned(pool("python3", "[\"bot.py\", \"-u\"]", "{}")));
    assert!(warned(pool("python3", "[\"-m\", \"bot\", \"-u\"]", "{}")));
    assert!(warned(pool(
        "python3",
        "[\"-c\", \"import bot\", \"-u\"]",
        "{}"
    )));
    // An empty PYTHONUNBUFFERED does nothing for Python.
    assert!(warned(pool("python3", "[]", "{ PYTHONUNBUFFERED = \"\" }")));
    // Passing it through from the node's environment is trusted.
    let passed = ok(
        "[pools.voice]\ncommand = \"python3\"\npass_env = [\"PYTHONUNBUFFERED\"]\n\
                     max = 1\nready_pattern = \"ready\"\n",
    )
    .1;
    let unset = "warning: pools.voice.pass_env: environment variable PYTHONUNBUFFERED is not set";
    assert!(
        passed.len() == 1 && passed[0].starts_with(unset),
        "{passed:?}"
    );
    // Not Python.
    for command in ["node", "/usr/bin/pythonista", "python-agent"] {
        assert_eq!(pool(command, "[]", "{}"), Vec::<String>::new(), "{command}");
    }
}

#[test]
fn a_line_that_both_agent_patterns_match_is_a_warning() {
    let pool = |ready: &str, assigned: &str| {
        let text = format!(
            "[pools.voice]\ncommand = \"/opt/voice-agent\"\nmax = 1\nready_pattern = '{ready}'\n\
             assigned_pattern = '{assigned}'\n"
        );
        ok(&text).1
    };
    let overlap = |ready: &str, assigned: &str, line: &str| {
        let warnings = pool(ready, assigned);
        assert_eq!(warnings.len(), 1, "{ready} / {assigned}: {warnings:?}");
        assert!(
            warnings[0].starts_with(&format!(
                "warning: pools.voice.ready_pattern: this and assigned_pattern both match the \
                 line {line:?}: "
            )),
            "{warnings:?}"
        );
    };
    // The assignment line reads as ready, or the ready line as a confirmation.
    overlap(
        "ready",
        "Room ready for participant",
        "Room ready for participant",
    );
    overlap(
        "Pipeline ready|Connected",
        "Connected to room",
        "Connected to room",
    );
    overlap("Agent (started|ready)", "started", "Agent started");
    overlap("(?i)READY", "Pipeline ready", "Pipeline ready");
    // Distinct lines, as in the shipped voice configs: nothing to say.
    assert_eq!(pool("Pipeline ready", "Connected to"), Vec::<String>::new());
    assert_eq!(
        pool(
            "Pipeline started|LiveKit transport created|Inworld TTS service initialized",
            "Participant joined|Room joined"
        ),
        Vec::<String>::new()
    );
    assert_eq!(pool("^ready$", "ready for room \\d+"), Vec::<String>::new());
    // The blind spot README names: both match `Pipeline joined`, a line neither spells out.
    assert_eq!(pool("Pipeline \\w+", "\\w+ joined"), Vec::<String>::new());
}

#[test]
fn drain_on_shutdown_is_off_by_default_and_a_warning_with_redis() {
    let (config, warnings) = ok("");
    assert!(!config.broker.drain_on_shutdown);
    let (config, warnings_on) = ok("[broker]\ndrain_on_shutdown = true\n");
    assert!(config.broker.drain_on_shutdown);
    assert!(warnings.is_empty() && warnings_on.is_empty());
    let (_, warnings) =
        ok("[broker]\nurl = \"redis://127.0.0.1:6379/0\"\ndrain_on_shutdown = true\n");
    assert_eq!(
        warnings,
        [
            "warning: broker.drain_on_shutdown: has no effect with a Redis broker: its queues \
          outlive the node, another node (or this one, restarted) runs what is left"
        ]
    );
}

#[test]
fn http_read_timeouts_and_the_connection_cap_have_defaults_and_must_be_above_zero() {
    let (config, _) = ok("");
    assert_eq!(config.http.header_read_timeout, Duration::from_secs(10));
    assert_eq!(config.http.body_read_timeout, Duration::from_secs(30));
    assert_eq!(config.http.max_connections.get(), 512);
    let (config, _) = ok(
        "[http]\nheader_read_timeout = \"2s\"\nbody_read_timeout = \"1m\"\nmax_connections = 64\n",
    );
    assert_eq!(config.http.header_read_timeout, Duration::from_secs(2));
    assert_eq!(config.http.body_read_timeout, Duration::from_secs(60));
    assert_eq!(config.http.max_connections.get(), 64);
    assert_eq!(
        fails(
            "[http]\nheader_read_timeout = \"0s\"\nbody_read_timeout = \"0s\"\nmax_connections = 0\n"
        ),
        [
            "error: http.header_read_timeout: must be longer than zero",
            "error: http.body_read_timeout: must be longer than zero",
            "error: http.max_connections: must be at least 1, got 0",
        ]
    );
}

#[test]
fn worker_pools_compile_to_warm_pools_that_run_python_tasks() {
    let (config, warnings) = ok(r#"
        [queues.chat]
        concurrency = 4
        [workers.app]
        python = "/srv/app/.venv/bin/python"
        modules = ["chat.tasks", "memory.tasks"]
        processes = 4
        concurrency = 1
        max_tasks_per_process = 500
        memory_limit_mb = 512
        db_close = "always"
        env = { DJANGO_SETTINGS_MODULE = "mysite.settings" }
        [tasks.process_chat_message]
        queue = "chat"
        handler = { kind = "python", workers = "app" }
        [tasks.zep_write]
        queue = "chat"
        handler = { kind = "python", workers = "app", function = "memory.tasks.zep_write" }
    "#);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(matches!(
        &config.tasks["process_chat_message"].handler,
        Handler::Python { pool, function } if pool == "app" && function == "process_chat_message"
    ));
    assert!(matches!(
        &config.tasks["zep_write"].handler,
        Handler::Python { function, .. } if function == "memory.tasks.zep_write"
    ));
    let s = config.pools["app"].spec.settings();
    let w = s.worker.as_ref().expect("a worker pool");
    assert_eq!(
        (s.max, s.min_idle),
        (5, 5),
        "processes + one spare, all kept warm"
    );
    assert_eq!(s.command, "/srv/app/.venv/bin/python");
    assert_eq!(s.args, ["-u", "-m", "taskrt.worker"]);
    assert_eq!((w.capacity(), w.max_tasks_per_process), (4, Some(500)));
    assert_eq!(w.db_close, "always");
}

#[test]
fn worker_pool_mistakes_are_named() {
    let task = "[queues.default]\n[tasks.t]\nhandler = { kind = \"python\", workers = \"app\" }\n";
    assert_eq!(
        fails(task),
        ["error: tasks.t.handler.workers: worker \"app\" is not defined (no workers are defined)"]
    );
    let agent_pool = "[pools.app]\ncommand = \"agent\"\nmax = 1\nready_pattern = \"ready\"\n";
    let lines = fails(&format!("{task}{agent_pool}"));
    assert!(
        lines[0].contains("a python task runs on [workers.NAME]"),
        "{lines:?}"
    );
    let lines = fails(&format!(
        "{agent_pool}[workers.app]\nmodules = [\"tasks\"]\n"
    ));
    assert!(
        lines[0].starts_with("error: workers.app: [pools.app] has this name"),
        "{lines:?}"
    );
    let lines = fails(
        "[workers.app]\nmodules = [\"tasks\", \"my-app.tasks\"]\nprocesses = 0\nconcurrency = 0\n\
         max_tasks_per_process = 0\ndb_close = \"never\"\nenv = { RT_WORKER_MODULES = \"x\" }\n",
    );
    for expected in [
        "error: workers.app.modules: \"my-app.tasks\" is not a Python module name",
        "error: workers.app.processes: must be at least 1, got 0",
        "error: workers.app.concurrency: must be at least 1, got 0",
        "error: workers.app.max_tasks_per_process: must be at least 1, got 0",
        "error: workers.app.db_close: expected \"stale\" or \"always\", got \"never\"",
        "error: workers.app.env: RT_WORKER_MODULES is set by the pool",
    ] {
        assert!(
            lines.iter().any(|line| line == expected),
            "{expected}\n{lines:#?}"
        );
    }
    let lines = fails("[workers.app]\nmodules = []\n");
    assert_eq!(
        lines,
        ["error: workers.app.modules: name at least one module to import"]
    );
}

#[test]
fn store_result_defaults_to_true_and_can_be_turned_off() {
    let (config, warnings) = ok(r#"
        [queues.default]

        [tasks.rt_noop]
        handler = { kind = "native" }
        store_result = false

        [tasks.rt_echo]
        handler = { kind = "native" }
    "#);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(!config.tasks["rt_noop"].store_result);
    assert!(config.tasks["rt_echo"].store_result);
    let errors = fails(
        r#"
        [queues.default]

        [tasks.rt_noop]
        handler = { kind = "native" }
        store_result = "no"
    "#,
    );
    assert!(errors[0].contains("store_result"), "{errors:?}");
}
