//! The profiles side of an erasure (`pulse-admin users erase`, see `pulse_core::erasure`):
//! who the person is across every profiles index of the alias, and deleting their documents
//! from each.
//!
//! An erased id may be a device merged into a person (its document is a pointer): the person
//! is erased, and with them every device merged into them (each is the same human). The
//! person's devices are what any index says: the `aliases` of the person's documents and the
//! pointers to the person.

use std::collections::{BTreeMap, BTreeSet};

use elasticsearch::http::request::JsonBody;
use elasticsearch::params::Refresh;
use elasticsearch::{BulkParts, SearchParts};
use pulse_core::erasure::{Erasures, IdKind};
use pulse_core::event::{partition_key, person_of};
use serde_json::{json, Value};

use crate::recompute::indices;
use crate::store::{check, ProfileStore, StoreError};

/// Most ids in one `terms` query: with their devices' pointers, well within one page of hits.
const TERMS_PER_QUERY: usize = 1_000;

/// Most documents a resolution reads per index: a person has at most a few hundred devices
/// (`--max-aliases`).
const MAX_DOCS: usize = 10_000;

/// One person to erase: their own id and every device merged into them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    pub partner_id: String,
    /// The person's own id (a user id, or the anonymous id of a device never merged).
    pub id: String,
    /// Every id to erase, the person's own included, with its kind.
    pub ids: BTreeMap<String, IdKind>,
}

/// Every profiles index of `store`'s alias: the one it points to and every `<alias>-*`
/// (indices kept for rollback, a recompute's, an unlink's scratch index), sorted.
pub async fn profile_indices(store: &ProfileStore) -> Result<Vec<String>, StoreError> {
    let alias = store.alias().to_string();
    let mut out = BTreeSet::new();
    if let Some(live) = indices::alias_target(store, &alias).await? {
        out.insert(live);
    }
    let pattern = format!("{alias}-*");
    let matching = indices::aliases_of(store, &pattern).await?;
    out.extend(
        matching
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k.clone()),
    );
    Ok(out.into_iter().collect())
}

/// The person `id` (of `kind`) of `partner` is, and all their devices, as `indices` know
/// them. An id no index knows is a person of its own with no device.
pub async fn resolve(
    store: &ProfileStore,
    indices: &[String],
    partner: &str,
    id: &str,
    kind: IdKind,
) -> Result<Person, StoreError> {
    let mut person = id.to_string();
    // A device merged into a person: the person is the one to erase.
    for doc in documents(store, indices, partner, &[id.to_string()]).await? {
        if doc["profile_id"].as_str() == Some(&partition_key(partner, id)) {
            if let Some(p) = doc["merged_into"].as_str() {
                person = p.to_string();
            }
        }
    }
    let own_kind = match (person == id, kind) {
        (true, kind) => kind,
        (false, _) => IdKind::User,
    };
    let mut ids = BTreeMap::from([(person.clone(), own_kind)]);
    if person != id {
        ids.insert(id.to_string(), IdKind::Alias);
    }
    for doc in documents(store, indices, partner, &[person.clone()]).await? {
        let aliases = doc["aliases"].as_array().into_iter().flatten();
        for alias in aliases.filter_map(Value::as_str) {
            ids.entry(alias.to_string()).or_insert(IdKind::Alias);
        }
        if doc["merged_into"].as_str() == Some(&person) {
            if let Some(pid) = doc["profile_id"].as_str() {
                ids.entry(person_of(pid).to_string())
                    .or_insert(IdKind::Alias);
            }
        }
    }
    Ok(Person {
        partner_id: partner.to_string(),
        id: person,
        ids,
    })
}

/// The query for the documents of `ids` of `partner` and the pointers to them.
fn query(partner: &str, ids: &[String]) -> Value {
    let profile_ids: Vec<String> = ids.iter().map(|id| partition_key(partner, id)).collect();
    json!({"bool": {"should": [
        {"terms": {"profile_id": profile_ids}},
        {"bool": {"filter": [
            {"term": {"partner_id": partner}},
            {"terms": {"merged_into": ids}},
        ]}},
    ], "minimum_should_match": 1}})
}

