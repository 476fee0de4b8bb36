//! `--help` of every command, through the binary: it succeeds and ends with `Examples:`, whose
//! lines run that very command and are accepted by the parser.
//!
//! The commands are walked from the parser's own tree, so a command added without an
//! example fails here.

use clap::{CommandFactory, Parser};
use runtime::cli::Cli;

/// Every command path under `command` (`["dlq", "list"]`), the root (`[]`) first.
fn paths(command: &clap::Command, prefix: &[String], out: &mut Vec<Vec<String>>) {
    out.push(prefix.to_vec());
    for sub in command.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        let mut path = prefix.to_vec();
        path.push(sub.get_name().to_string());
        paths(sub, &path, out);
    }
}

/// Splits an example line as a shell would, for what examples use: words, '…' and "…".
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word: Option<String> = None;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.get_or_insert_default().push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_default();
            }
            (None, c) if c.is_whitespace() => out.extend(word.take()),
            (None, c) => word.get_or_insert_default().push(c),
        }
    }
    assert!(quote.is_none(), "unbalanced quote in `{line}`");
    out.extend(word);
    out
}

#[test]
fn every_command_has_help_with_examples_that_parse() {
    let mut all = Vec::new();
    paths(&Cli::command(), &[], &mut all);
    assert!(all.len() > 15, "{all:?}");
    for path in all {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_runtime"))
            .args(&path)
            .arg("--help")
            .env_remove("RT_URL")
            .env_remove("RT_CONFIG")
            .output()
            .expect("run the runtime binary");
        let shown = format!("runtime {}", path.join(" "));
        let shown = shown.trim_end();
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "`{shown} --help` failed: {output:?}"
        );
        let Some((_, examples)) = help.split_once("\nExamples:\n") else {
            panic!("`{shown} --help` has no examples:\n{help}");
        };
        let examples: Vec<&str> = examples
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect();
        assert!(!examples.is_empty(), "`{shown} --help`: no example lines");
        for example in examples {
            let argv = words(example);
            assert!(
                argv.len() > path.len() && argv[0] == "runtime" && argv[1..=path.len()] == path[..],
                "`{shown} --help`: the example `{example}` is not of this command"
            );
            if let Err(err) = Cli::try_parse_from(&argv) {
                panic!("`{shown} --help`: the example `{example}` does not parse: {err}");
            }
        }
    }
}

#[test]
fn help_texts_say_what_each_option_does() {
    let help = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_runtime"))
            .args(args)
            .arg("--help")
            .output()
            .expect("run the runtime binary");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    // `dlq requeue --json` prints the requeue answer: nothing about a list.
    let requeue = help(&["dlq", "requeue"]);
    assert!(!requeue.contains("(list)"), "{requeue}");
    assert!(requeue.contains("instead of a sentence"), "{requeue}");
    // Only `inspect events` speaks of events.
    for sub in ["tree", "queues", "active", "stats", "ping"] {
        let text = help(&["inspect", sub]);
        assert!(!text.contains("event"), "inspect {sub}:\n{text}");
    }
    assert!(help(&["inspect", "events"]).contains("one event per line"));
    // --no-environment: the environment is not read and the broker is not contacted.
    let check = help(&["check"]);
    assert!(
        check.contains("read no environment variable")
            && check.contains("do not connect to the broker"),
        "{check}"
    );
}
