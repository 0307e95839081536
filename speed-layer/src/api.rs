//! The profile lookup API: a stateless HTTP tier in front of Elasticsearch.
//!
//! `GET /api/v1/getGender/{cid}?model=MODEL1|MODEL2|MODEL3` answers the seed's gender API and
//! `GET /api/v1/profiles/{cid}` the whole profile: the partner comes from its secret **read
//! key** (never from a write key, which is public: it ships in apps and browsers), `cid` is
//! the user id, or an anonymous id (a device merged into a person answers for the person).
//! The answer is
//! computed from the model state stored in the profile, with the current time, so a windowed
//! model (MODEL3) forgets old visits even for a user who has not come back since.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use pulse_service::keys::{key_from_headers, PartnerKeys};
use serde_json::json;

use crate::models::{registry, ModelKind};
use crate::store::ProfileStore;

pub struct ApiState {
    pub store: ProfileStore,
    /// The secrets that read a partner's profiles.
    pub read_keys: PartnerKeys,
    /// Known only to answer "this is a write key" instead of "unknown key"; never accepted.
    pub write_keys: Option<PartnerKeys>,
    pub kinds: Vec<ModelKind>,
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/v1/getGender/{cid}", get(get_gender))
        .route("/api/v1/profiles/{cid}", get(get_profile))
        .route("/readyz", get(readyz))
        .merge(pulse_service::ops::routes(
            pulse_service::ops::recorder(&[]),
        ))
        .with_state(state)
}

impl ApiState {
    /// Refuses a key configured both as a read key and as a write key.
    pub fn new(
        store: ProfileStore,
        read_keys: PartnerKeys,
        write_keys: Option<PartnerKeys>,
    ) -> Result<Self, pulse_service::keys::KeysError> {
        if let Some(write) = &write_keys {
            read_keys.check_disjoint(write)?;
        }
        Ok(Self {
            store,
            read_keys,
            write_keys,
            kinds: registry(),
        })
    }
}

/// An error answer: status and a message naming what is wrong.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError(status, message.into())
}

/// The partner of the request's read key: 401 without a key or with an unknown one, 403 with
/// a write key (it is valid, but public, so it reads nothing).
fn partner<'a>(state: &'a ApiState, headers: &HeaderMap) -> Result<&'a str, ApiError> {
    let Some(key) = key_from_headers(headers) else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "missing read key: send the partner's secret read key as the HTTP Basic user or a Bearer token",
        ));
    };
    if let Ok(partner) = state.read_keys.partner_of(&key) {
        return Ok(partner);
    }
    let is_write_key = state
        .write_keys
        .as_ref()
        .is_some_and(|w| w.partner_of(&key).is_ok());
    if is_write_key {
        return Err(error(
            StatusCode::FORBIDDEN,
            "this is a write key: write keys are public (they ship in apps and browsers) and \
             only send events; reading profiles needs the partner's secret read key",
        ));
    }
    Err(error(StatusCode::UNAUTHORIZED, "unknown read key"))
}

/// The profile of `cid`: the person's, when `cid` is an anonymous id merged into one (the
/// device's own document is then only a pointer to the person).
async fn load(state: &ApiState, partner: &str, cid: &str) -> Result<serde_json::Value, ApiError> {
    let doc = get_doc(state, partner, cid).await?;
    let Some(person) = doc.get("merged_into").and_then(|v| v.as_str()) else {
        return Ok(doc);
    };
    get_doc(state, partner, person).await.map_err(|e| match e.0 {
        StatusCode::NOT_FOUND => error(
            StatusCode::NOT_FOUND,
            format!("{cid} was merged into {person}, whose profile is not stored yet (within a flush interval)"),
        ),
        _ => e,
    })
}

async fn get_doc(
    state: &ApiState,
    partner: &str,
    cid: &str,
) -> Result<serde_json::Value, ApiError> {
    let id = pulse_core::event::partition_key(partner, cid);
    match state.store.get(&id).await {
        Ok(Some(doc)) => Ok(doc),
        Ok(None) => Err(error(StatusCode::NOT_FOUND, format!("unknown user {cid}"))),
        Err(e) => {
            tracing::error!(error = %e, "profile lookup failed");
            Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "profile store unavailable",
            ))
        }
    }
}

/// Ready while Elasticsearch answers a document read through the profiles alias (of a
/// document that does not exist: "not found" is an answer, an error or no answer is not).
async fn readyz(State(state): State<Arc<ApiState>>) -> Response {
    match state.store.get("readyz-probe").await {
        Ok(_) => (StatusCode::OK, "ready").into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("elasticsearch unavailable: {e}"),
        )
            .into_response(),
    }
}

async fn get_gender(
    State(state): State<Arc<ApiState>>,
    Path(cid): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let partner = match partner(&state, &headers) {
        Ok(p) => p.to_string(),
        Err(r) => return r.into_response(),
    };
    let name = params.get("model").map(String::as_str).unwrap_or("MODEL1");
    let Some(kind) = state
        .kinds
        .iter()
        .find(|k| k.name.eq_ignore_ascii_case(name))
    else {
        let known: Vec<&str> = state.kinds.iter().map(|k| k.name).collect();
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown model {name}; known: {}", known.join(", ")),
        )
        .into_response();
    };
    let doc = match load(&state, &partner, &cid).await {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    let gender = match doc.get("models").and_then(|m| m.get(kind.name)) {
        Some(stored) => kind.load(stored.clone()).answer(Utc::now()),
        // Model not enabled on the speed layer: fall back to the written answer, if any.
        None => doc
            .get(kind.field)
            .and_then(|g| g.as_str())
            .map(str::to_string),
    };
    Json(json!({"cid": cid, "model": kind.name, "gender": gender})).into_response()
}

async fn get_profile(
    State(state): State<Arc<ApiState>>,
    Path(cid): Path<String>,
    headers: HeaderMap,
) -> Response {
    let partner = match partner(&state, &headers) {
        Ok(p) => p.to_string(),
        Err(r) => return r.into_response(),
    };
    match load(&state, &partner, &cid).await {
        Ok(mut doc) => {
            // Internal state, not the profile: model state, the dedupe digests and the source
            // positions of merges.
            if let Some(o) = doc.as_object_mut() {
                o.remove("models");
                o.remove("dedupe");
                if let Some(identity) = o.get_mut("identity").and_then(|i| i.as_object_mut()) {
                    identity.remove("sources");
                }
            }
            Json(doc).into_response()
        }
        Err(r) => r.into_response(),
    }
}
