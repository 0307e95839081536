//! `ProfileStore`: profiles in Elasticsearch, over its plain REST API.
//!
//! Writes go through the alias `profiles` to a versioned index (`profiles-v1`), so a replay can
//! build `profiles-v2` and swap the alias. Each document is written with an external version
//! equal to the Kafka offset of the last event folded into it: a writer that is behind (a
//! replica that lost its partition but still flushes) is refused with 409 instead of
//! overwriting newer data.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::http::StatusCode;
use elasticsearch::indices::{
    IndicesCreateParts, IndicesExistsAliasParts, IndicesGetMappingParts, IndicesPutAliasParts,
    IndicesPutIndexTemplateParts, IndicesPutMappingParts,
};
use elasticsearch::{BulkParts, DeleteParts, Elasticsearch, GetParts, MgetParts};
use serde_json::{json, Value};

/// How soon a written profile is searchable: portals read profiles through search, so a
/// profile index refreshes every second (a recompute's index refreshes only when built).
pub const REFRESH_INTERVAL: &str = "1s";

/// Elasticsearch settings.
#[derive(Debug, Clone, clap::Args)]
pub struct EsArgs {
    /// Elasticsearch (or OpenSearch) base URL.
    #[arg(long = "es-url", env = "PULSE_ES_URL", default_value = "http://localhost:9200")]
    pub url: String,
    /// Alias the profiles are read and written through.
    #[arg(long = "profiles-alias", env = "PULSE_PROFILES_ALIAS", default_value = "profiles")]
    pub alias: String,
    /// Index behind the alias, created by `setup` when missing.
    #[arg(long = "profiles-index", env = "PULSE_PROFILES_INDEX", default_value = "profiles-v1")]
    pub index: String,
    /// Request timeout, seconds.
    #[arg(long = "es-timeout-secs", env = "PULSE_ES_TIMEOUT_SECS", default_value_t = 30)]
    pub timeout_secs: u64,
}

impl EsArgs {
    pub fn local(url: &str, alias: &str, index: &str) -> Self {
        Self {
            url: url.into(),
            alias: alias.into(),
            index: index.into(),
            timeout_secs: 30,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("elasticsearch URL {0}: {1}")]
    Url(String, String),
    #[error("elasticsearch unreachable: {0}")]
    Transport(String),
    #[error("elasticsearch answered {status}: {body}")]
    Status { status: u16, body: String },
}

impl StoreError {
    /// Worth retrying: the cluster is down, overloaded, or failing for a moment.
    pub fn is_retriable(&self) -> bool {
        match self {
            StoreError::Transport(_) => true,
            StoreError::Status { status, .. } => *status == 429 || *status >= 500,
            StoreError::Url(..) => false,
        }
    }
}

impl From<elasticsearch::Error> for StoreError {
    fn from(e: elasticsearch::Error) -> Self {
        StoreError::Transport(e.to_string())
    }
}

/// One document of a bulk write.
#[derive(Debug, Clone)]
pub struct DocWrite {
    pub id: String,
    /// External version: the offset of the last event in the document.
    pub version: i64,
    /// The document, serialised.
    pub doc: Vec<u8>,
}

/// What Elasticsearch did with one document of a bulk write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemOutcome {
    Written,
    /// A newer version is already stored (409): ours is out of date, nothing to do.
    Stale,
    /// 429 or 5xx for this item: try again.
    Retry(String),
    /// Refused for good (mapping error, say). Logged and counted by the caller.
    Rejected(String),
}

/// What the speed engine needs of a profile store: real-time reads by id, and bulk writes with
/// an external version that refuse a document older than the stored one (409). [`ProfileStore`]
/// is Elasticsearch; the engine's unit tests use one in memory.
pub trait DocumentStore: Clone + Send + Sync + 'static {
    /// The alias (or index) the documents are read and written through.
    fn alias(&self) -> &str;
    /// Documents by id; missing ids are absent from the map.
    fn mget(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<HashMap<String, Value>, StoreError>> + Send;
    /// Writes documents, one outcome per document in input order.
    fn bulk_write(
        &self,
        docs: &[DocWrite],
    ) -> impl Future<Output = Result<Vec<ItemOutcome>, StoreError>> + Send;
}

impl DocumentStore for ProfileStore {
    fn alias(&self) -> &str {
        ProfileStore::alias(self)
    }

