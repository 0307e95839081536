//! The audit log of erasures: one JSON object per request under `_erasures/` in the archive's
//! object store, kept as long as the archive. It says who asked, when, under which of the
//! partner's references, and when each store was done, with counts; never the person's ids
//! (the erasures topic has those, because suppression needs them).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDate, Utc};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where the audit log lives in the archive's object store (beside `events/`, `identities/`
/// and `_progress/`, which no reader of the archive lists it with).
pub const PREFIX: &str = "_erasures";

/// One request: a person (and the devices merged into them) of one partner.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub request_id: String,
    pub partner_id: String,
    /// How many ids were erased, by kind (`user`, `anonymous`, `alias`): never the ids.
    pub ids: BTreeMap<String, usize>,
    /// Who ran the command (`--operator`).
    pub operator: String,
    /// The partner's own reference of the request (`--reference`, a ticket number).
    pub reference: Option<String>,
    pub requested_at: DateTime<Utc>,
    /// Every run of the command for it (a rerun finishes what a crash left).
    pub runs: Vec<DateTime<Utc>>,
    /// Each store, when it was last done and what was removed there. The archive's and the
    /// warehouse's counts are of the whole batch the request was run in (`batch_requests`).
    pub steps: BTreeMap<String, Step>,
    /// The days of the warehouse that held the person's rows, kept until they are deleted
    /// there (a rerun after the archive was rewritten finds no rows to name them).
    pub days: BTreeSet<NaiveDate>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// One store's part of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub done_at: DateTime<Utc>,
    pub detail: Value,
}

/// The steps every request goes through, in order.
pub const STEPS: [&str; 5] = ["suppressed", "profiles", "notifier", "archive", "warehouse"];

impl AuditRecord {
    pub fn path(request_id: &str) -> Path {
        Path::from(format!("{PREFIX}/{request_id}.json"))
    }

    pub fn done(&mut self, step: &str, detail: Value) {
        self.steps.insert(
            step.to_string(),
            Step {
                done_at: Utc::now(),
                detail,
            },
        );
        if self.completed_at.is_none() && STEPS.iter().all(|s| self.steps.contains_key(*s)) {
            self.completed_at = Some(Utc::now());
        }
    }

    /// The stores still to do, in order.
    pub fn pending(&self) -> Vec<&'static str> {
        STEPS
            .into_iter()
            .filter(|s| !self.steps.contains_key(*s))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log: {0}")]
    Store(#[from] object_store::Error),
    #[error("audit log {path}: {error}")]
    Decode {
        path: String,
        error: serde_json::Error,
    },
}

/// The record of `request_id`, if there is one.
pub async fn load(
    store: &dyn ObjectStore,
    request_id: &str,
) -> Result<Option<AuditRecord>, AuditError> {
    let path = AuditRecord::path(request_id);
    match store.get(&path).await {
        Ok(got) => {
            let bytes = got.bytes().await?;
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|error| AuditError::Decode {
                    path: path.to_string(),
                    error,
                })
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub async fn save(store: &dyn ObjectStore, record: &AuditRecord) -> Result<(), AuditError> {
    let bytes = serde_json::to_vec_pretty(record).unwrap_or_default();
    store
        .put(
            &AuditRecord::path(&record.request_id),
            PutPayload::from(bytes),
        )
        .await?;
    Ok(())
}

/// Every record, oldest request first.
pub async fn list(store: &dyn ObjectStore) -> Result<Vec<AuditRecord>, AuditError> {
    let mut out = Vec::new();
    let prefix = Path::from(PREFIX);
    let metas: Vec<_> = store.list(Some(&prefix)).try_collect().await?;
    for meta in metas {
        let bytes = store.get(&meta.location).await?.bytes().await?;
        let record: AuditRecord =
            serde_json::from_slice(&bytes).map_err(|error| AuditError::Decode {
                path: meta.location.to_string(),
                error,
            })?;
        out.push(record);
    }
    out.sort_by(|a, b| (a.requested_at, &a.request_id).cmp(&(b.requested_at, &b.request_id)));
    Ok(out)
}
