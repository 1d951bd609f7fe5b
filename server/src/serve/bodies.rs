//! Request bodies, read in full before a handler sees them: after the caller is
//! authenticated, within the route's size limit (a `Content-Length` over it is refused
//! before a byte is read), within `limits.body_timeout_s`, and inside a server-wide budget of
//! bytes held by bodies being read ([`BodyBudget`]), so memory stays bounded however many
//! clients send at once. A request waits for its share at most `limits.body_timeout_s`
//! (then 503 with a retry hint); a JSON body's share, cut to the body's length, stays with
//! the request until its texts are tokens (`HeldBody`: waiting for a tokenizing turn, the
//! parsed body is still memory this budget must count) and is given back before any model
//! work — from there the request, its parsed body with it, is one of at most
//! `limits.workers + limits.max_queue` in the model queue; an uploaded object's once it is
//! stored. KV objects —
//! uploads being read and exports being sent — draw on a budget of their own, so stalled
//! uploads or clients that stop reading their exports (their connections are closed after
//! `limits.send_timeout_s`, `connections`) never hold up model requests.
//!
//! Before, a body was read by the handler's extractor under one 64 MiB limit for every
//! route, with no deadline: a body sent a byte a second held its connection (and a stop)
//! for as long as the client liked, sixteen clients sending 60 MB bodies took the process
//! from 0.7 to 1.8 GB, and a chunk's own KV export (92 MB for 2,000 SmolLM2 tokens) could not
//! be uploaded back (found by a resource probe). Pinned by `server/tests/connections.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use http_body_util::{BodyExt, Limited};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use super::state::AppState;

/// Budget units: KiB (a semaphore counts permits in `u32` per acquisition).
const UNIT: u64 = 1024;

/// Bytes held at once by request bodies being read and KV objects being sent, counted in
/// KiB; a request waits for its share (never refused for it alone: its share is at most the
/// budget, which start-up checks against every limit). With a per-tenant bound
/// ([`BodyBudget::with_tenant_share`]) a tenant's shares together hold at most its part:
/// one tenant's slow bodies leave the others room (pinned by
/// `server/tests/connections.rs::one_tenant_cannot_take_the_whole_body_budget`).
#[derive(Debug)]
pub struct BodyBudget {
    units: Arc<Semaphore>,
    total: u64,
    /// `None`: no per-tenant bound.
    per_tenant: Option<TenantParts>,
}

/// Most units one tenant holds, and each tenant's semaphore of that many (made on its first
/// body).
#[derive(Debug)]
struct TenantParts {
    part: u64,
    by_name: parking_lot::Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// A share of the [`BodyBudget`] (and of its tenant's part), given back when dropped.
#[derive(Debug)]
pub struct BudgetShare {
    global: OwnedSemaphorePermit,
    tenant: Option<OwnedSemaphorePermit>,
}

impl BudgetShare {
    /// Gives back all of the share beyond `bytes` (whole KiB, at least one).
    pub fn shrink_to(&mut self, bytes: u64) {
        let keep = bytes.div_ceil(UNIT).max(1) as usize;
        for permit in std::iter::once(&mut self.global).chain(self.tenant.as_mut()) {
            let held = permit.num_permits();
            if held > keep {
                drop(permit.split(held - keep));
            }
        }
    }
}

/// Where the body middleware leaves a JSON request's share for its handler (a request
/// extension must be `Clone`; the share is taken out once).
#[derive(Debug, Clone)]
struct ShareSlot(Arc<parking_lot::Mutex<Option<BudgetShare>>>);

/// A JSON request's share of the body budget, taken by its handler (an extractor: put it
/// before the body's) and dropped once the request's texts are tokens. A handler that does
/// not take it gives the share back as its body is parsed (the request, with its
/// extensions, is dropped then). Empty for a request that did not pass the body middleware.
#[derive(Debug)]
pub(crate) struct HeldBody(#[allow(dead_code)] Option<BudgetShare>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for HeldBody {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        let share = parts
            .extensions
            .remove::<ShareSlot>()
            .and_then(|slot| slot.0.lock().take());
        Ok(Self(share))
    }
}

