//! Native handlers: Rust async functions registered by name through the library API
//! ([`Natives::register`]), and the built-in ones every `runtime` binary has (`rt_noop`,
//! `rt_echo`, `rt_sleep`, `rt_fail`) for smoke tests, benchmarks and chaos runs.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::{Attempt, ErrorClass, Handler, TaskContext, TaskError};
use crate::caps::{self, MAX_DELAY, Unit};

type NativeFn = Arc<dyn Fn(TaskContext) -> Attempt + Send + Sync>;

/// Registered native functions, by task name.
#[derive(Clone, Default)]
pub struct Natives {
    fns: HashMap<String, NativeFn>,
}

impl fmt::Debug for Natives {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.fns.keys().collect();
        names.sort();
        f.debug_struct("Natives").field("names", &names).finish()
    }
}

impl Natives {
    /// The built-in functions: `rt_noop` (returns null), `rt_add` (the sum of its numeric
    /// `args`), `rt_echo` (returns `{args, kwargs}`),
    /// `rt_sleep` (`kwargs.ms`; stops early at the soft limit unless `kwargs.ignore_soft`),
    /// `rt_fail` (`kwargs.permanent`, `kwargs.message`, `kwargs.retry_after_ms`: at most
    /// [`MAX_DELAY`], a longer one is cut to it).
    pub fn builtin() -> Self {
        let mut natives = Self::default();
        natives.register("rt_noop", |_| async { Ok(Value::Null) });
        natives.register("rt_add", |ctx| async move {
            let numbers: Option<Vec<f64>> = ctx.envelope.args.iter().map(Value::as_f64).collect();
            let Some(numbers) = numbers else {
                return Err(TaskError::Permanent(
                    "rt_add: every argument must be a number".into(),
                ));
            };
            let ints = ctx.envelope.args.iter().all(|a| a.is_i64());
            Ok(if ints {
                json!(
                    ctx.envelope
                        .args
                        .iter()
                        .filter_map(Value::as_i64)
                        .sum::<i64>()
                )
            } else {
                json!(numbers.iter().sum::<f64>())
            })
        });
        natives.register("rt_echo", |ctx| async move {
            Ok(json!({ "args": ctx.envelope.args, "kwargs": ctx.envelope.kwargs }))
        });
        natives.register("rt_sleep", |ctx| async move {
            let kwargs = &ctx.envelope.kwargs;
            let ms = kwargs.get("ms").and_then(Value::as_u64).unwrap_or(0);
            let ignore_soft = kwargs.get("ignore_soft").and_then(Value::as_bool) == Some(true);
            let sleep = tokio::time::sleep(Duration::from_millis(ms));
            if ignore_soft {
                sleep.await;
            } else {
                tokio::select! {
                    () = sleep => {}
                    () = ctx.soft.cancelled() => {
                        return Err(TaskError::Cancelled("soft time limit".into()));
                    }
                }
            }
            Ok(json!({ "slept_ms": ms }))
        });
        natives.register("rt_fail", |ctx| async move {
            let kwargs = &ctx.envelope.kwargs;
            let message = kwargs
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("rt_fail")
                .to_string();
            if kwargs.get("permanent").and_then(Value::as_bool) == Some(true) {
                return Err(TaskError::Permanent(message));
            }
            let after = kwargs
                .get("retry_after_ms")
                .and_then(Value::as_f64)
                .and_then(|ms| caps::capped("retry_after_ms", ms, Unit::Millis, MAX_DELAY));
            Err(TaskError::Retry {
                reason: message,
                after,
                class: ErrorClass::Native,
            })
        });
        natives
    }

    /// Registers `f` as the handler of the task named `name` (replacing any earlier one).
    pub fn register<F, Fut>(&mut self, name: &str, f: F)
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
    {
        self.fns
            .insert(name.to_string(), Arc::new(move |ctx| Box::pin(f(ctx))));
    }

    /// The handler of `name`, if registered.
    pub fn handler(&self, name: &str) -> Option<Arc<dyn Handler>> {
        self.fns.get(name).map(|f| {
            Arc::new(NativeHandler {
                name: name.to_string(),
                f: Arc::clone(f),
            }) as Arc<dyn Handler>
        })
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.fns.contains_key(name)
    }
}

/// A registered native function as a [`Handler`].
struct NativeHandler {
    name: String,
    f: NativeFn,
}

impl fmt::Debug for NativeHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NativeHandler")
            .field("name", &self.name)
            .finish()
    }
}

impl Handler for NativeHandler {
    fn call(&self, ctx: TaskContext) -> Attempt {
        (self.f)(ctx)
    }

    fn kind(&self) -> &'static str {
        "native"
    }
}
