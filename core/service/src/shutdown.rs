//! One shutdown signal for the whole process, passed into every loop and every retry (as
//! mini-redis passes its `Shutdown`): a SIGTERM during an outage must end a retry's sleep, not
//! wait for the outage to end.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A cloneable handle: `stop()` on any clone is seen by all. Blocking loops ask
/// [`Shutdown::is_stopped`] between units of work; async code awaits [`Shutdown::stopped`].
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// A handle that stops on SIGTERM or Ctrl-C. Needs a running Tokio runtime.
    pub fn on_signals() -> Self {
        let shutdown = Self::new();
        let handle = shutdown.clone();
        tokio::spawn(async move {
            signal().await;
            tracing::info!("shutdown signal received");
            handle.stop();
        });
        shutdown
    }

    pub fn stop(&self) {
        self.token.cancel();
    }

    pub fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once the process is asked to stop.
    pub async fn stopped(&self) {
        self.token.cancelled().await
    }

    /// Sleeps for `duration` unless asked to stop first; `false` when stopped (the caller
    /// gives up its retry and unwinds).
    pub async fn sleep(&self, duration: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(duration) => true,
            _ = self.token.cancelled() => false,
        }
    }

    /// The blocking twin of [`Shutdown::sleep`], for threads outside the runtime: wakes at
    /// least every 100 ms to look at the signal.
    pub fn sleep_blocking(&self, duration: Duration) -> bool {
        let deadline = std::time::Instant::now() + duration;
        loop {
            if self.is_stopped() {
                return false;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return true;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(100)));
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_ends_a_sleep_at_once_on_every_clone() {
        let shutdown = Shutdown::new();
        let other = shutdown.clone();
        let sleeper = tokio::spawn(async move { other.sleep(Duration::from_secs(3600)).await });
        shutdown.stop();
        assert!(!sleeper.await.unwrap());
        assert!(shutdown.is_stopped());
        assert!(!shutdown.sleep_blocking(Duration::from_secs(3600)));
        assert!(Shutdown::new().sleep(Duration::from_millis(1)).await);
    }
}
