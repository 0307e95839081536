//! The lease a process holds on an index while it writes or deletes it: a recompute's run
//! (and the catch-up of `promote` and `rollback`), and `cleanup` while it deletes the index.
//!
//! A run assigns its partitions itself and joins no group, so nothing in Kafka shows that it
//! is running; without a lock, `cleanup` could delete the index under it (then `_bulk`
//! re-creates it from the template, or `mget` retries a 404 for ever) and two runs of one
//! index could fold into it at once. The lease is one document per index in `<alias>.leases`
//! (outside the `<alias>-*` pattern, so no template or cleanup takes it for a profiles index),
//! taken with `op_type=create` and renewed, taken over and released with `if_seq_no` /
//! `if_primary_term`: Elasticsearch's compare-and-set, so of two processes racing for it only
//! one wins.
//!
//! A lease lasts [`TTL`] unless renewed (every [`RENEW_EVERY`] by a task of the holder's
//! runtime). An expired lease is free. So is one whose holder ran on this host and is no longer
//! alive (a SIGKILLed run restarted at once need not wait out the TTL). A holder that fails to
//! renew because another took the lease over (it stalled past the TTL) learns it at once and
//! stops: [`Lease::lost`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use elasticsearch::http::StatusCode;
use elasticsearch::indices::IndicesCreateParts;
use elasticsearch::params::OpType;
use elasticsearch::{DeleteParts, GetParts, IndexParts};
use serde_json::{json, Value};

use crate::store::{ProfileStore, StoreError};

/// How long a lease lasts without renewal.
pub const TTL: Duration = Duration::from_secs(30);
/// How often the holder renews it.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// The index of the leases of `alias`'s indices.
pub fn lease_index(alias: &str) -> String {
    format!("{alias}.leases")
}

/// Who holds a lease, as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// Unique per acquisition: two leases of one process are told apart.
    pub token: String,
    /// What it does: `run`, `promote`, `rollback`, `cleanup`.
    pub purpose: String,
    /// Epoch milliseconds.
    pub renewed_at: i64,
    pub expires_at: i64,
}

impl Holder {
    fn new(purpose: &str) -> Self {
        let now = chrono::Utc::now().timestamp_millis();
        Self {
            host: hostname(),
            pid: std::process::id(),
            token: uuid::Uuid::new_v4().simple().to_string(),
            purpose: purpose.to_string(),
            renewed_at: now,
            expires_at: now + TTL.as_millis() as i64,
        }
    }

    /// Whether the lease no longer binds anyone: expired, or its holder was a process of this
    /// host that is gone.
    fn is_free(&self, now_ms: i64) -> bool {
        self.expires_at <= now_ms || (self.host == hostname() && !process_alive(self.pid))
    }

    /// One line for a refusal.
    pub fn describe(&self, now_ms: i64) -> String {
        format!(
            "held by {} (pid {} on {}), renewed {} s ago, expires in {} s",
            self.purpose,
            self.pid,
            self.host,
            (now_ms - self.renewed_at).max(0) / 1000,
            (self.expires_at - now_ms).max(0) / 1000
        )
    }
}

/// What trying for a lease found.
pub enum Acquired {
    Held(Box<Lease>),
    /// Someone else holds it.
    Busy(Holder),
}

/// A lease held by this process. Released on [`Lease::release`]; dropped without it, it
/// expires after [`TTL`] (or at once for a process of this host that has ended).
pub struct Lease {
    store: ProfileStore,
    index: String,
    id: String,
    holder: Holder,
    version: (i64, i64),
    lost: Arc<AtomicBool>,
    renewal: Option<tokio::task::JoinHandle<()>>,
}

/// Takes the lease of `index` for `purpose`, unless another process holds it.
pub async fn acquire(
    store: &ProfileStore,
    alias: &str,
    index: &str,
    purpose: &str,
) -> Result<Acquired, StoreError> {
    let leases = lease_index(alias);
    ensure_index(store, &leases).await?;
    // Two rounds: a create that loses a race re-reads what won it.
    for _ in 0..3 {
        let holder = Holder::new(purpose);
        let now = holder.renewed_at;
        match read(store, &leases, index).await? {
            None => {
                if let Some(version) = write(store, &leases, index, &holder, None).await? {
                    return Ok(Acquired::Held(Box::new(Lease::new(
                        store, leases, index, holder, version,
                    ))));
                }
            }
            Some((current, _)) if !current.is_free(now) => return Ok(Acquired::Busy(current)),
            Some((current, version)) => {
                tracing::warn!(index, previous = %current.describe(now), "taking over a lease its holder left");
                if let Some(version) = write(store, &leases, index, &holder, Some(version)).await? {
                    return Ok(Acquired::Held(Box::new(Lease::new(
                        store, leases, index, holder, version,
                    ))));
                }
            }
        }
    }
    match read(store, &leases, index).await? {
        Some((current, _)) => Ok(Acquired::Busy(current)),
        None => Err(StoreError::Status {
            status: 409,
            body: format!("the lease of {index} kept changing hands"),
        }),
    }
}

