//! The token estimate debited from the tokens/min limiter before a call.
//!
//! OpenAI counts a request against the tokens limit as its prompt tokens plus the most it may
//! generate (`max_tokens` / `max_completion_tokens` / `max_output_tokens`). Without a
//! tokenizer the prompt is estimated at **one token per four characters** (OpenAI's own rule
//! of thumb for English) of every string in the prompt-carrying fields — `messages`, `input`,
//! `prompt`, `instructions` — rounded up, plus the generation cap when the body sets one. A
//! body that is not JSON (an audio upload) or carries none of these counts as one token. The
//! limiter clamps the estimate to its burst.

use serde_json::Value;

/// Characters per estimated token.
const CHARS_PER_TOKEN: u64 = 4;

/// Fields whose strings are prompt text.
const PROMPT_FIELDS: [&str; 4] = ["messages", "input", "prompt", "instructions"];

/// Fields capping the generated tokens (chat, newer chat models, responses API).
const CAP_FIELDS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];

/// The estimated tokens of a request body (module docs); at least 1.
pub(crate) fn estimate_tokens(body: &Value) -> u64 {
    let chars: u64 = PROMPT_FIELDS
        .iter()
        .filter_map(|field| body.get(field))
        .map(string_chars)
        .sum();
    let cap: u64 = CAP_FIELDS
        .iter()
        .filter_map(|field| body.get(field).and_then(Value::as_u64))
        .max()
        .unwrap_or(0);
    (chars.div_ceil(CHARS_PER_TOKEN) + cap).max(1)
}

/// The estimate of a raw body (the egress proxy's): JSON is estimated, anything else is 1.
pub(crate) fn estimate_raw(body: &[u8]) -> u64 {
    serde_json::from_slice::<Value>(body)
        .map(|value| estimate_tokens(&value))
        .unwrap_or(1)
}

/// Characters of every string inside `value`.
fn string_chars(value: &Value) -> u64 {
    match value {
        Value::String(s) => s.chars().count() as u64,
        Value::Array(items) => items.iter().map(string_chars).sum(),
        Value::Object(fields) => fields.values().map(string_chars).sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn messages_count_a_token_per_four_characters_plus_the_generation_cap() {
        let body = json!({
            "model": "gpt-4o-mini-a-long-model-name-that-does-not-count",
            "messages": [
                { "role": "system", "content": "Be brief." },       // 6 + 9
                { "role": "user", "content": [ { "type": "text", "text": "Hello there!" } ] }, // 4 + 4 + 12
            ],
            "max_tokens": 100,
        });
        // 35 characters → 9 tokens, + 100.
        assert_eq!(estimate_tokens(&body), 109);
        let newer = json!({ "messages": [{ "content": "abcd" }], "max_completion_tokens": 50 });
        assert_eq!(estimate_tokens(&newer), 51);
        let responses =
            json!({ "input": "abcdefgh", "instructions": "ab", "max_output_tokens": 7 });
        assert_eq!(estimate_tokens(&responses), 3 + 7);
        let embeddings = json!({ "input": ["abcd", "efgh", "i"] });
        assert_eq!(estimate_tokens(&embeddings), 3);
    }

    #[test]
    fn bodies_without_prompt_count_one_token() {
        assert_eq!(estimate_tokens(&Value::Null), 1);
        assert_eq!(estimate_tokens(&json!({ "model": "whisper-1" })), 1);
        assert_eq!(estimate_raw(b"\x00\x01 not json"), 1);
        assert_eq!(estimate_raw(br#"{"prompt": "abcdefgh"}"#), 2);
    }
}
