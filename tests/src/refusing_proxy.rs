//! An HTTP proxy in front of Elasticsearch that refuses one kind of request while it is told
//! to: `_bulk` answered 429 as an overloaded cluster answers it, everything else (`_mget`,
//! searches) passed through. A test sees what a service does when writes fail and reads work.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;

pub struct BulkRefusingProxy {
    refuse: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    /// `http://host:port` of the proxy.
    pub url: String,
}

#[derive(Clone)]
struct Shared {
    target: String,
    http: reqwest::Client,
    refuse: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
}

impl BulkRefusingProxy {
    /// A proxy on a free port in front of `target` (`http://host:port`), passing everything.
    pub async fn start(target: &str) -> Self {
        let shared = Shared {
            target: target.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
            refuse: Arc::new(AtomicBool::new(false)),
            refused: Arc::new(AtomicU64::new(0)),
        };
        let (refuse, refused) = (shared.refuse.clone(), shared.refused.clone());
        let app = Router::new().fallback(forward).with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy listens");
        let url = format!("http://{}", listener.local_addr().expect("proxy address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            refuse,
            refused,
            url,
        }
    }

    /// From now on `_bulk` is answered 429 (`true`) or passed through (`false`).
    pub fn refuse_bulk(&self, refuse: bool) {
        self.refuse.store(refuse, Ordering::SeqCst);
    }

    /// How many `_bulk` requests were refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }
}

async fn forward(
    axum::extract::State(shared): axum::extract::State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if uri.path().ends_with("/_bulk") && shared.refuse.load(Ordering::SeqCst) {
        shared.refused.fetch_add(1, Ordering::SeqCst);
        let body = r#"{"error":{"type":"es_rejected_execution_exception","reason":"rejected execution of coordinating operation"},"status":429}"#;
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("content-type", "application/json")],
            body,
        )
            .into_response();
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = shared
        .http
        .request(method, format!("{}{path}", shared.target))
        .body(body);
    for (name, value) in &headers {
        if name != "host" && name != "content-length" {
            request = request.header(name, value);
        }
    }
    match request.send().await {
        Ok(answer) => {
            let status =
                StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let content_type = answer
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/json")
                .to_string();
            let bytes = answer.bytes().await.unwrap_or_default();
            (status, [("content-type", content_type)], Body::from(bytes)).into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}