    fn mget(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<HashMap<String, Value>, StoreError>> + Send {
        ProfileStore::mget(self, ids)
    }

    fn bulk_write(
        &self,
        docs: &[DocWrite],
    ) -> impl Future<Output = Result<Vec<ItemOutcome>, StoreError>> + Send {
        ProfileStore::bulk_write(self, docs)
    }
}

/// Reads and writes profile documents.
#[derive(Clone)]
pub struct ProfileStore {
    client: Elasticsearch,
    args: EsArgs,
}

impl ProfileStore {
    pub fn new(args: &EsArgs) -> Result<Self, StoreError> {
        let url = args
            .url
            .parse::<elasticsearch::http::Url>()
            .map_err(|e| StoreError::Url(args.url.clone(), e.to_string()))?;
        let transport = TransportBuilder::new(SingleNodeConnectionPool::new(url))
            .timeout(Duration::from_secs(args.timeout_secs))
            .build()
            .map_err(|e| StoreError::Url(args.url.clone(), e.to_string()))?;
        Ok(Self {
            client: Elasticsearch::new(transport),
            args: args.clone(),
        })
    }

    pub fn alias(&self) -> &str {
        &self.args.alias
    }

    /// A store that reads and writes the index `index` itself, not through the alias (a
    /// recompute builds an index no alias points to yet).
    pub fn on_index(&self, index: &str) -> Self {
        let mut args = self.args.clone();
        args.alias = index.to_string();
        Self {
            client: self.client.clone(),
            args,
        }
    }

    /// The client, for index administration (aliases, index metadata).
    pub fn client(&self) -> &Elasticsearch {
        &self.client
    }

    /// Creates the index template, the index and the alias when missing. Idempotent.
    pub async fn setup(&self, shards: u32, replicas: u32) -> Result<Vec<String>, StoreError> {
        let mut done = vec![self.put_template(shards, replicas).await?];
        self.create_behind_alias(&mut done).await?;
        Ok(done)
    }

    /// Puts the index template (the current mapping) for every `{alias}-*` index.
    pub async fn put_template(&self, shards: u32, replicas: u32) -> Result<String, StoreError> {
        let pattern = format!("{}-*", self.args.alias);
        let template = json!({
            "index_patterns": [pattern],
            "priority": 100,
            "template": {
                "settings": {
                    "number_of_shards": shards,
                    "number_of_replicas": replicas,
                    "refresh_interval": REFRESH_INTERVAL
                },
                "mappings": profile_mapping()
            },
            "_meta": {"managed_by": "pulse-speed"}
        });
        let resp = self
            .client
            .indices()
            .put_index_template(IndicesPutIndexTemplateParts::Name(&format!(
                "pulse-{}",
                self.args.alias
            )))
            .body(template)
            .send()
            .await?;
        check(resp).await?;
        Ok(format!(
            "index template pulse-{} for {pattern}",
            self.args.alias
        ))
    }

    async fn create_behind_alias(&self, done: &mut Vec<String>) -> Result<(), StoreError> {
        let resp = self
            .client
            .indices()
            .create(IndicesCreateParts::Index(&self.args.index))
            .body(json!({"aliases": {&self.args.alias: {"is_write_index": true}}}))
            .send()
            .await?;
        let status = resp.status_code();
        let body = resp.text().await.unwrap_or_default();
        if status.is_success() {
            done.push(format!(
                "created index {} behind alias {}",
                self.args.index, self.args.alias
            ));
        } else if status == StatusCode::BAD_REQUEST
            && body.contains("resource_already_exists_exception")
        {
            done.push(format!("index {} exists", self.args.index));
            done.extend(self.upgrade_mapping().await?);
            let exists = self
                .client
                .indices()
                .exists_alias(IndicesExistsAliasParts::Name(&[&self.args.alias]))
                .send()
                .await?;
            if exists.status_code() == StatusCode::NOT_FOUND {
                let resp = self
                    .client
                    .indices()
                    .put_alias(IndicesPutAliasParts::IndexName(
                        &[&self.args.index],
                        &self.args.alias,
                    ))
                    .send()
                    .await?;
                check(resp).await?;
                done.push(format!("alias {} → {}", self.args.alias, self.args.index));
            } else {
                done.push(format!("alias {} exists", self.args.alias));
            }
        } else {
            return Err(StoreError::Status {
                status: status.as_u16(),
                body,
            });
        }
        Ok(())
    }

