//! Segment's official SDKs, run as a partner runs them: the browser SDK on the shop page
//! (`deploy/local/shop/`) in headless Chromium, the Node SDK and the Python SDK, through the
//! drivers in `tests/sdk/`. `deploy/local/stack tools` installs all of them (`stack env` says
//! where); a missing tool fails the test with the command that installs it, never skips it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::oneshot;

const INSTALL: &str = "run `deploy/local/stack tools` and `eval \"$(deploy/local/stack env)\"`";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cache() -> PathBuf {
    std::env::var_os("PULSE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/pulse")
        })
}

fn env_path(name: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(name).map(PathBuf::from).unwrap_or(default)
}

/// Where the SDKs and the browser are.
pub struct SdkTools {
    node_modules: PathBuf,
    python: PathBuf,
    chromium: PathBuf,
}

impl SdkTools {
    /// The tools named by `deploy/local/stack env`, or the defaults it would name. Panics with
    /// the command that installs them when one is missing.
    pub fn from_env() -> Self {
        let tools = Self {
            node_modules: env_path(
                "PULSE_SDK_NODE_MODULES",
                cache().join("sdk-node/node_modules"),
            ),
            python: env_path("PULSE_PYTHON", cache().join("venv/bin/python")),
            chromium: env_path("PULSE_CHROMIUM", PathBuf::from("/usr/bin/chromium")),
        };
        for (what, path) in [
            (
                "Segment's browser SDK",
                tools.analytics_next().join("index.js"),
            ),
            (
                "Segment's Node SDK",
                tools.node_modules.join("@segment/analytics-node"),
            ),
            (
                "playwright-core",
                tools.node_modules.join("playwright-core"),
            ),
            ("the tools' Python", tools.python.clone()),
            ("Chromium", tools.chromium.clone()),
        ] {
            assert!(
                path.exists(),
                "{what} not found at {}: {INSTALL}",
                path.display()
            );
        }
        tools
    }

    /// The browser SDK's UMD build, as a page loads it with a `<script>` tag.
    fn analytics_next(&self) -> PathBuf {
        self.node_modules.join("@segment/analytics-next/dist/umd")
    }

    /// `node tests/sdk/<script> <args>` with the SDKs on its module path.
    pub fn node(&self, script: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("node");
        cmd.arg(repo().join("tests/sdk").join(script))
            .args(args)
            .env("NODE_PATH", &self.node_modules)
            .env("PULSE_CHROMIUM", &self.chromium);
        cmd
    }

    /// `python tests/sdk/<script> <args>` with the tools' venv (Segment's Python SDK).
    pub fn python(&self, script: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg(repo().join("tests/sdk").join(script)).args(args);
        cmd
    }
}

/// A driver's JSON lines on stdout, read as they come (a driver can say something mid-run,
/// such as "ingest answered 503", and wait for the test to act on it).
pub struct Driver {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    what: String,
}

impl Driver {
    pub fn spawn(mut cmd: Command) -> Self {
        let what = format!("{:?}", cmd.as_std());
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        Self {
            child,
            lines: BufReader::new(stdout).lines(),
            what,
        }
    }

    /// The next JSON line; panics (with the driver's exit status) when it ended without one.
    pub async fn next(&mut self) -> serde_json::Value {
        match self.lines.next_line().await {
            Ok(Some(line)) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", self.what)),
            _ => {
                let status = self.child.wait().await;
                panic!("{} ended without an answer: {status:?}", self.what)
            }
        }
    }

    /// Runs `cmd` to the end and returns its one JSON line.
    pub async fn run(cmd: Command) -> serde_json::Value {
        let mut driver = Self::spawn(cmd);
        let out = driver.next().await;
        let status = driver.child.wait().await.expect("wait for driver");
        assert!(status.success(), "{}: {status}", driver.what);
        out
    }
}

/// The demo's shop page on an origin of its own (`http://localhost:<port>`), as a partner's
/// site is never on ingest's origin: `/` is `deploy/local/shop/index.html`, beside it the
/// SDK's files from npm, as a site would host them.
pub struct ShopPage {
    pub origin: String,
    _stop: oneshot::Sender<()>,
}

impl ShopPage {
    pub async fn serve(tools: &SdkTools) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the shop page");
        let port = listener.local_addr().expect("address").port();
        let app = Router::new()
            .route("/", get(index))
            .route("/analytics-next.js", get(sdk_bundle))
            // Where the SDK loads its lazy chunks from, relative to `cdnURL`.
            .route("/analytics-next/bundles/{file}", get(sdk_chunk))
            .with_state(tools.analytics_next());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Self {
            origin: format!("http://localhost:{port}"),
            _stop: tx,
        }
    }

    /// The page's URL for `ingest` and `key` (`batch` for the SDK's batching delivery).
    pub fn url(&self, ingest: &str, key: &str, batch: bool) -> String {
        let batch = if batch { "&batch=1" } else { "" };
        format!("{}/?api={ingest}&key={key}{batch}", self.origin)
    }
}

async fn index() -> Response {
    file(
        &repo().join("deploy/local/shop/index.html"),
        "text/html; charset=utf-8",
    )
    .await
}

async fn sdk_bundle(State(dir): State<PathBuf>) -> Response {
    file(&dir.join("index.js"), "text/javascript").await
}

async fn sdk_chunk(State(dir): State<PathBuf>, UrlPath(name): UrlPath<String>) -> Response {
    if name.contains('/') || name.contains("..") || !name.ends_with(".js") {
        return StatusCode::NOT_FOUND.into_response();
    }
    file(&dir.join(name), "text/javascript").await
}

async fn file(path: &Path, content_type: &'static str) -> Response {
    match tokio::fs::read(path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, content_type)], bytes).into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}
