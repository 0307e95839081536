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

    /// A handle that stops on SIGTERM or Ctrl-C; the handlers are installed before it returns.
    ///
    /// They wait on a thread of their own, with a runtime of their own, not as a task of the
    /// caller's runtime: such a task runs only while that runtime is driven, and a command that
    /// blocks outside it (a recompute folding on its own thread) never installed the handlers,
    /// so SIGTERM killed it outright instead of letting it flush and commit.
    pub fn on_signals() -> Self {
        let shutdown = Self::new();
        let handle = shutdown.clone();
        let (installed, is_installed) = std::sync::mpsc::sync_channel::<bool>(1);
        let spawned = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                let Ok(runtime) = runtime else {
                    let _ = installed.send(false);
                    return;
                };
                runtime.block_on(async move {
                    let signals = Signals::install();
                    let _ = installed.send(signals.is_ok());
                    if let Ok(signals) = signals {
                        signals.received().await;
                        tracing::info!("shutdown signal received");
                        handle.stop();
                    }
                });
            });
        let ok = spawned.is_ok() && is_installed.recv().unwrap_or(false);
        if !ok {
            tracing::warn!(
                "SIGTERM and Ctrl-C handlers could not be installed; they stop the process at once"
            );
        }
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

/// SIGTERM and SIGINT (Ctrl-C), registered with the runtime as soon as they are created, so
/// that a signal that comes before the first wait is still seen.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    #[cfg(not(unix))]
    fn install() -> std::io::Result<Self> {
        Ok(Self {})
    }

    /// Resolves on the first of them.
    #[cfg(unix)]
    async fn received(mut self) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.interrupt.recv() => {},
        }
    }

    #[cfg(not(unix))]
    async fn received(self) {
        let _ = tokio::signal::ctrl_c().await;
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

    /// Outside any runtime, as a blocking command calls it: without the handler, the SIGTERM
    /// this test sends itself would end the test process.
    #[cfg(unix)]
    #[test]
    fn a_sigterm_stops_a_handle_made_outside_any_runtime() {
        let shutdown = Shutdown::on_signals();
        assert!(!shutdown.is_stopped());
        // SAFETY: raise only queues a signal for this process; its handler is installed.
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        // Stops at the signal; the hour is only there so a broken handler cannot hang CI.
        assert!(!shutdown.sleep_blocking(Duration::from_secs(3600)));
    }
}
