//! `/v1/chunks`: precompute and store chunks, look them up, delete them, and move their KV
//! objects in and out (the binary object format of `kvstore`, for engines).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kvquilt_api::ChunkRef;
use kvquilt_api::chunks::ChunkOutcome;
use kvquilt_api::{
    ChunkInfo, ChunkInfoQuery, ChunkLookup, ChunkStatus, DeleteChunkQuery, DeleteChunkResponse,
    LookupChunksRequest, LookupChunksResponse, MAX_PIN_TTL_S, OBJECT_MEDIA_TYPE, PinRequest,
    Pinned, PutChunksRequest, PutChunksResponse,
};
use kvquilt_kvstore::{ChunkKey, Codec, EncodedObject, Found, Pin, TierKind};

use super::chunk_ref::{check_text_bytes, check_tokens, resolve_all};
use crate::serve::bodies::HeldBody;
use crate::serve::error::{ApiError, ApiResult};
use crate::serve::extract::{ApiBytes, ApiJson, ChunkIdPath};
use crate::serve::state::{AppState, Shared, unknown_chunk};
use crate::serve::tenants::{Caller, QuotaReservation, Tenant};
use crate::serve::wire;

/// `POST /v1/chunks`: precompute and store each chunk (content-addressed: a stored chunk
/// costs a lookup).
pub(crate) async fn create(
    State(s): State<AppState>,
    Caller(tenant): Caller,
    held: HeldBody,
    ApiJson(req): ApiJson<PutChunksRequest>,
) -> ApiResult<axum::Json<PutChunksResponse>> {
    if req.chunks.is_empty() {
        return Err(ApiError::bad_request("no_chunks", "`chunks` is empty"));
    }
    check_text_bytes(&s, req.chunks.iter().map(ChunkRef::text_len))?;
    let all = resolve_all(&s, &tenant, &req.chunks).await?;
    drop((held, req));
    // the limit is per request (every chunk is a prefill on the one worker it holds)
    check_tokens(&s, all.iter().map(Vec::len).sum())?;
    let codec = s.blender.codec(&tenant.namespace);
    let layout = *codec.layout();
    let new_bytes: u64 = all
        .iter()
        .filter(|t| s.blender.store().locate(&codec.key(t)).is_none())
        .map(|t| layout.object_bytes(t.len()))
        .sum();
    let quota = check_quota(&s, &tenant, new_bytes)?;
    let st = Arc::clone(&s);
    let tenant2 = Arc::clone(&tenant);
    // stops at the first failure (a full disk: 507); what was stored before it is counted.
    // The reservation and the accounting go with the work: once it runs it finishes even if
    // the client leaves (the handler's future dropped), and what it stored is charged to the
    // tenant all the same (it was once charged only by the handler, after the work)
    let (results, failed) = s
        .pool
        .run(move || {
            let _quota = quota;
            let mut done = Vec::with_capacity(all.len());
            for t in &all {
                match st.blender.precompute(&tenant2.namespace, t) {
                    Ok(p) => {
                        tenant2.add(p.key, layout.object_bytes(p.tokens), None);
                        done.push(p);
                    }
                    Err(e) => return (done, Some(e)),
                }
            }
            (done, None)
        })
        .await?;
    if let Some(e) = failed {
        let mut err = ApiError::from(e);
        if !results.is_empty() {
            let ids: Vec<String> = results.iter().map(|p| p.key.to_hex()).collect();
            err.message = format!(
                "{} (the {} chunk(s) before it were stored: {})",
                err.message,
                results.len(),
                ids.join(", ")
            );
        }
        return Err(err);
    }
    let store = s.blender.store();
    let chunks = results
        .into_iter()
        .map(|p| ChunkStatus {
            id: p.key.to_hex(),
            tokens: p.tokens,
            status: if p.found_in.is_some() {
                ChunkOutcome::Hit
            } else {
                ChunkOutcome::Stored
            },
            tier: p.found_in.map(wire::tier),
            durable: store.held_durably(&p.key),
        })
        .collect();
    Ok(axum::Json(PutChunksResponse {
        model: s.model_name.clone(),
        chunks,
    }))
}

