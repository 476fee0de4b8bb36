//! Unit tests of the breaker state machine, every transition under paused tokio time (no
//! sleeping: `advance` moves the clock).

use std::time::{Duration, SystemTime};

use tokio::time::advance;

use super::*;

const OPEN_FOR: Duration = Duration::from_secs(10);

fn settings() -> BreakerSettings {
    BreakerSettings {
        failure_threshold: 3,
        failure_rate: None,
        open_for: OPEN_FOR,
        open_for_max: Duration::from_secs(35),
        probes: 2,
        probe_timeout: Duration::from_secs(2),
        slow_call: None,
    }
}

fn breaker(settings: BreakerSettings) -> Breaker {
    Breaker::new("zep", BreakerPolicy::try_new(settings).unwrap())
}

fn fail_n(breaker: &Breaker, n: u32) {
    for _ in 0..n {
        breaker.try_acquire().unwrap().fail();
    }
}

/// Drives a fresh breaker to open (threshold failures).
fn opened(settings: BreakerSettings) -> Breaker {
    let breaker = breaker(settings);
    fail_n(&breaker, settings.failure_threshold);
    assert_eq!(breaker.state(), BreakerState::Open);
    breaker
}

#[test]
fn invalid_policies_cannot_be_built_and_name_their_field() {
    let cases: Vec<(&str, BreakerSettings)> = vec![
        (
            "failure_threshold",
            BreakerSettings {
                failure_threshold: 0,
                ..settings()
            },
        ),
        (
            "open_for",
            BreakerSettings {
                open_for: Duration::ZERO,
                ..settings()
            },
        ),
        (
            "open_for_max",
            BreakerSettings {
                open_for_max: Duration::from_secs(1),
                ..settings()
            },
        ),
        (
            "probes",
            BreakerSettings {
                probes: 0,
                ..settings()
            },
        ),
        (
            "probe_timeout",
            BreakerSettings {
                probe_timeout: Duration::ZERO,
                ..settings()
            },
        ),
        (
            "slow_call",
            BreakerSettings {
                slow_call: Some(Duration::ZERO),
                ..settings()
            },
        ),
        (
            "failure_rate.rate",
            BreakerSettings {
                failure_rate: Some(FailureRate {
                    rate: 1.5,
                    window: 10,
                    min_calls: 5,
                }),
                ..settings()
            },
        ),
        (
            "failure_rate.rate",
            BreakerSettings {
                failure_rate: Some(FailureRate {
                    rate: f64::NAN,
                    window: 10,
                    min_calls: 5,
                }),
                ..settings()
            },
        ),
        (
            "failure_rate.window",
            BreakerSettings {
                failure_rate: Some(FailureRate {
                    rate: 0.5,
                    window: 0,
                    min_calls: 0,
                }),
                ..settings()
            },
        ),
        (
            "failure_rate.min_calls",
            BreakerSettings {
                failure_rate: Some(FailureRate {
                    rate: 0.5,
                    window: 10,
                    min_calls: 11,
                }),
                ..settings()
            },
        ),
    ];
    for (field, bad) in cases {
        let errors = BreakerPolicy::try_new(bad).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let err = &errors[0];
        assert_eq!(err.field, field, "{err}");
        assert!(err.to_string().starts_with(field), "{err}");
    }
    assert!(BreakerPolicy::try_new(settings()).is_ok());
}

#[tokio::test(start_paused = true)]
async fn closed_opens_after_threshold_consecutive_failures_and_a_success_resets_the_count() {
    let breaker = breaker(settings());
    fail_n(&breaker, 2);
    breaker.try_acquire().unwrap().succeed();
    fail_n(&breaker, 2);
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(breaker.snapshot()["consecutive_failures"], 2);
    assert_eq!(breaker.next_probe_at(), None);
    fail_n(&breaker, 1);
    assert_eq!(breaker.state(), BreakerState::Open);
    let snapshot = breaker.snapshot();
    assert_eq!(snapshot["state"], "open");
    assert_eq!(snapshot["consecutive_failures"], 3);
    assert_eq!(snapshot["transitions"], 1);
    assert_eq!(snapshot["time_until_half_open_ms"], 10_000);
    assert_eq!(snapshot["last_reason"], "3 consecutive failures");
    assert!(snapshot["last_transition"].is_string());
}

