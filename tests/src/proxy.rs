//! A TCP proxy a test can cut: while cut, every connection, open or new, is dropped, as when
//! a network partition separates a client from a server. Used in front of Elasticsearch and
//! in front of the broker's `CUTTABLE` listener (see `deploy/local/stack`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct CutProxy {
    up: Arc<AtomicBool>,
    /// `host:port` the proxy listens on.
    pub addr: String,
}

impl CutProxy {
    /// Listens on `listen` (`127.0.0.1:0` for any free port) and forwards to `target`.
    pub async fn start(listen: &str, target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| panic!("proxy cannot listen on {listen}: {e}"));
        let addr = listener.local_addr().expect("proxy address").to_string();
        let up = Arc::new(AtomicBool::new(true));
        let (flag, target) = (up.clone(), target.to_string());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let up = flag.clone();
                let target = target.clone();
                tokio::spawn(async move {
                    if !up.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let watch = async {
                        while up.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch => {}
                    }
                });
            }
        });
        Self { up, addr }
    }

    /// A proxy on the port the stack's `CUTTABLE` Kafka listener advertises (see
    /// `deploy/local/stack`), forwarding to that listener, and the brokers string that
    /// reaches Kafka only through it. The advertised port is fixed: one per test binary.
    pub async fn for_cuttable_broker() -> (Self, String) {
        let listener = crate::process::env_or("PULSE_KAFKA_CUTTABLE_LISTENER", "localhost:19094");
        let advertised = crate::process::env_or("PULSE_KAFKA_CUTTABLE_BROKERS", "localhost:19095");
        let port = advertised
            .rsplit(':')
            .next()
            .expect("host:port")
            .to_string();
        let proxy = Self::start(&format!("127.0.0.1:{port}"), &listener).await;
        (proxy, advertised)
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}
