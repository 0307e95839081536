//! The Elasticsearch side of a recompute: the new index, the alias that portals read, and the
//! record a promotion leaves in the new index's `_meta` (which index it replaced, and where
//! that index's events stopped), so that a rollback knows where to go back to.

use elasticsearch::http::StatusCode;
use std::collections::BTreeMap;

use elasticsearch::indices::{
    IndicesCreateParts, IndicesDeleteParts, IndicesExistsParts, IndicesGetAliasParts,
    IndicesGetMappingParts, IndicesGetSettingsParts, IndicesPutMappingParts,
    IndicesPutSettingsParts,
};
use serde_json::{json, Value};

use crate::store::{check, ProfileStore, StoreError};

/// The index `alias` points to now, if any.
pub async fn alias_target(store: &ProfileStore, alias: &str) -> Result<Option<String>, StoreError> {
    let resp = store
        .client()
        .indices()
        .get_alias(IndicesGetAliasParts::Name(&[alias]))
        .send()
        .await?;
    if resp.status_code() == StatusCode::NOT_FOUND {
        return Ok(None);
    }
    let body = check(resp).await?;
    Ok(body.as_object().and_then(|o| o.keys().next().cloned()))
}

/// Whether `index` exists: only a 404 says it does not; any other failure is an error (a
/// 401 or a 503 taken for "missing" would start a run over an index that is there).
pub async fn exists(store: &ProfileStore, index: &str) -> Result<bool, StoreError> {
    let resp = store
        .client()
        .indices()
        .exists(IndicesExistsParts::Index(&[index]))
        .send()
        .await?;
    match resp.status_code() {
        s if s.is_success() => Ok(true),
        StatusCode::NOT_FOUND => Ok(false),
        s => Err(StoreError::Status {
            status: s.as_u16(),
            body: format!("HEAD /{index} failed"),
        }),
    }
}

/// Creates `index` unless it exists, with the settings of the `{alias}-*` template (shards,
/// replicas, as `setup` provisioned them) and this binary's mapping (a new field or model
/// comes with the binary that folds it); whether it was created.
pub async fn create_index(store: &ProfileStore, index: &str) -> Result<bool, StoreError> {
    let resp = store
        .client()
        .indices()
        .create(IndicesCreateParts::Index(index))
        .body(json!({ "mappings": crate::store::profile_mapping() }))
        .send()
        .await?;
    let status = resp.status_code();
    let body = resp.text().await.unwrap_or_default();
    if status.is_success() {
        return Ok(true);
    }
    if status == StatusCode::BAD_REQUEST && body.contains("resource_already_exists_exception") {
        return Ok(false);
    }
    Err(StoreError::Status {
        status: status.as_u16(),
        body,
    })
}

/// Sets how often `index` refreshes (`-1`: never by itself). A recompute turns refreshes off
/// while it bulk-loads an index nobody searches yet (each refresh writes a segment; the
/// load's mgets read in real time and do not need them), and back on when it stops.
pub async fn set_refresh_interval(
    store: &ProfileStore,
    index: &str,
    interval: &str,
) -> Result<(), StoreError> {
    let resp = store
        .client()
        .indices()
        .put_settings(IndicesPutSettingsParts::Index(&[index]))
        .body(json!({"index": {"refresh_interval": interval}}))
        .send()
        .await?;
    check(resp).await.map(|_| ())
}

/// Moves `alias` from `from` to `to` in one `_aliases` request: a search through the alias
/// sees one index or the other, never neither.
pub async fn swap(
    store: &ProfileStore,
    alias: &str,
    from: Option<&str>,
    to: &str,
) -> Result<(), StoreError> {
    let mut actions = Vec::new();
    if let Some(from) = from {
        actions.push(json!({"remove": {"index": from, "alias": alias}}));
    }
    actions.push(json!({"add": {"index": to, "alias": alias, "is_write_index": true}}));
    let resp = store
        .client()
        .indices()
        .update_aliases()
        .body(json!({ "actions": actions }))
        .send()
        .await?;
    check(resp).await.map(|_| ())
}

/// The `_meta` of `index`'s mapping (`Null` when it has none).
pub async fn meta(store: &ProfileStore, index: &str) -> Result<Value, StoreError> {
    let resp = store
        .client()
        .indices()
        .get_mapping(IndicesGetMappingParts::Index(&[index]))
        .send()
        .await?;
    let body = check(resp).await?;
    Ok(body[index]["mappings"]["_meta"].clone())
}

/// Replaces the `_meta` of `index`'s mapping.
pub async fn set_meta(store: &ProfileStore, index: &str, meta: Value) -> Result<(), StoreError> {
    let resp = store
        .client()
        .indices()
        .put_mapping(IndicesPutMappingParts::Index(&[index]))
        .body(json!({ "_meta": meta }))
        .send()
        .await?;
    check(resp).await.map(|_| ())
}

/// Every index matching `pattern`, with its aliases (`{index: {"aliases": {…}}}`).
pub async fn aliases_of(store: &ProfileStore, pattern: &str) -> Result<Value, StoreError> {
    let resp = store
        .client()
        .indices()
        .get_alias(IndicesGetAliasParts::Index(&[pattern]))
        .send()
        .await?;
    check(resp).await
}

/// When each index matching `pattern` was created (epoch ms).
pub async fn creation_dates(
    store: &ProfileStore,
    pattern: &str,
) -> Result<BTreeMap<String, i64>, StoreError> {
    let resp = store
        .client()
        .indices()
        .get_settings(IndicesGetSettingsParts::IndexName(
            &[pattern],
            &["index.creation_date"],
        ))
        .send()
        .await?;
    let body = check(resp).await?;
    Ok(body
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(index, s)| {
            let ms = s["settings"]["index"]["creation_date"]
                .as_str()?
                .parse()
                .ok()?;
            Some((index.clone(), ms))
        })
        .collect())
}

/// Deletes `index`.
pub async fn delete(store: &ProfileStore, index: &str) -> Result<(), StoreError> {
    let resp = store
        .client()
        .indices()
        .delete(IndicesDeleteParts::Index(&[index]))
        .send()
        .await?;
    check(resp).await.map(|_| ())
}