#[tokio::test(start_paused = true)]
async fn open_rejects_with_the_time_left_and_counts_rejections() {
    let breaker = opened(settings());
    advance(Duration::from_secs(4)).await;
    let rejected = breaker.try_acquire().unwrap_err();
    assert_eq!(rejected.retry_after, Duration::from_secs(6));
    assert!(breaker.try_acquire().is_err());
    let snapshot = breaker.snapshot();
    assert_eq!(snapshot["rejected"], 2);
    assert_eq!(snapshot["time_until_half_open_ms"], 6_000);
    let next = breaker.next_probe_at().unwrap();
    let left = next.duration_since(SystemTime::now()).unwrap();
    assert!(
        left > Duration::from_millis(5_900) && left <= Duration::from_secs(6),
        "{left:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_probes_calls_and_closes_when_all_succeed() {
    let breaker = opened(settings());
    advance(OPEN_FOR).await;
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    assert_eq!(breaker.next_probe_at(), None, "a probe slot is free");
    let first = breaker.try_acquire().unwrap();
    let second = breaker.try_acquire().unwrap();
    assert!(first.is_probe() && second.is_probe());
    // Every slot taken: refused until the earliest probe deadline.
    let rejected = breaker.try_acquire().unwrap_err();
    assert_eq!(rejected.retry_after, Duration::from_secs(2));
    assert!(breaker.next_probe_at().is_some());
    first.succeed();
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    second.succeed();
    assert_eq!(breaker.state(), BreakerState::Closed);
    let snapshot = breaker.snapshot();
    assert_eq!(snapshot["transitions"], 3, "closed→open→half_open→closed");
    assert_eq!(snapshot["consecutive_failures"], 0);
    assert_eq!(snapshot["consecutive_opens"], 0);
    // What /metrics reads: one transition into each state, the one refused call.
    let stats = breaker.stats();
    assert_eq!(stats.state, BreakerState::Closed);
    assert_eq!(
        stats.transitions,
        [
            (BreakerState::Closed, 1),
            (BreakerState::Open, 1),
            (BreakerState::HalfOpen, 1)
        ]
    );
    assert_eq!(stats.rejected, 1);
    let permit = breaker.try_acquire().unwrap();
    assert!(!permit.is_probe());
    permit.succeed();
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_for_twice_as_long_up_to_the_cap_and_closing_resets_it() {
    let breaker = opened(settings());
    let mut expected = [20, 35, 35].into_iter();
    let mut open_for = OPEN_FOR;
    for _ in 0..3 {
        advance(open_for).await;
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        breaker.try_acquire().unwrap().fail();
        assert_eq!(breaker.state(), BreakerState::Open);
        open_for = Duration::from_secs(expected.next().unwrap());
        assert_eq!(
            breaker.try_acquire().unwrap_err().retry_after,
            open_for,
            "open time grows ×2, capped at open_for_max"
        );
        assert_eq!(
            breaker.snapshot()["last_reason"],
            "a half-open probe failed"
        );
    }
    advance(open_for).await;
    breaker.try_acquire().unwrap().succeed();
    breaker.try_acquire().unwrap().succeed();
    assert_eq!(breaker.state(), BreakerState::Closed);
    fail_n(&breaker, 3);
    assert_eq!(
        breaker.try_acquire().unwrap_err().retry_after,
        OPEN_FOR,
        "a fresh opening after a close starts again at open_for"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hanging_probe_reopens_the_breaker_at_its_timeout_and_its_late_answer_is_ignored() {
    let breaker = opened(settings());
    advance(OPEN_FOR).await;
    let hanging = breaker.try_acquire().unwrap();
    assert_eq!(
        hanging.deadline(),
        Some(Instant::now() + Duration::from_secs(2))
    );
    advance(Duration::from_millis(1_999)).await;
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    advance(Duration::from_millis(1)).await;
    // Nobody answered, nobody holds a lock: the next look re-opens it, dated at the deadline.
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(
        breaker.try_acquire().unwrap_err().retry_after,
        Duration::from_secs(20)
    );
    assert!(
        breaker.snapshot()["last_reason"]
            .as_str()
            .unwrap()
            .contains("outlived its timeout")
    );
    // The probe finally answers: too late, it moves nothing.
    hanging.succeed();
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(breaker.snapshot()["stale_results"], 1);
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_probe_seen_late_reopens_from_its_deadline_not_from_the_look() {
    let breaker = opened(settings());
    advance(OPEN_FOR).await;
    let _hanging = breaker.try_acquire().unwrap();
    // Nobody looks for 5 s: the probe expired at +2 s, so the re-opening (20 s) ends at +22 s.
    advance(Duration::from_secs(5)).await;
    assert_eq!(
        breaker.try_acquire().unwrap_err().retry_after,
        Duration::from_secs(17)
    );
    // And a breaker nobody looked at for a long time is found half-open at once.
    advance(Duration::from_secs(60)).await;
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_permit_counts_as_a_failure() {
    let breaker = breaker(settings());
    for _ in 0..3 {
        drop(breaker.try_acquire().unwrap());
    }
    assert_eq!(breaker.state(), BreakerState::Open);
    advance(OPEN_FOR).await;
    let probe = breaker.try_acquire().unwrap();
    drop(probe);
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(breaker.snapshot()["failures"], 4);
}

#[tokio::test(start_paused = true)]
async fn the_failure_rate_rule_opens_once_enough_calls_are_in_the_window() {
    let breaker = breaker(BreakerSettings {
        failure_threshold: 100,
        failure_rate: Some(FailureRate {
            rate: 0.5,
            window: 6,
            min_calls: 4,
        }),
        ..settings()
    });
    // Two of three failed (67 %) but only three calls: below min_calls.
    breaker.try_acquire().unwrap().fail();
    breaker.try_acquire().unwrap().succeed();
    breaker.try_acquire().unwrap().fail();
    assert_eq!(breaker.state(), BreakerState::Closed);
    let rate = breaker.snapshot()["failure_rate"].as_f64().unwrap();
    assert!((rate - 2.0 / 3.0).abs() < 1e-9, "{rate}");
    breaker.try_acquire().unwrap().succeed();
    // 2 of 4 = 50 %, but the rule is checked when a failure arrives.
    assert_eq!(
        breaker.state(),
        BreakerState::Closed,
        "a success never opens"
    );
    breaker.try_acquire().unwrap().fail();
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(
        breaker.snapshot()["last_reason"],
        "3 of the last 5 calls failed"
    );
}

#[tokio::test(start_paused = true)]
async fn the_rate_window_forgets_old_calls() {
    let breaker = breaker(BreakerSettings {
        failure_threshold: 100,
        failure_rate: Some(FailureRate {
            rate: 0.5,
            window: 4,
            min_calls: 4,
        }),
        ..settings()
    });
    // F F S S S S F: when the last failure arrives the window holds S S S F (25 %).
    for fail in [true, true, false, false, false, false, true] {
        let permit = breaker.try_acquire().unwrap();
        if fail {
            permit.fail()
        } else {
            permit.succeed()
        }
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(breaker.snapshot()["window_calls"], 4);
}

#[tokio::test(start_paused = true)]
async fn slow_successes_count_as_failures_when_slow_call_is_set() {
    let breaker = breaker(BreakerSettings {
        failure_threshold: 2,
        slow_call: Some(Duration::from_millis(500)),
        ..settings()
    });
    let permit = breaker.try_acquire().unwrap();
    advance(Duration::from_millis(500)).await;
    permit.succeed();
    assert_eq!(
        breaker.snapshot()["consecutive_failures"],
        0,
        "exactly slow_call is not slow"
    );
    for _ in 0..2 {
        let permit = breaker.try_acquire().unwrap();
        advance(Duration::from_millis(501)).await;
        permit.succeed();
    }
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(breaker.snapshot()["slow_calls"], 2);
    // A slow probe re-opens too.
    advance(OPEN_FOR).await;
    let probe = breaker.try_acquire().unwrap();
    advance(Duration::from_millis(600)).await;
    probe.succeed();
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(
        breaker.snapshot()["last_reason"],
        "a half-open probe was slower than slow_call"
    );
}

#[tokio::test(start_paused = true)]
async fn results_of_calls_started_before_a_transition_move_nothing() {
    let breaker = breaker(BreakerSettings {
        failure_threshold: 1,
        ..settings()
    });
    let early = breaker.try_acquire().unwrap();
    let late_failure = breaker.try_acquire().unwrap();
    early.fail();
    assert_eq!(breaker.state(), BreakerState::Open);
    advance(OPEN_FOR).await;
    let probe = breaker.try_acquire().unwrap();
    // A call from the closed period fails now: it must not re-open the half-open breaker.
    late_failure.fail();
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    probe.succeed();
    breaker.try_acquire().unwrap().succeed();
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(breaker.snapshot()["stale_results"], 1);
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_state() {
    let breaker = breaker(settings());
    let other = breaker.clone();
    fail_n(&other, 3);
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(breaker.name(), "zep");
}

#[tokio::test(start_paused = true)]
async fn transitions_are_put_on_the_events_stream() {
    let (sink, mut events) = EventSink::channel(16);
    let breaker = breaker(settings());
    breaker.attach_events(sink);
    fail_n(&breaker, 3);
    advance(OPEN_FOR).await;
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    breaker.try_acquire().unwrap().succeed();
    breaker.try_acquire().unwrap().succeed();
    assert_eq!(breaker.state(), BreakerState::Closed);
    let mut got = Vec::new();
    while let Ok(event) = events.try_recv() {
        got.push(event);
    }
    let kinds: Vec<&str> = got.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["breaker_opened", "breaker_half_opened", "breaker_closed"]
    );
    let opened = &got[0].detail;
    assert_eq!(opened["resource"], "zep");
    assert_eq!(opened["from"], "closed");
    assert_eq!(opened["to"], "open");
    assert_eq!(opened["reason"], "3 consecutive failures");
    assert_eq!(opened["open_for_ms"], 10_000);
    assert_eq!(got[1].detail["from"], "open");
    assert_eq!(got[2].detail["to"], "closed");
    assert_eq!(got[0].task_id, None);
}
