//! Operations: `/health`, `/metrics`, `/v1/stats`, `/openapi.json`.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kvquilt_api::ops::{PoolStats, TenantUsage};
use kvquilt_api::{Health, Stats};
use serde_json::Value;

use crate::serve::error::ApiError;
use crate::serve::state::AppState;
use crate::serve::tenants::{Caller, Tenant};
use crate::serve::wire;

/// `GET /health`: answers without touching the model pool or the store.
pub(crate) async fn health(State(s): State<AppState>) -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok".into(),
        model: s.model_name.clone(),
        uptime_s: s.started.elapsed().as_secs_f64(),
    })
}

/// `GET /metrics`: Prometheus/OpenMetrics text, store-wide: the default tenant's (the
/// operator's) only; another tenant gets 403.
pub(crate) async fn metrics(
    State(s): State<AppState>,
    Caller(tenant): Caller,
) -> Result<Response, ApiError> {
    operator_only(&tenant, "/metrics shows store-wide figures", "read it")?;
    let mut resp = s.metrics.render().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(resp)
}

/// Refuses any tenant but the default one (the operator): `why` the operation is the
/// operator's (store-wide figures would show a tenant how much others store, and when their
/// objects come and go; pins hold memory all share), and `what` the others may not do.
pub(super) fn operator_only(tenant: &Tenant, why: &str, what: &str) -> Result<(), ApiError> {
    if tenant.is_operator() {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "operator_only",
        format!("{why}; only the default tenant's tokens may {what}"),
    ))
}

/// `GET /v1/stats`: the caller's usage; to the default tenant (the operator) also the
/// server-wide figures — the store's tiers, the model pool, the learned prefill cost — which
/// would show any other tenant when other tenants' requests run and their objects come and
/// go (test `server/tests/router.rs::tenants_are_isolated_and_quotas_hold`).
pub(crate) async fn stats(State(s): State<AppState>, Caller(tenant): Caller) -> axum::Json<Stats> {
    let operator =
        operator_only(&tenant, "/v1/stats shows store-wide figures", "read them").is_ok();
    let tiers = if operator {
        s.blender
            .tier_stats()
            .iter()
            .map(wire::tier_stats)
            .collect()
    } else {
        Vec::new()
    };
    axum::Json(Stats {
        model: s.model_name.clone(),
        uptime_s: s.started.elapsed().as_secs_f64(),
        tiers,
        pool: operator.then(|| PoolStats {
            workers: s.limits.workers,
            running: s.pool.running(),
            waiting: s.pool.waiting(),
        }),
        tenant: TenantUsage {
            name: tenant.name.clone(),
            used_bytes: tenant.used_bytes(),
            quota_bytes: tenant.quota_bytes,
            pinned_bytes: tenant.pinned_bytes(s.blender.store().pins(), None),
            pin_bytes: (!operator).then_some(tenant.pin_bytes),
        },
        prefill_s_per_1k_tokens: if operator {
            s.blender.costs().prefill_s(1000)
        } else {
            None
        },
        key_identity: Some(wire::key_identity(s.blender.identity())),
    })
}

/// `GET /openapi.json`.
pub(crate) async fn openapi() -> axum::Json<Value> {
    axum::Json(crate::serve::openapi::document())
}
