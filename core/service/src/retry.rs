//! The one retry policy of Pulse: exponential backoff with jitter and a cap (the delays come
//! from `backon`), an optional limit on attempts, a classification of which errors are worth
//! another attempt, and a [`Shutdown`] that ends the wait at once. Every loop that retries an
//! outside system (Elasticsearch, the object store, BigQuery, a webhook) goes through here, so
//! a SIGTERM during an outage stops the process instead of waiting for the outage to end.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::Shutdown;

/// How to retry: a base delay of `first`, doubling up to `max`, each wait a random point
/// between half the base and the base (so that replicas that failed together do not retry
/// together, and `max` is a hard cap), and at most `attempts` tries in all (`None`: until it
/// works or the process stops).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub first: Duration,
    pub max: Duration,
    pub attempts: Option<usize>,
}

/// Why [`RetryPolicy::run`] gave up, with the last error.
#[derive(Debug, thiserror::Error)]
pub enum RetryError<E> {
    /// Not worth retrying, or the attempts ran out.
    #[error("{0}")]
    Failed(E),
    /// The process is stopping; the work was not done and must not be taken as done.
    #[error("stopped while retrying: {0}")]
    Stopped(E),
}

impl<E> RetryError<E> {
    pub fn into_inner(self) -> E {
        match self {
            RetryError::Failed(e) | RetryError::Stopped(e) => e,
        }
    }

    pub fn is_stopped(&self) -> bool {
        matches!(self, RetryError::Stopped(_))
    }
}

impl RetryPolicy {
    /// Retries until it works or the process stops.
    pub const fn forever(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            attempts: None,
        }
    }

    /// At most `attempts` tries in all (the first included; at least one).
    pub const fn with_attempts(mut self, attempts: usize) -> Self {
        self.attempts = Some(attempts);
        self
    }

    /// The waits between attempts, in order (one fewer than the attempts).
    pub fn delays(&self) -> impl Iterator<Item = Duration> + Send + 'static {
        // backon adds a random part of up to the base to the base: halving both bounds makes
        // each wait fall between half the base and the base.
        let builder = ExponentialBuilder::default()
            .with_min_delay(self.first / 2)
            .with_max_delay(self.max.max(self.first) / 2)
            .with_factor(2.0)
            .with_jitter();
        let builder = match self.attempts {
            Some(n) => builder.with_max_times(n.saturating_sub(1)),
            None => builder.without_max_times(),
        };
        builder.build()
    }

    /// Runs `op` until it succeeds, `retryable` says an error is final, the attempts run out
    /// or `shutdown` stops the process (also in the middle of a wait). Each retry is logged
    /// with `what`.
    pub async fn run<T, E, F, Fut>(
        &self,
        shutdown: &Shutdown,
        what: &str,
        retryable: impl Fn(&E) -> bool,
        mut op: F,
    ) -> Result<T, RetryError<E>>
    where
        E: Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut delays = self.delays();
        for attempt in 1.. {
            let error = match op().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let wait = next_wait(&mut delays, shutdown, &retryable, error, what, attempt)?;
            if !shutdown.sleep(wait.0).await {
                return Err(RetryError::Stopped(wait.1));
            }
        }
        unreachable!("attempts are counted without end")
    }

    /// [`RetryPolicy::run`] for a thread outside the runtime (the consumer loops), with an
    /// operation that blocks.
    pub fn run_blocking<T, E, F>(
        &self,
        shutdown: &Shutdown,
        what: &str,
        retryable: impl Fn(&E) -> bool,
        mut op: F,
    ) -> Result<T, RetryError<E>>
    where
        E: Display,
        F: FnMut() -> Result<T, E>,
    {
        let mut delays = self.delays();
        for attempt in 1.. {
            let error = match op() {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let wait = next_wait(&mut delays, shutdown, &retryable, error, what, attempt)?;
            if !shutdown.sleep_blocking(wait.0) {
                return Err(RetryError::Stopped(wait.1));
            }
        }
        unreachable!("attempts are counted without end")
    }
}

/// After a failed attempt: give up (stopping, a final error, no attempts left) or the wait
/// before the next one, with the error kept for when that wait is cut short.
fn next_wait<E: Display>(
    delays: &mut impl Iterator<Item = Duration>,
    shutdown: &Shutdown,
    retryable: impl Fn(&E) -> bool,
    error: E,
    what: &str,
    attempt: u64,
) -> Result<(Duration, E), RetryError<E>> {
    if shutdown.is_stopped() {
        return Err(RetryError::Stopped(error));
    }
    if !retryable(&error) {
        return Err(RetryError::Failed(error));
    }
    let Some(wait) = delays.next() else {
        return Err(RetryError::Failed(error));
    };
    tracing::warn!(what, attempt, error = %error, retry_in = ?wait, "failed; retrying");
    Ok((wait, error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const FAST: RetryPolicy =
        RetryPolicy::forever(Duration::from_millis(1), Duration::from_millis(4));

    #[test]
    fn delays_double_with_jitter_up_to_the_cap_and_stop_after_the_attempts() {
        let policy = RetryPolicy::forever(Duration::from_millis(100), Duration::from_secs(1))
            .with_attempts(8);
        let delays: Vec<Duration> = policy.delays().collect();
        assert_eq!(delays.len(), 7, "one wait between each two of 8 attempts");
        for (i, d) in delays.iter().enumerate() {
            let base = (100u64 << i).min(1000);
            let ms = d.as_millis() as u64;
            assert!(
                ms >= base / 2 && ms <= base,
                "delay {i}: {ms} ms (base {base})"
            );
        }
        assert_eq!(
            RetryPolicy::forever(Duration::from_millis(1), Duration::from_millis(1))
                .delays()
                .take(1000)
                .count(),
            1000
        );
    }

    #[test]
    fn retries_what_is_retryable_and_gives_up_on_the_rest() {
        let calls = Cell::new(0);
        let got = FAST.run_blocking(
            &Shutdown::new(),
            "op",
            |_: &String| true,
            || {
                calls.set(calls.get() + 1);
                if calls.get() < 3 {
                    Err("busy".to_string())
                } else {
                    Ok(calls.get())
                }
            },
        );
        assert_eq!(got.unwrap(), 3);

        calls.set(0);
        let got: Result<(), _> = FAST.run_blocking(
            &Shutdown::new(),
            "op",
            |e: &String| e != "refused",
            || {
                calls.set(calls.get() + 1);
                Err("refused".to_string())
            },
        );
        assert!(matches!(got, Err(RetryError::Failed(e)) if e == "refused"));
        assert_eq!(calls.get(), 1, "a final error is not retried");

        calls.set(0);
        let got: Result<(), _> = FAST.with_attempts(4).run_blocking(
            &Shutdown::new(),
            "op",
            |_: &String| true,
            || {
                calls.set(calls.get() + 1);
                Err("busy".to_string())
            },
        );
        assert!(matches!(got, Err(RetryError::Failed(_))));
        assert_eq!(calls.get(), 4);
    }

    #[tokio::test]
    async fn a_stop_ends_an_endless_retry_during_its_wait() {
        let shutdown = Shutdown::new();
        let policy = RetryPolicy::forever(Duration::from_secs(3600), Duration::from_secs(3600));
        let stopper = shutdown.clone();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let run = policy.run(
            &shutdown,
            "op",
            |_: &String| true,
            || {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { Err::<(), _>("down".to_string()) }
            },
        );
        let (got, ()) = tokio::join!(run, async move { stopper.stop() });
        assert!(got.unwrap_err().is_stopped());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
