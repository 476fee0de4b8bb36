//! OpenAI client and limiter (being written).