/// The documents (profile id, pointer, aliases) of `ids` and of the pointers to them.
async fn documents(
    store: &ProfileStore,
    indices: &[String],
    partner: &str,
    ids: &[String],
) -> Result<Vec<Value>, StoreError> {
    if indices.is_empty() {
        return Ok(Vec::new());
    }
    let targets: Vec<&str> = indices.iter().map(String::as_str).collect();
    let source = json!(["profile_id", "merged_into", "aliases"]);
    let hits = page(store, &targets, partner, ids, source).await?;
    Ok(hits.into_iter().map(|mut h| h["_source"].take()).collect())
}

/// One page of hits (at most `MAX_DOCS`) of the documents of `ids` of `partner` and the
/// pointers to them in `indices`, with `source` (`_source` filtering) of each.
async fn page(
    store: &ProfileStore,
    indices: &[&str],
    partner: &str,
    ids: &[String],
    source: Value,
) -> Result<Vec<Value>, StoreError> {
    let resp = store
        .client()
        .search(SearchParts::Index(indices))
        .ignore_unavailable(true)
        .body(json!({"size": MAX_DOCS, "_source": source, "query": query(partner, ids)}))
        .send()
        .await?;
    let mut body = check(resp).await?;
    Ok(match body["hits"]["hits"].take() {
        Value::Array(hits) => hits,
        _ => Vec::new(),
    })
}

/// Deletes from `index` the documents of every erased id and the pointers to them: what an
/// index must not hold when it becomes the alias's. A recompute (and the catch-up of a
/// rollback) passes over erased people's records, but what it folded before an erasure
/// was recorded is in its index; `pulse-admin users erase` deletes it only if it ran after
/// that index existed. How many documents were deleted.
pub async fn cleanse(
    store: &ProfileStore,
    index: &str,
    erasures: &Erasures,
) -> Result<u64, StoreError> {
    let mut total = 0;
    for (partner, ids) in erasures.by_partner() {
        let ids: Vec<String> = ids.into_iter().map(str::to_string).collect();
        total += delete_profiles(store, index, partner, &ids, false).await?;
    }
    Ok(total)
}

/// Deletes from `index` the documents of `ids` of `partner` and every pointer to them, and
/// makes the deletion visible to search; with `dry_run`, only counts them. How many.
///
/// Found by a search and deleted by id in one `_bulk` (not `_delete_by_query`, which is a
/// module some distributions leave out): each document is named, and a document written
/// meanwhile by a writer that has not seen the erasure is found by the next run.
pub async fn delete_profiles(
    store: &ProfileStore,
    index: &str,
    partner: &str,
    ids: &[String],
    dry_run: bool,
) -> Result<u64, StoreError> {
    let mut total = 0;
    for chunk in ids.chunks(TERMS_PER_QUERY) {
        // A page at a time: a page found and deleted, the next search finds the rest.
        loop {
            let found = matching(store, index, partner, chunk).await?;
            if dry_run || found.is_empty() {
                total += found.len() as u64;
                break;
            }
            total += delete_ids(store, index, &found).await?;
            if found.len() < MAX_DOCS {
                break;
            }
        }
    }
    Ok(total)
}

/// The ids of the documents of `ids` of `partner` and the pointers to them, one page.
async fn matching(
    store: &ProfileStore,
    index: &str,
    partner: &str,
    ids: &[String],
) -> Result<Vec<String>, StoreError> {
    let hits = page(store, &[index], partner, ids, json!(false)).await?;
    Ok(hits
        .iter()
        .filter_map(|h| h["_id"].as_str().map(str::to_string))
        .collect())
}

/// Deletes `ids` from `index` in one `_bulk`, visible to search on return; how many existed.
async fn delete_ids(store: &ProfileStore, index: &str, ids: &[String]) -> Result<u64, StoreError> {
    let lines: Vec<JsonBody<Value>> = ids
        .iter()
        .map(|id| json!({"delete": {"_id": id}}).into())
        .collect();
    let resp = store
        .client()
        .bulk(BulkParts::Index(index))
        .refresh(Refresh::True)
        .body(lines)
        .send()
        .await?;
    let body = check(resp).await?;
    let mut deleted = 0;
    for item in body["items"].as_array().into_iter().flatten() {
        match item["delete"]["status"].as_u64() {
            Some(200) => deleted += 1,
            Some(404) => {}
            status => {
                return Err(StoreError::Status {
                    status: status.unwrap_or(500) as u16,
                    body: format!(
                        "deleting an erased profile from {index}: {}",
                        item["delete"]["error"]
                    ),
                })
            }
        }
    }
    Ok(deleted)
}
