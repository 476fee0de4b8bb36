//! What may be shown of an outside address or error in a log line, an error or an event: a
//! URL without the secrets it can carry ([`url`]), and the one cause that says what went wrong
//! ([`innermost`]); and a duration as a config spells it ([`duration`]). The broker's URL and the `http` handler's go through here, and so do the
//! resources' when a call gets no answer.

/// `redis://user:secret@host:6379/0?x=y` → `redis://user@host:6379/0`,
/// `http://token@app:8000/hook?key=k` → `http://app:8000/hook`: no password (a lone user name
/// counts as one, as Redis takes it), no query string (where a password or an API key can be
/// given too: `?password=…`, `?key=…`), no fragment.
pub fn url(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or_default();
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        None => url.to_string(),
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) if !user.is_empty() => format!("{scheme}://{user}@{host}{path}"),
            // `redis://secret@host` and `redis://:secret@host`: the part before `@` is a
            // password.
            _ => format!("{scheme}://{host}{path}"),
        },
    }
}

/// The last error in `err`'s source chain: `Connection refused (os error 111)` rather than
/// `error sending request for url …`, `Invalid chunk size line: Invalid Size` rather than
/// `error reading a body from connection`.
pub fn innermost(err: &(dyn std::error::Error + 'static)) -> String {
    let mut last = err;
    while let Some(source) = last.source() {
        last = source;
    }
    last.to_string()
}

/// Why a request to `url` got no answer, naming the URL without its secrets:
/// `cannot connect to http://app:8000/internal/tasks/x: Connection refused (os error 111)`,
/// `request to … timed out`, `request to … failed: …`.
pub fn no_answer(err: &reqwest::Error, url: &str) -> String {
    let shown = self::url(url);
    if err.is_timeout() {
        format!("request to {shown} timed out")
    } else if err.is_connect() {
        format!("cannot connect to {shown}: {}", innermost(err))
    } else {
        // reqwest's own text names the whole URL (query included): only its cause is kept.
        format!("request to {shown} failed: {}", innermost(err))
    }
}

/// A duration as a config spells it: `600s`, `250ms`, `1.5s` (not `10m`: the unit stays the
/// one a reader compares with).
pub fn duration(duration: std::time::Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{}s", duration.as_secs())
    } else if duration.subsec_nanos() % 1_000_000 == 0 {
        format!("{}ms", duration.as_millis())
    } else {
        format!("{}s", duration.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords_queries_and_fragments() {
        assert_eq!(url("redis://127.0.0.1:6380/0"), "redis://127.0.0.1:6380/0");
        assert_eq!(
            url("redis://worker:s3cret@redis.internal:6379/2"),
            "redis://worker@redis.internal:6379/2"
        );
        assert_eq!(url("redis://:s3cret@h:1"), "redis://h:1");
        assert_eq!(url("rediss://s3cret@h:1/"), "rediss://h:1/");
        assert_eq!(
            url("redis+unix:///run/redis.sock?db=1&pass=s3cret"),
            "redis+unix:///run/redis.sock"
        );
        assert_eq!(
            url("https://t0k3n@app.internal:8443/hook?api_key=s3cret#frag"),
            "https://app.internal:8443/hook"
        );
        assert_eq!(url("not a url?key=s3cret"), "not a url");
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_url_without_its_secrets() {
        let target = "http://user:s3cret@127.0.0.1:9/internal/tasks/x?token=s3cret";
        let err = reqwest::Client::new()
            .post(target)
            .send()
            .await
            .unwrap_err();
        let said = no_answer(&err, target);
        assert!(
            said.starts_with("cannot connect to http://user@127.0.0.1:9/internal/tasks/x: "),
            "{said}"
        );
        assert!(!said.contains("s3cret"), "{said}");
    }
}