/// Reserves `extra` bytes of `tenant`'s quota for a write (hold the reservation until what
/// was stored is added to the tenant), or refuses a write that would pass the quota.
pub(crate) fn check_quota(
    s: &Shared,
    tenant: &Arc<Tenant>,
    extra: u64,
) -> ApiResult<QuotaReservation> {
    let store = s.blender.store();
    if let Some(r) = tenant.reserve(extra, || store.departures(), |k| store.locate(k).is_some()) {
        return Ok(r);
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "quota_exceeded",
        format!(
            "storing {extra} more bytes would exceed tenant `{}`'s quota: {} of {} bytes used, {} reserved by writes in flight",
            tenant.name,
            tenant.used_bytes(),
            tenant.quota_bytes.unwrap_or(u64::MAX),
            tenant.reserved_bytes()
        ),
    ))
}

/// Who may pin: the operator (the default tenant), and a tenant given a pin budget
/// (`pin_bytes`): pins hold memory every tenant shares.
fn may_pin(tenant: &Tenant) -> ApiResult<()> {
    if tenant.pin_bytes > 0 {
        return Ok(());
    }
    super::ops::operator_only(
        tenant,
        "pins hold memory every tenant shares, and this tenant has no pin budget (`pin_bytes`)",
        "pin without one",
    )
}

/// Refuses a pin of `key` (`bytes` decoded) that would take `tenant`'s pinned chunks past
/// its `pin_bytes` (the operator's pins have no limit): 403 `pin_budget_exceeded`. A chunk
/// already pinned (given a new time to live) counts once. Call under
/// [`Tenant::pin_guard`].
fn within_pin_budget(s: &Shared, tenant: &Tenant, key: &ChunkKey, bytes: u64) -> ApiResult<()> {
    if tenant.is_operator() {
        return Ok(());
    }
    let others = tenant.pinned_bytes(s.blender.store().pins(), Some(key));
    if others.saturating_add(bytes) <= tenant.pin_bytes {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "pin_budget_exceeded",
        format!(
            "pinning {bytes} more bytes would exceed tenant `{}`'s pin budget: {others} of {} bytes pinned (unpin a chunk, or pin for a time: `ttl_s`)",
            tenant.name, tenant.pin_bytes
        ),
    ))
}

/// `POST /v1/chunks/lookup`: where each chunk is held in the caller's tenant — the fastest
/// store tier, a remote tier asked (one round trip for the lot) about those no local tier
/// holds — computing, storing and charging nothing: what a router asks each sidecar before
/// sending a request where its documents are. Texts and token ids only (an id is looked up
/// with `HEAD /v1/chunks/{id}`). With `prefetch`, chunks held below the host tier are read
/// up into it after the answer, as a request's hits are promoted (each verified as any read
/// is, a key already being promoted left to that promotion, a failed read logged); at most
/// one lookup's prefetch runs at a time, and one asked while another runs is skipped.
pub(crate) async fn lookup(
    State(s): State<AppState>,
    Caller(tenant): Caller,
    held: HeldBody,
    ApiJson(req): ApiJson<LookupChunksRequest>,
) -> ApiResult<axum::Json<LookupChunksResponse>> {
    if req.chunks.is_empty() {
        return Err(ApiError::bad_request("no_chunks", "`chunks` is empty"));
    }
    if let Some(i) = req
        .chunks
        .iter()
        .position(|c| matches!(c, ChunkRef::Spec(spec) if spec.id.is_some()))
    {
        return Err(ApiError::bad_request(
            "invalid_chunk",
            format!("chunk {i} is an id: look ids up with HEAD /v1/chunks/{{id}}"),
        ));
    }
    check_text_bytes(&s, req.chunks.iter().map(ChunkRef::text_len))?;
    let all = resolve_all(&s, &tenant, &req.chunks).await?;
    let prefetch = req.prefetch;
    drop((held, req));
    let codec = s.blender.codec(&tenant.namespace);
    let keys: Vec<ChunkKey> = all.iter().map(|t| codec.key(t)).collect();
    let store = Arc::clone(s.blender.store());
    let tiers = store.probe(&keys).await;
    let below: Vec<ChunkKey> = keys
        .iter()
        .zip(&tiers)
        .filter(|(_, t)| t.is_some_and(|t| t != TierKind::HOST))
        .map(|(k, _)| *k)
        .collect();
    if prefetch
        && !below.is_empty()
        && let Ok(permit) = Arc::clone(&s.prefetching).try_acquire_owned()
    {
        tokio::spawn(async move {
            let _permit = permit;
            for key in below {
                if let Err(e) = store.get_promoting_later(&key).await {
                    tracing::warn!(%key, error = %e, "prefetching a chunk failed; left where it was");
                }
            }
        });
    }
    let chunks = keys
        .iter()
        .zip(&all)
        .zip(tiers)
        .map(|((key, tokens), tier)| ChunkLookup {
            id: key.to_hex(),
            tokens: tokens.len(),
            tier: tier.map(wire::tier),
        })
        .collect();
    Ok(axum::Json(LookupChunksResponse { chunks }))
}