    /// Brings an index made by an older `setup` as close to the current mapping as
    /// Elasticsearch allows in place: the fields added since (`event_types`, `dedupe`, the
    /// identity fields) and
    /// `event_counts` no longer mapped dynamically. A field whose type changed cannot be
    /// changed in place; that is reported, with what to do.
    async fn upgrade_mapping(&self) -> Result<Vec<String>, StoreError> {
        let current = profile_mapping();
        let wanted = &current["properties"];
        let update = json!({"properties": {
            "event_types": wanted["event_types"],
            "dedupe": wanted["dedupe"],
            "event_counts": wanted["event_counts"],
            "aliases": wanted["aliases"],
            "merged_into": wanted["merged_into"],
            "identity": wanted["identity"],
        }});
        let resp = self
            .client
            .indices()
            .put_mapping(IndicesPutMappingParts::Index(&[&self.args.index]))
            .body(update)
            .send()
            .await?;
        check(resp).await?;
        let mut lines = vec![format!("mapping of {} brought up to date", self.args.index)];
        let resp = self
            .client
            .indices()
            .get_mapping(IndicesGetMappingParts::Index(&[&self.args.index]))
            .send()
            .await?;
        let body = check(resp).await?;
        let properties = body
            .as_object()
            .and_then(|o| o.values().next())
            .map(|i| &i["mappings"]["properties"]);
        for field in ["last_visit", "first_seen"] {
            let have = properties.and_then(|p| p[field]["type"].as_str());
            let want = wanted[field]["type"].as_str();
            if have.is_some() && have != want {
                lines.push(format!(
                    "warning: {} maps {field} as {} (an older layout), not {}: a range query \
                     with a plain number reads it as epoch milliseconds. Create a new index \
                     (--profiles-index {}-v2) and move the alias to it once it is rebuilt",
                    self.args.index,
                    have.unwrap_or_default(),
                    want.unwrap_or_default(),
                    self.args.alias
                ));
            }
        }
        Ok(lines)
    }

    /// Documents by id (real-time, so a profile flushed a moment ago by another replica is
    /// seen). Missing ids are absent from the map.
    pub async fn mget(&self, ids: &[String]) -> Result<HashMap<String, Value>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let resp = self
            .client
            .mget(MgetParts::Index(&self.args.alias))
            .body(json!({ "ids": ids }))
            .send()
            .await?;
        let body = check(resp).await?;
        let mut out = HashMap::new();
        for doc in body["docs"].as_array().into_iter().flatten() {
            if doc["found"].as_bool() == Some(true) {
                if let (Some(id), Some(src)) = (doc["_id"].as_str(), doc.get("_source")) {
                    out.insert(id.to_string(), src.clone());
                }
            } else if let Some(err) = doc.get("error") {
                return Err(StoreError::Status {
                    status: 500,
                    body: err.to_string(),
                });
            }
        }
        Ok(out)
    }

    /// One document by id.
    pub async fn get(&self, id: &str) -> Result<Option<Value>, StoreError> {
        let resp = self
            .client
            .get(GetParts::IndexId(&self.args.alias, id))
            .send()
            .await?;
        if resp.status_code() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body = check(resp).await?;
        Ok(body.get("_source").cloned())
    }

