//! An HTTP proxy that refuses one kind of request while it is told to, and passes everything
//! else: a test sees what a service does when one call of a dependency fails and the others
//! work. Two kinds are built in: Elasticsearch's `_bulk` answered 429 as an overloaded
//! cluster answers it ([`RefusingProxy::elasticsearch_bulk`]), and S3 `PUT`s answered 503
//! `SlowDown` ([`RefusingProxy::s3_puts`]). [`RefusingProxy::pass_next`] lets a number of
//! matching requests through before refusing again, so that a test can let one upload of a
//! unit in and refuse the rest.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;

/// Which requests are refused, and with what answer.
#[derive(Clone, Copy)]
struct Refusal {
    matches: fn(&Method, &str) -> bool,
    status: StatusCode,
    content_type: &'static str,
    body: &'static str,
}

pub struct RefusingProxy {
    refuse: Arc<AtomicBool>,
    passes: Arc<AtomicI64>,
    refused: Arc<AtomicU64>,
    /// `http://host:port` of the proxy.
    pub url: String,
}

/// The proxy the speed layer's tests put in front of Elasticsearch.
pub type BulkRefusingProxy = RefusingProxy;

#[derive(Clone)]
struct Shared {
    target: String,
    http: reqwest::Client,
    refusal: Refusal,
    refuse: Arc<AtomicBool>,
    passes: Arc<AtomicI64>,
    refused: Arc<AtomicU64>,
}

impl RefusingProxy {
    /// In front of Elasticsearch at `target` (`http://host:port`): `_bulk` refused with 429.
    pub async fn start(target: &str) -> Self {
        Self::elasticsearch_bulk(target).await
    }

    pub async fn elasticsearch_bulk(target: &str) -> Self {
        let refusal = Refusal {
            matches: |_, path| path.ends_with("/_bulk"),
            status: StatusCode::TOO_MANY_REQUESTS,
            content_type: "application/json",
            body: r#"{"error":{"type":"es_rejected_execution_exception","reason":"rejected execution of coordinating operation"},"status":429}"#,
        };
        Self::with(target, refusal).await
    }

    /// In front of an S3 server at `target`: every `PUT` (uploads and markers) refused with
    /// 503 `SlowDown`, as S3 answers a prefix it throttles; reads, lists and deletes pass.
    pub async fn s3_puts(target: &str) -> Self {
        let refusal = Refusal {
            matches: |method, _| method == Method::PUT,
            status: StatusCode::SERVICE_UNAVAILABLE,
            content_type: "application/xml",
            body: "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>\
                   <Message>Please reduce your request rate.</Message></Error>",
        };
        Self::with(target, refusal).await
    }

    async fn with(target: &str, refusal: Refusal) -> Self {
        let shared = Shared {
            target: target.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
            refusal,
            refuse: Arc::new(AtomicBool::new(false)),
            passes: Arc::new(AtomicI64::new(0)),
            refused: Arc::new(AtomicU64::new(0)),
        };
        let (refuse, passes, refused) = (
            shared.refuse.clone(),
            shared.passes.clone(),
            shared.refused.clone(),
        );
        let app = Router::new().fallback(forward).with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy listens");
        let url = format!("http://{}", listener.local_addr().expect("proxy address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            refuse,
            passes,
            refused,
            url,
        }
    }

    /// From now on matching requests are refused (`true`) or passed through (`false`).
    pub fn refuse(&self, refuse: bool) {
        self.refuse.store(refuse, Ordering::SeqCst);
    }

    /// [`RefusingProxy::refuse`], named for the `_bulk` proxy.
    pub fn refuse_bulk(&self, refuse: bool) {
        self.refuse(refuse);
    }

    /// While refusing, pass the next `n` matching requests through first.
    pub fn pass_next(&self, n: i64) {
        self.passes.store(n, Ordering::SeqCst);
    }

    /// How many requests were refused so far.
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
    let refusal = shared.refusal;
    if (refusal.matches)(&method, uri.path())
        && shared.refuse.load(Ordering::SeqCst)
        && shared.passes.fetch_sub(1, Ordering::SeqCst) <= 0
    {
        shared.refused.fetch_add(1, Ordering::SeqCst);
        return (
            refusal.status,
            [("content-type", refusal.content_type)],
            refusal.body,
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
            let mut out = Response::builder().status(status);
            for (name, value) in answer.headers() {
                // The body is sent whole, not in the server's chunks.
                if name != "transfer-encoding" && name != "content-length" {
                    out = out.header(name.as_str(), value.as_bytes());
                }
            }
            let bytes = answer.bytes().await.unwrap_or_default();
            out.body(Body::from(bytes))
                .unwrap_or_else(|e| (StatusCode::BAD_GATEWAY, e.to_string()).into_response())
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}