/// `GET /v1/chunks/{id}` (and `HEAD`, which axum answers from it without the body).
pub(crate) async fn info(
    State(s): State<AppState>,
    Caller(tenant): Caller,
    ChunkIdPath(id): ChunkIdPath,
    q: Result<Query<ChunkInfoQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<axum::Json<ChunkInfo>> {
    let Query(q) = q.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let key = Shared::parse_id(&id)?;
    let found = s.require_owned(&tenant, &key).await?;
    Ok(axum::Json(chunk_info(&s, &key, &found, q.include_tokens)))
}

/// What `GET /v1/chunks/{id}` says of a stored chunk.
fn chunk_info(s: &Shared, key: &ChunkKey, found: &Found, include_tokens: bool) -> ChunkInfo {
    let pinned = s.blender.store().pins().active(key).map(|p| Pinned {
        until_unix_s: match p {
            Pin::Hard => None,
            Pin::Soft { until_unix_s } => Some(until_unix_s),
        },
    });
    ChunkInfo {
        id: key.to_hex(),
        tokens: found.info.tokens.len(),
        tier: wire::tier(found.tier),
        bytes: found.info.raw_len(),
        layout: wire::layout(&found.info.layout),
        token_ids: include_tokens.then(|| found.info.tokens.clone()),
        pinned,
    }
}

/// `POST /v1/chunks/{id}/pin`: keeps a stored chunk from eviction in every local tier that
/// holds it (the SSD tier persists the pin across restarts; a remote tier keeps objects by
/// its own time to live), until unpinned or for `ttl_s` seconds; a new pin replaces the
/// old. Pins hold memory every tenant shares, and a host tier full of pinned chunks admits
/// nothing new (requests then read from the tiers below or recompute): the operator (the
/// default tenant) pins without a limit, another tenant up to its `pin_bytes` of decoded
/// KV at once (none by default; [`within_pin_budget`]). Answers the chunk's metadata.
pub(crate) async fn pin(
    State(s): State<AppState>,
    Caller(tenant): Caller,
    ChunkIdPath(id): ChunkIdPath,
    ApiJson(body): ApiJson<PinRequest>,
) -> ApiResult<axum::Json<ChunkInfo>> {
    may_pin(&tenant)?;
    let key = Shared::parse_id(&id)?;
    let pin = match body.ttl_s {
        None => Pin::Hard,
        Some(t) if (1..=MAX_PIN_TTL_S).contains(&t) => Pin::soft(std::time::Duration::from_secs(t)),
        Some(t) => {
            return Err(ApiError::bad_request(
                "invalid_ttl",
                format!("`ttl_s` must be within 1..={MAX_PIN_TTL_S} seconds (got {t})"),
            ));
        }
    };
    // (one pin of the tenant's at a time: its check and its pin are one step)
    let _one_at_a_time = tenant.pin_guard().await;
    let found = s.require_owned(&tenant, &key).await?;
    within_pin_budget(&s, &tenant, &key, found.info.raw_len())?;
    let store = s.blender.store();
    store.pin(&key, pin).await?;
    // deleted meanwhile: no pin is left behind for a chunk stored again later
    let found = match s.require_owned(&tenant, &key).await {
        Ok(found) => found,
        Err(e) => {
            store.unpin(&key).await?;
            return Err(e);
        }
    };
    Ok(axum::Json(chunk_info(&s, &key, &found, false)))
}

/// `DELETE /v1/chunks/{id}/pin`: lets a stored chunk be evicted again (a chunk without a
/// pin is answered as it is; its owner's tokens, whatever its pin budget now). Answers the
/// chunk's metadata.
pub(crate) async fn unpin(
    State(s): State<AppState>,
    Caller(tenant): Caller,
    ChunkIdPath(id): ChunkIdPath,
) -> ApiResult<axum::Json<ChunkInfo>> {
    let key = Shared::parse_id(&id)?;
    let found = s.require_owned(&tenant, &key).await?;
    s.blender.store().unpin(&key).await?;
    Ok(axum::Json(chunk_info(&s, &key, &found, false)))
}

/// `DELETE /v1/chunks/{id}`: removes it from every tier (204). With `descendants=true`,
/// first every chain link of the tenant's that extends it ([`Tenant::descendants`]: a
/// conversation from that page on), the furthest first, so that a failure part-way (a
/// tier's error answers 500) leaves every remaining page reachable from its chain's start,
/// never a page after a gap; answers the ids deleted (200), or 404 when none was held. (A
/// turn in flight may store a page after a deleted one meanwhile: no read reaches it and
/// neither does a later walk from an earlier page; it stays charged until deleted by its
/// own id or evicted.)
///
/// [`Tenant::descendants`]: crate::serve::tenants::Tenant::descendants
pub(crate) async fn delete(
    State(s): State<AppState>,
    Caller(tenant): Caller,
    ChunkIdPath(id): ChunkIdPath,
    q: Result<Query<DeleteChunkQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let key = Shared::parse_id(&id)?;
    // (a page the store evicted is still walked from while its tenant's ledger knows it:
    // the pages after it may be held)
    if !(q.descendants && tenant.owns(&key)) {
        s.require_owned(&tenant, &key).await?;
    }
    if !q.descendants {
        if !s.blender.remove(&key).await? {
            return Err(unknown_chunk(&key));
        }
        tenant.forget(&key);
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let mut deleted = Vec::new();
    for k in tenant.descendants(&key).iter().rev().chain([&key]) {
        // (a page the store has evicted since is only forgotten)
        if s.blender.remove(k).await? {
            deleted.push(k.to_hex());
        }
        tenant.forget(k);
    }
    if deleted.is_empty() {
        return Err(unknown_chunk(&key));
    }
    Ok(axum::Json(DeleteChunkResponse { deleted }).into_response())
}

/// `GET /v1/chunks/{id}/kv`: the object's bytes (raw codec; checksums included).
pub(crate) async fn get_kv(
    State(s): State<AppState>,
    Caller(tenant): Caller,
    ChunkIdPath(id): ChunkIdPath,
) -> ApiResult<Response> {
    let key = Shared::parse_id(&id)?;
    let found = s.require_owned(&tenant, &key).await?;
    // the object counts against the KV budget from before it is read (an export read from
    // the SSD or the remote is a new copy in memory) until it is handed to the connection
    // (a client that stops reading is cut off after limits.send_timeout_s)
    let Some(share) = s
        .kv_budget
        .share_for_within(
            &tenant.name,
            found.info.raw_len(),
            std::time::Duration::from_secs(s.limits.body_timeout_s),
        )
        .await
    else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_busy",
            "KV exports in flight fill this server's budget (limits.body_budget_bytes); retry later",
        ));
    };
    let Some((obj, _tier)) = s.blender.store().get_promoting_later(&key).await? else {
        return Err(unknown_chunk(&key));
    };
    if let Some(codec) = obj.lossy() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "lossy_object",
            format!("chunk {key} is stored only as {codec} (lossy); its exact KV is not held here"),
        ));
    }
    let share = Some(share);
    // the header, then the records: raw records are the object's own layer bytes, so the
    // export holds no second copy of the object
    let enc = obj.encode(Codec::Raw)?;
    let mut parts = Vec::with_capacity(1 + enc.records.len());
    parts.push(enc.header_bytes);
    parts.extend(enc.records);
    let length = HeaderValue::from(parts.iter().map(|p| p.len()).sum::<usize>());
    let mut resp = crate::serve::bodies::budgeted_body(parts, share).into_response();
    resp.headers_mut().insert(header::CONTENT_LENGTH, length);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(OBJECT_MEDIA_TYPE),
    );
    Ok(resp)
}