    /// Deletes one document by id; `false` when there was none.
    pub async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let resp = self
            .client
            .delete(DeleteParts::IndexId(&self.args.alias, id))
            .send()
            .await?;
        if resp.status_code() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        check(resp).await?;
        Ok(true)
    }

    /// Writes documents with `_bulk`, one outcome per document in input order.
    pub async fn bulk_write(&self, docs: &[DocWrite]) -> Result<Vec<ItemOutcome>, StoreError> {
        if docs.is_empty() {
            return Ok(Vec::new());
        }
        let mut body: Vec<Vec<u8>> = Vec::with_capacity(docs.len() * 2);
        for d in docs {
            let action = json!({"index": {"_id": d.id, "version": d.version, "version_type": "external_gte"}});
            body.push(serde_json::to_vec(&action).unwrap_or_default());
            body.push(d.doc.clone());
        }
        let resp = self
            .client
            .bulk(BulkParts::Index(&self.args.alias))
            .body(body)
            .send()
            .await?;
        let body = check(resp).await?;
        let items = body["items"].as_array().cloned().unwrap_or_default();
        if items.len() != docs.len() {
            return Err(StoreError::Status {
                status: 500,
                body: format!(
                    "bulk answered {} items for {} documents",
                    items.len(),
                    docs.len()
                ),
            });
        }
        Ok(items
            .iter()
            .map(|item| {
                let r = &item["index"];
                let status = r["status"].as_u64().unwrap_or(500);
                let reason = || r["error"].to_string();
                match status {
                    200 | 201 => ItemOutcome::Written,
                    409 => ItemOutcome::Stale,
                    429 | 500.. => ItemOutcome::Retry(reason()),
                    _ => ItemOutcome::Rejected(reason()),
                }
            })
            .collect())
    }

    /// Makes written documents visible to search now (tests and the demo; production relies
    /// on the 1 s refresh interval).
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let resp = self
            .client
            .indices()
            .refresh(elasticsearch::indices::IndicesRefreshParts::Index(&[&self
                .args
                .alias]))
            .send()
            .await?;
        check(resp).await.map(|_| ())
    }

    /// A search over the alias, for the profile API and tests.
    pub async fn search(&self, query: Value) -> Result<Value, StoreError> {
        let resp = self
            .client
            .search(elasticsearch::SearchParts::Index(&[&self.args.alias]))
            .body(query)
            .send()
            .await?;
        check(resp).await
    }
}

pub(crate) async fn check(
    resp: elasticsearch::http::response::Response,
) -> Result<Value, StoreError> {
    let status = resp.status_code();
    let text = resp.text().await.map_err(StoreError::from)?;
    if !status.is_success() {
        return Err(StoreError::Status {
            status: status.as_u16(),
            body: text.chars().take(2000).collect(),
        });
    }
    serde_json::from_str(&text).map_err(|e| StoreError::Status {
        status: status.as_u16(),
        body: format!(
            "unreadable response ({e}): {}",
            text.chars().take(500).collect::<String>()
        ),
    })
}

/// Keyword (not analysed) strings; `last_visit`/`first_seen` as `long` epoch seconds, so the
/// documented range query with a plain number (`{"gte": 1796046970}`) means seconds (a `date`
/// field would read a bare number as epoch *milliseconds*); amounts as exact strings mapped to
/// `double` plus integer minor units; model state and dedupe ids stored but not indexed.
///
/// Nothing is mapped dynamically: `event_counts` indexes the standard event types only (the
/// others stay in `_source`, counted, and every type a profile has is in the `event_types`
/// keyword list). A partner that sends thousands of event names can never exhaust the index's
/// field limit and make Elasticsearch refuse other partners' documents.
pub fn profile_mapping() -> Value {
    let keyword = json!({"type": "keyword"});
    let long = json!({"type": "long"});
    let counts: serde_json::Map<String, Value> = pulse_core::names::STANDARD_EVENT_TYPES
        .iter()
        .chain([&crate::profile::OTHER_EVENTS])
        .map(|t| (t.to_string(), long.clone()))
        .collect();
    json!({
        "dynamic": false,
        "properties": {
            "profile_id": keyword,
            "partner_id": keyword,
            "user_id": keyword,
            "anonymous": {"type": "boolean"},
            "session_id": keyword,
            "partner_name": keyword,
            "country": keyword,
            "version": keyword,
            "language": keyword,
            "referrer": {"type": "keyword", "ignore_above": 2048},
            "user_agent": {"type": "keyword", "ignore_above": 1024},
            "last_visit": long,
            "first_seen": long,
            "updated_at": {"type": "date", "format": "epoch_millis"},
            "category": keyword,
            "total_purchases": {"type": "double"},
            "total_purchases_minor": long,
            "purchase_count": long,
            "cart_amount": {"type": "double"},
            "event_count": long,
            "event_counts": {"type": "object", "dynamic": false, "properties": counts},
            "event_types": keyword,
            "gender_last": keyword,
            "gender_top": keyword,
            "gender_top_7d": keyword,
            "watermark": {"properties": {"partition": {"type": "integer"}, "offset": long}},
            "models": {"type": "object", "enabled": false},
            "dedupe": {"type": "object", "enabled": false},
            "aliases": keyword,
            "merged_into": keyword,
            "identity": {"type": "object", "enabled": false}
        }
    })
}
