//! Fake upstreams on loopback: apps, Zep, OpenAI-like APIs. Each serves on `127.0.0.1:0` for as
//! long as the test's runtime lives.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use axum::routing::any;

/// A loopback port free a moment ago (bound, then released): for a child that must be told
/// its port, or as a place where nothing listens.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Serves `router` on a free loopback port; its address.
pub async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// One request as an [`Upstream`] received it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: Method,
    /// The request target as sent (path and query).
    pub uri: Uri,
    /// Every header in the order sent (lower-case names, values as lossy UTF-8).
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Request {
    /// The first value of header `name` (lower case), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The request target as sent (`/path?query`).
    pub fn target(&self) -> String {
        self.uri.to_string()
    }
}

/// A fake upstream that answers every request (any method, any path) with its script, counts
/// the requests and keeps them in order.
#[derive(Clone, Default)]
pub struct Upstream {
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Request>>>,
}

impl Upstream {
    /// Serves on loopback, answering each request with `script(request)`; its base URL
    /// (`http://127.0.0.1:PORT`).
    pub async fn start<F, Fut>(&self, script: F) -> String
    where
        F: Fn(Request) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        let me = self.clone();
        let router = Router::new().fallback(any(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let me = me.clone();
                let script = script.clone();
                async move {
                    let request = Request {
                        method,
                        uri,
                        headers: headers
                            .iter()
                            .map(|(k, v)| {
                                (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into())
                            })
                            .collect(),
                        body: String::from_utf8_lossy(&body).into_owned(),
                    };
                    me.calls.fetch_add(1, Ordering::SeqCst);
                    me.seen.lock().unwrap().push(request.clone());
                    script(request).await
                }
            },
        ));
        format!("http://{}", serve(router).await)
    }

    /// How many requests it received.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The requests it received, in order.
    pub fn seen(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }
}