/// Runs `work` on tokio's blocking pool (what `doing` is, for the error a panic in it gives).
async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
    doing: &str,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("{doing} failed: {e}")))
}

/// `PUT /v1/chunks/{id}/kv`: stores an object made elsewhere. It must parse, every checksum
/// must hold, its layout must be this model's, and it must be this tenant's object `id`
/// for this model: its tokens' chunk key, or a link of the tenant's own chain after a
/// prefix the tenant holds (so nobody can plant KV under another tenant's id, chunk or
/// page).
pub(crate) async fn put_kv(
    State(s): State<AppState>,
    Caller(tenant): Caller,
    ChunkIdPath(id): ChunkIdPath,
    ApiBytes(body): ApiBytes,
) -> ApiResult<(StatusCode, axum::Json<ChunkStatus>)> {
    let key = Shared::parse_id(&id)?;
    // parsing verifies every record's checksum (its records are views into the body) and
    // decoding copies them, hundreds of MB for a long chunk: both off the async runtime's
    // threads
    let encoded = off_runtime(
        move || EncodedObject::parse_shared(body, Some(&key)),
        "parsing the object",
    )
    .await??;
    let codec = s.blender.codec(&tenant.namespace);
    let info = &encoded.header.info;
    if info.layout != *codec.layout() {
        return Err(ApiError::bad_request(
            "layout_mismatch",
            format!(
                "the object's KV layout {:?} is not this model's {:?}",
                info.layout,
                codec.layout()
            ),
        ));
    }
    check_tokens(&s, info.tokens.len())?;
    if !codec.names(info) {
        let why = match &info.chain {
            None => format!(
                "the object's tokens make chunk id {} for this model and tenant, not {key}",
                codec.key(&info.tokens)
            ),
            Some(_) => format!(
                "the object is a link of a prefix chain that is not this tenant's under this model, or whose parent and tokens do not make {key}"
            ),
        };
        return Err(ApiError::bad_request("key_mismatch", why));
    }
    // a link extends a prefix the tenant holds (or starts its chain): a link naming another
    // tenant's prefix as its parent — whose key it could derive only for the default
    // tenant's guessable chains — would sit under that tenant's next page key, refused
    // there (it records another root) yet blocking the page from ever being stored
    if let Some(link) = &info.chain
        && link.parent != link.root
        && s.owned_info(&tenant, &link.parent).await?.is_none()
    {
        return Err(ApiError::bad_request(
            "unknown_parent",
            format!(
                "the object is a link after prefix {}, which this tenant does not hold: upload a chain from its first link",
                link.parent
            ),
        ));
    }
    let tokens = info.tokens.len();
    let parent = info.chain.map(|l| l.parent);
    if let Some(tier) = s.blender.store().locate(&key) {
        return Ok((
            StatusCode::OK,
            axum::Json(ChunkStatus {
                id: key.to_hex(),
                tokens,
                status: ChunkOutcome::Hit,
                tier: Some(wire::tier(tier)),
                durable: s.blender.store().held_durably(&key),
            }),
        ));
    }
    let bytes = codec.layout().object_bytes(tokens);
    let quota = check_quota(&s, &tenant, bytes)?;
    let obj = off_runtime(move || encoded.decode(), "decoding the object").await??;
    // the put and its accounting run as a task of their own: a client that leaves mid-put
    // (the handler's future dropped) cannot leave the object stored and uncharged
    let (st, tenant2) = (Arc::clone(&s), Arc::clone(&tenant));
    tokio::spawn(async move {
        let _quota = quota;
        st.blender.store().put(obj, 0.0).await?;
        tenant2.add(key, bytes, parent);
        Ok::<_, kvquilt_kvstore::StoreError>(())
    })
    .await
    .map_err(|e| ApiError::internal(format!("storing the object failed: {e}")))??;
    Ok((
        StatusCode::CREATED,
        axum::Json(ChunkStatus {
            id: key.to_hex(),
            tokens,
            status: ChunkOutcome::Stored,
            tier: None,
            durable: s.blender.store().held_durably(&key),
        }),
    ))
}
