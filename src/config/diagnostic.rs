//! Diagnostics: one error or warning about a config, named by the key path it is about.
//!
//! Printed one per line as `error: <key.path>: <message>` or `warning: <key.path>: <message>`
//! — by `runtime check`, and by [`ConfigError`](super::ConfigError)'s `Display`.

use std::fmt;

/// Whether a diagnostic stops the config from being used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The config cannot be used.
    Error,
    /// The config can be used, but probably does not do what its author meant.
    Warning,
}

/// One problem found in a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// What it is about: a dotted key path (`tasks.process_chat_message.soft_time_limit`), a
    /// `line L, column C` position for a TOML syntax error, or the file for a read error.
    pub path: String,
    /// What is wrong, in one line.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{severity}: {}: {}", self.path, self.message)
    }
}

/// Every error and warning found in one pass over a config, errors kept apart from warnings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics {
    /// Problems that stop the config from being used.
    pub errors: Vec<Diagnostic>,
    /// Problems worth a look that do not stop it.
    pub warnings: Vec<Diagnostic>,
}

impl Diagnostics {
    /// Records an error about `path`.
    pub fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(Diagnostic {
            severity: Severity::Error,
            path: path.into(),
            message: message.into(),
        });
    }

    /// Records a warning about `path`.
    pub fn warning(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Diagnostic {
            severity: Severity::Warning,
            path: path.into(),
            message: message.into(),
        });
    }

    /// Errors first, then warnings: the order in which they are printed.
    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.errors.iter().chain(&self.warnings)
    }
}

impl fmt::Display for Diagnostics {
    /// One diagnostic per line, errors first.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

/// The candidate closest to `written`, when it is close enough to be a slip of the keyboard:
/// at most one edit per three characters (a transposition is one edit). Names shorter than
/// three characters, or longer than 128 (the comparison is quadratic), get no suggestion.
pub(crate) fn did_you_mean<'a>(
    written: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    const LONGEST: usize = 128;
    let length = written.chars().count();
    if !(3..=LONGEST).contains(&length) {
        return None;
    }
    let allowed = length / 3;
    candidates
        .into_iter()
        .filter(|candidate| *candidate != written)
        .filter(|candidate| candidate.chars().count().abs_diff(length) <= allowed)
        .map(|candidate| (strsim::osa_distance(written, candidate), candidate))
        .filter(|(distance, _)| *distance <= allowed)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

#[cfg(test)]
mod tests {
    use super::did_you_mean;

    #[test]
    fn close_names_are_suggested_and_far_ones_are_not() {
        let keys = ["concurrency", "prefetch", "time_limit", "soft_time_limit"];
        assert_eq!(did_you_mean("concurency", keys), Some("concurrency"));
        assert_eq!(did_you_mean("tiem_limit", keys), Some("time_limit"));
        assert_eq!(did_you_mean("soft_limit", keys), None);
        assert_eq!(did_you_mean("chta", ["chat", "background"]), Some("chat"));
        assert_eq!(did_you_mean("x", ["chat"]), None);
        assert_eq!(did_you_mean("w", ["t", "u"]), None);
        assert_eq!(did_you_mean("", ["a"]), None);
        assert_eq!(did_you_mean(&"a".repeat(1000), ["a"]), None);
    }
}