impl BodyBudget {
    /// A budget of `bytes` (at least one unit), with no per-tenant bound.
    pub fn new(bytes: u64) -> Self {
        let total = bytes.div_ceil(UNIT).clamp(1, u64::from(u32::MAX));
        Self {
            units: Arc::new(Semaphore::new(total as usize)),
            total,
            per_tenant: None,
        }
    }

    /// The budget with each tenant's shares bounded to `fraction` of it together (at least
    /// one unit; 1 or more: no bound). A share larger than a tenant's part takes the whole
    /// part.
    pub fn with_tenant_share(mut self, fraction: f64) -> Self {
        self.per_tenant = (fraction < 1.0).then(|| {
            let part = ((self.total as f64 * fraction) as u64).clamp(1, self.total);
            TenantParts {
                part,
                by_name: parking_lot::Mutex::new(HashMap::new()),
            }
        });
        self
    }

    /// Waits for `bytes` of the budget (capped at the whole budget). `None` only if the
    /// budget were closed, which it never is.
    pub async fn share(&self, bytes: u64) -> Option<BudgetShare> {
        let units = bytes.div_ceil(UNIT).clamp(1, self.total) as u32;
        let global = Arc::clone(&self.units)
            .acquire_many_owned(units)
            .await
            .ok()?;
        Some(BudgetShare {
            global,
            tenant: None,
        })
    }

    /// [`BodyBudget::share`] for `tenant`: its part first (when bounded), then the budget.
    pub async fn share_for(&self, tenant: &str, bytes: u64) -> Option<BudgetShare> {
        let Some(TenantParts { part, by_name }) = &self.per_tenant else {
            return self.share(bytes).await;
        };
        let own = Arc::clone(
            by_name
                .lock()
                .entry(tenant.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(*part as usize))),
        );
        let units = bytes.div_ceil(UNIT).clamp(1, *part) as u32;
        let tenant = own.acquire_many_owned(units).await.ok()?;
        let mut share = self.share(bytes).await?;
        share.tenant = Some(tenant);
        Some(share)
    }

    /// [`BodyBudget::share`], waiting at most `wait`; `None` when the budget stays full.
    pub async fn share_within(&self, bytes: u64, wait: Duration) -> Option<BudgetShare> {
        tokio::time::timeout(wait, self.share(bytes))
            .await
            .ok()
            .flatten()
    }

    /// [`BodyBudget::share_for`], waiting at most `wait`; `None` when the tenant's part or
    /// the budget stays full.
    pub async fn share_for_within(
        &self,
        tenant: &str,
        bytes: u64,
        wait: Duration,
    ) -> Option<BudgetShare> {
        tokio::time::timeout(wait, self.share_for(tenant, bytes))
            .await
            .ok()
            .flatten()
    }
}

/// Reads a POST or PUT body as the module says, then hands the request on with the body in
/// memory; other methods pass through (their handlers read no body).
pub(crate) async fn read_within_limits(
    State(s): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if req.method() != Method::POST && req.method() != Method::PUT {
        return next.run(req).await;
    }
    // an unauthenticated caller gets its 401 before its body costs anything
    let tenant = match s.tenants.authenticate_headers(req.headers()) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    // a PUT is a KV upload (`/v1/chunks/{id}/kv`, the only one); every POST is JSON
    let upload = req.method() == Method::PUT;
    let (limit, what, budget) = if upload {
        (s.kv_body_limit, "limits.max_kv_body_bytes", &s.kv_budget)
    } else {
        (
            s.limits.max_body_bytes,
            "limits.max_body_bytes",
            &s.body_budget,
        )
    };
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "the request body is larger than this server's limit of {limit} bytes ({what})"
            ),
        )
        .into_response()
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    let (mut parts, body) = req.into_parts();
    let deadline = Duration::from_secs(s.limits.body_timeout_s);
    let Some(mut share) = budget
        .share_for_within(&tenant.name, declared.unwrap_or(limit as u64), deadline)
        .await
    else {
        return busy();
    };
    let bytes: Bytes =
        match tokio::time::timeout(deadline, Limited::new(body, limit).collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
            Ok(Err(e)) => {
                return ApiError::bad_request(
                    "unreadable_body",
                    format!("the request body could not be read: {e}"),
                )
                .into_response();
            }
            Err(_) => {
                return ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!(
                        "the request body did not arrive within {} s (limits.body_timeout_s)",
                        s.limits.body_timeout_s
                    ),
                )
                .into_response();
            }
        };
    if !upload {
        // a JSON body's share goes with the request until its handler has tokenized it
        // (`HeldBody`); it never waits on model work
        share.shrink_to(bytes.len() as u64);
        parts
            .extensions
            .insert(ShareSlot(Arc::new(parking_lot::Mutex::new(Some(share)))));
        return next
            .run(Request::from_parts(parts, Body::from(bytes)))
            .await;
    }
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    drop(share);
    resp
}

