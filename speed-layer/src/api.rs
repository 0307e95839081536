//! The profile lookup API: a stateless HTTP tier in front of Elasticsearch.
//!
//! `GET /api/v1/getGender/{cid}?model=MODEL1|MODEL2|MODEL3` answers the seed's gender API:
//! the partner comes from the write key (as in ingest), `cid` is the user id. The answer is
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
use pulse_ingest::auth::{AuthFailure, WriteKeys};
use serde_json::json;

use crate::models::{registry, ModelKind};
use crate::store::ProfileStore;

pub struct ApiState {
    pub store: ProfileStore,
    pub keys: WriteKeys,
    pub kinds: Vec<ModelKind>,
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/v1/getGender/{cid}", get(get_gender))
        .route("/api/v1/profiles/{cid}", get(get_profile))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

impl ApiState {
    pub fn new(store: ProfileStore, keys: WriteKeys) -> Self {
        Self {
            store,
            keys,
            kinds: registry(),
        }
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

fn partner<'a>(state: &'a ApiState, headers: &HeaderMap) -> Result<&'a str, ApiError> {
    state.keys.partner_from_headers(headers).map_err(|f| {
        let msg = match f {
            AuthFailure::Missing => "missing key: send it as the HTTP Basic user or a Bearer token",
            AuthFailure::Unknown => "unknown key",
        };
        error(StatusCode::UNAUTHORIZED, msg)
    })
}

async fn load(state: &ApiState, partner: &str, cid: &str) -> Result<serde_json::Value, ApiError> {
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
            if let Some(o) = doc.as_object_mut() {
                o.remove("models");
            }
            Json(doc).into_response()
        }
        Err(r) => r.into_response(),
    }
}
