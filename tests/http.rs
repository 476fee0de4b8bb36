//! The router as a function (`tower::ServiceExt::oneshot`) over a real supervision tree:
//! health reasons, bearer-token checks on mutating routes, JSON errors.

use std::sync::Arc;
use std::time::Duration;

use actors::heartbeat::{HeartbeatActor, HeartbeatArgs};
use actors::supervisor::{
    Backoff, ChildSpec, Intensity, Restart, Strategy, SupervisorSpec, start_root,
};
use actors::tree::Tree;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use runtime::http::{AppState, app};
use tower::ServiceExt;

/// A root with one heartbeat child whose restarts wait `backoff`.
async fn tree(backoff: Duration) -> Arc<Tree> {
    let tree = Tree::new();
    let heartbeat = ChildSpec::new("heartbeat", "heartbeat", Restart::Permanent, |node| {
        (
            HeartbeatActor,
            HeartbeatArgs {
                node,
                interval: Duration::from_secs(1),
                node_started: tokio::time::Instant::now(),
            },
        )
    });
    let spec = SupervisorSpec {
        strategy: Strategy::OneForOne,
        intensity: Intensity::try_new(5, Duration::from_secs(10)).unwrap(),
        backoff: Backoff::try_new(backoff, backoff, 0.0).unwrap(),
        shutdown_timeout: Duration::from_secs(1),
        children: vec![heartbeat],
    };
    start_root(&tree, "root", spec).await.unwrap();
    tree
}

async fn send(
    state: &AppState,
    method: &str,
    uri: &str,
    token: Option<&str>,
) -> (StatusCode, String) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = app(state.clone())
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn health_is_503_with_the_reason_while_a_permanent_actor_is_down() {
    let state = AppState {
        tree: tree(Duration::from_secs(30)).await,
        admin_token: None,
        chaos: true,
    };
    assert_eq!(send(&state, "GET", "/health", None).await.0, StatusCode::OK);
    let (status, _) = send(&state, "POST", "/chaos/kill/root/heartbeat", None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, body) = send(&state, "GET", "/health", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(
        body["problems"][0],
        "root/heartbeat is restarting: stopped: killed"
    );
}

#[tokio::test]
async fn mutating_routes_need_the_bearer_token_when_one_is_configured() {
    let state = AppState {
        tree: tree(Duration::from_millis(5)).await,
        admin_token: Some(Arc::from("s3cret-token")),
        chaos: true,
    };
    let (status, body) = send(&state, "POST", "/chaos/kill/heartbeat", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, r#"{"error":"missing or wrong bearer token"}"#);
    let (status, _) = send(
        &state,
        "POST",
        "/chaos/kill/heartbeat",
        Some("s3cret-tokeN"),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = send(
        &state,
        "POST",
        "/chaos/kill/heartbeat",
        Some("s3cret-token"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body, r#"{"killed":"root/heartbeat"}"#);
    // Reading needs no token.
    assert_eq!(send(&state, "GET", "/actors", None).await.0, StatusCode::OK);
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_answer_json_errors() {
    let state = AppState {
        tree: tree(Duration::from_millis(5)).await,
        admin_token: None,
        chaos: false,
    };
    let (status, body) = send(&state, "GET", "/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, r#"{"error":"no such route"}"#);
    let (status, _) = send(&state, "POST", "/chaos/kill/heartbeat", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = send(&state, "DELETE", "/actors", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}