/// Runs `work` holding the lease of `index` for `purpose`: refused while another process
/// holds it, renewed meanwhile, released after. If another process takes it over (this one
/// stalled past [`TTL`]), `stop` is stopped, so that the work ends at its next check, and the
/// outcome is an error that says so.
pub fn with_lease<T>(
    args: &super::RecomputeArgs,
    index: &str,
    purpose: &str,
    stop: &pulse_service::Shutdown,
    work: impl FnOnce() -> Result<T, super::RecomputeError>,
) -> Result<T, super::RecomputeError> {
    use super::RecomputeError;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let store = ProfileStore::new(&args.speed.es)?;
    let alias = &args.speed.es.alias;
    let mut lease = match runtime.block_on(acquire(&store, alias, index, purpose))? {
        Acquired::Held(lease) => lease,
        Acquired::Busy(holder) => {
            let now = chrono::Utc::now().timestamp_millis();
            return Err(RecomputeError::Refused(format!(
                "index {index} is in use: its lease is {} (in {}). One process at a time \
                 writes or deletes an index: wait for it, or stop it",
                holder.describe(now),
                lease_index(alias)
            )));
        }
    };
    let on_lost = {
        let stop = stop.clone();
        move || stop.stop()
    };
    lease.keep_renewed(runtime.handle(), on_lost);
    let outcome = work();
    let lost = lease.lost();
    runtime.block_on(lease.release());
    if lost {
        return Err(RecomputeError::Refused(format!(
            "another process took the lease of index {index} over while this one held it (this \
             process stalled for more than {} s?): what both wrote may be mixed; run again",
            TTL.as_secs()
        )));
    }
    outcome
}