/// 503 when the body budget stays full for a whole body deadline.
fn busy() -> Response {
    let mut resp = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_busy",
        "bodies in flight fill this server's budget for them, or this tenant's part of it (limits.body_budget_bytes, limits.tenant_body_share); retry later",
    )
    .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    resp
}

/// A response body of `parts`, one after another, that holds `share` until its last piece
/// is handed to the connection (a KV export's memory stays counted while it is sent). Parts
/// are sent in pieces of at most 1 MiB that share their memory: nothing is copied.
pub(crate) fn budgeted_body(parts: Vec<Bytes>, share: Option<BudgetShare>) -> Body {
    let stream = futures_util::stream::iter(pieces(parts).into_iter().map(Ok::<_, std::io::Error>))
        .chain(futures_util::stream::once(async move {
            drop(share);
            Ok(Bytes::new())
        }));
    Body::from_stream(stream)
}

/// `parts` cut into pieces of at most [`PIECE`] bytes (slices of the parts, no copies);
/// empty parts are left out.
fn pieces(parts: Vec<Bytes>) -> Vec<Bytes> {
    parts
        .into_iter()
        .flat_map(|p| {
            (0..p.len().div_ceil(PIECE))
                .map(move |i| p.slice(i * PIECE..((i + 1) * PIECE).min(p.len())))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Most bytes of one piece of a budgeted body.
const PIECE: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces are slices of the parts (the export's object is not copied), in order, none
    /// longer than a piece.
    #[test]
    fn pieces_are_slices_of_the_parts_in_order() {
        let parts = vec![
            Bytes::from(vec![1u8; 10]),
            Bytes::new(),
            Bytes::from((0..(2 * PIECE + 5)).map(|i| i as u8).collect::<Vec<_>>()),
        ];
        let p = pieces(parts.clone());
        assert_eq!(p.len(), 1 + 3);
        assert!(p.iter().all(|x| !x.is_empty() && x.len() <= PIECE));
        let joined: Vec<u8> = p.iter().flat_map(|x| x.iter().copied()).collect();
        let want: Vec<u8> = parts.iter().flat_map(|x| x.iter().copied()).collect();
        assert_eq!(joined, want);
        let big = &parts[2];
        let inside = |x: &Bytes| {
            let (a, b) = (big.as_ptr() as usize, x.as_ptr() as usize);
            b >= a && b + x.len() <= a + big.len()
        };
        assert!(p[1..].iter().all(inside), "no copies");
    }

    #[tokio::test]
    async fn a_share_waits_until_the_budget_has_room() {
        let budget = Arc::new(BodyBudget::new(4 * UNIT));
        let first = budget.share(3 * UNIT).await;
        // 2 KiB more do not fit beside 3 of 4
        let b = Arc::clone(&budget);
        let waiting = tokio::spawn(async move { b.share(2 * UNIT).await.is_some() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        drop(first);
        assert!(waiting.await.unwrap());
        // a request larger than the whole budget takes all of it instead of waiting forever
        assert!(budget.share(100 * UNIT).await.is_some());
    }

    #[tokio::test]
    async fn a_budgeted_body_holds_its_share_until_sent() {
        let budget = BodyBudget::new(2 * UNIT);
        let share = budget.share(2 * UNIT).await;
        let data = Bytes::from(vec![7u8; (1 << 20) + 5]);
        let body = budgeted_body(vec![data.clone()], share);
        assert_eq!(budget.units.available_permits(), 0);
        let sent = body.collect().await.unwrap().to_bytes();
        assert_eq!(sent, data);
        assert_eq!(budget.units.available_permits(), 2);
    }
}