/// Who holds the lease of `index` now, if anyone does (a free lease counts as nobody's).
pub async fn holder(
    store: &ProfileStore,
    alias: &str,
    index: &str,
) -> Result<Option<Holder>, StoreError> {
    let leases = lease_index(alias);
    let now = chrono::Utc::now().timestamp_millis();
    match read(store, &leases, index).await {
        Ok(found) => Ok(found.map(|(h, _)| h).filter(|h| !h.is_free(now))),
        Err(StoreError::Status { status: 404, .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Lease {
    fn new(
        store: &ProfileStore,
        leases: String,
        index: &str,
        holder: Holder,
        version: (i64, i64),
    ) -> Self {
        tracing::info!(index, purpose = %holder.purpose, "lease taken");
        Self {
            store: store.clone(),
            index: leases,
            id: index.to_string(),
            holder,
            version,
            lost: Arc::new(AtomicBool::new(false)),
            renewal: None,
        }
    }

    /// Renews the lease every [`RENEW_EVERY`] on `runtime` until released. If another process
    /// took it over meanwhile, `lost` turns true and `on_lost` is called (the run stops).
    pub fn keep_renewed(
        &mut self,
        runtime: &tokio::runtime::Handle,
        on_lost: impl Fn() + Send + 'static,
    ) {
        let (store, index, id) = (self.store.clone(), self.index.clone(), self.id.clone());
        let (mut holder, mut version, lost) =
            (self.holder.clone(), self.version, self.lost.clone());
        self.renewal = Some(runtime.spawn(async move {
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                let now = chrono::Utc::now().timestamp_millis();
                holder.renewed_at = now;
                holder.expires_at = now + TTL.as_millis() as i64;
                match write(&store, &index, &id, &holder, Some(version)).await {
                    Ok(Some(v)) => version = v,
                    Ok(None) => {
                        tracing::error!(index = %id, "the lease was taken over by another process; stopping");
                        lost.store(true, Ordering::SeqCst);
                        on_lost();
                        return;
                    }
                    // Elasticsearch unreachable: tried again at the next tick (the lease
                    // holds for TTL; the run's own writes fail meanwhile anyway).
                    Err(e) => tracing::warn!(index = %id, error = %e, "renewing the lease failed"),
                }
            }
        }));
    }

    /// Whether another process took the lease over: what this one wrote since may be mixed
    /// with that one's writes.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Gives the lease up (unless it was lost).
    pub async fn release(mut self: Box<Self>) {
        if let Some(task) = self.renewal.take() {
            task.abort();
            let _ = task.await;
        }
        if self.lost() {
            return;
        }
        // The renewal task may have written a newer version: read it back before deleting.
        let current = read(&self.store, &self.index, &self.id).await;
        let version = match current {
            Ok(Some((h, v))) if h.token == self.holder.token => v,
            _ => return,
        };
        let deleted = self
            .store
            .client()
            .delete(DeleteParts::IndexId(&self.index, &self.id))
            .if_seq_no(version.0)
            .if_primary_term(version.1)
            .send()
            .await;
        match deleted {
            Ok(r) if r.status_code().is_success() => {
                tracing::info!(index = %self.id, "lease released")
            }
            Ok(r) => {
                tracing::warn!(index = %self.id, status = r.status_code().as_u16(), "releasing the lease failed; it expires by itself")
            }
            Err(e) => {
                tracing::warn!(index = %self.id, error = %e, "releasing the lease failed; it expires by itself")
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(task) = self.renewal.take() {
            task.abort();
        }
    }
}

/// Creates the leases index when missing: one shard, a replica where the cluster has room,
/// nothing mapped but the fields a lease has.
async fn ensure_index(store: &ProfileStore, index: &str) -> Result<(), StoreError> {
    let resp = store
        .client()
        .indices()
        .create(IndicesCreateParts::Index(index))
        .body(json!({
            "settings": {"number_of_shards": 1, "auto_expand_replicas": "0-1"},
            "mappings": {"dynamic": false, "properties": {
                "host": {"type": "keyword"},
                "purpose": {"type": "keyword"},
                "expires_at": {"type": "long"},
            }},
        }))
        .send()
        .await?;
    let status = resp.status_code();
    let body = resp.text().await.unwrap_or_default();
    if status.is_success()
        || (status == StatusCode::BAD_REQUEST && body.contains("resource_already_exists_exception"))
    {
        return Ok(());
    }
    Err(StoreError::Status {
        status: status.as_u16(),
        body,
    })
}

/// The lease of `id` and its version (`_seq_no`, `_primary_term`), if there is one.
async fn read(
    store: &ProfileStore,
    index: &str,
    id: &str,
) -> Result<Option<(Holder, (i64, i64))>, StoreError> {
    let resp = store
        .client()
        .get(GetParts::IndexId(index, id))
        .send()
        .await?;
    let status = resp.status_code();
    let text = resp.text().await.unwrap_or_default();
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if status == StatusCode::NOT_FOUND && body["found"] == json!(false) {
        return Ok(None);
    }
    if !status.is_success() {
        return Err(StoreError::Status {
            status: status.as_u16(),
            body: text.chars().take(2000).collect(),
        });
    }
    let holder: Holder =
        serde_json::from_value(body["_source"].clone()).map_err(|e| StoreError::Status {
            status: status.as_u16(),
            body: format!("unreadable lease of {id}: {e}"),
        })?;
    let version = (
        body["_seq_no"].as_i64().unwrap_or(-1),
        body["_primary_term"].as_i64().unwrap_or(-1),
    );
    Ok(Some((holder, version)))
}

/// Writes the lease: created if `after` is `None`, else only over that version. `None` when
/// another write won (409).
async fn write(
    store: &ProfileStore,
    index: &str,
    id: &str,
    holder: &Holder,
    after: Option<(i64, i64)>,
) -> Result<Option<(i64, i64)>, StoreError> {
    let request = store
        .client()
        .index(IndexParts::IndexId(index, id))
        .body(holder);
    let request = match after {
        None => request.op_type(OpType::Create),
        Some((seq_no, term)) => request.if_seq_no(seq_no).if_primary_term(term),
    };
    let resp = request.send().await?;
    let status = resp.status_code();
    if status == StatusCode::CONFLICT {
        return Ok(None);
    }
    let body = crate::store::check(resp).await?;
    Ok(Some((
        body["_seq_no"].as_i64().unwrap_or(-1),
        body["_primary_term"].as_i64().unwrap_or(-1),
    )))
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Whether process `pid` of this host is alive (signal 0 checks without sending anything).
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 takes no pointers and only checks the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_free_once_expired_or_its_local_holder_is_gone() {
        let now = chrono::Utc::now().timestamp_millis();
        let mut h = Holder::new("run");
        assert!(!h.is_free(now), "held by this live process");
        h.expires_at = now - 1;
        assert!(h.is_free(now), "expired");
        let mut gone = Holder::new("run");
        // Above the kernel's pid_max (4194304 at most): no such process.
        gone.pid = 4_194_305;
        assert!(gone.is_free(now), "its holder is gone");
        let mut elsewhere = gone.clone();
        elsewhere.host = format!("{}-elsewhere", hostname());
        assert!(
            !elsewhere.is_free(now),
            "another host's process is not judged from here"
        );
        assert!(h.describe(now).contains("held by run"));
    }
}
