//! What every handler shares: the blender (model + store), tokenizer, chat template,
//! tenants, limits, the model pool and metrics.

use kvquilt_blend::calibration::BlendDefault;
use std::sync::Arc;
use std::time::Instant;

use kvquilt_blend::Blender;
use kvquilt_kvstore::{ChunkKey, Found};
use kvquilt_model::{ChatTemplate, Tokenizer};

use super::config::Limits;
use super::error::{ApiError, ApiResult};
use super::metrics::Metrics;
use super::pool::ModelPool;
use super::tenants::{Tenant, Tenants};

/// What handlers receive: the shared state behind an `Arc`.
pub type AppState = Arc<Shared>;

/// Everything the handlers share; built once by [`super::app_state`].
pub struct Shared {
    /// The model, its identity and the store.
    pub blender: Arc<Blender>,
    /// The model's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The model's chat template (ChatML when it ships none).
    pub template: Arc<ChatTemplate>,
    /// The name `/v1/models` lists and completions answer with.
    pub model_name: String,
    /// What `blend` without a ratio runs: the model's calibration record, or `prefix`.
    pub blend_default: BlendDefault,
    /// Bearer tokens → tenants.
    pub tenants: Tenants,
    /// Request limits.
    pub limits: Limits,
    /// Largest uploaded KV object, bytes (`limits.max_kv_body_bytes`, or sized to the model).
    pub kv_body_limit: usize,
    /// Bytes of JSON request bodies being read at once.
    pub body_budget: super::bodies::BodyBudget,
    /// Bytes of KV objects in flight at once: uploads being read and exports being sent (a
    /// budget of the same size, apart, so bulk KV transfers never hold up model requests).
    pub kv_budget: super::bodies::BodyBudget,
    /// The bounded pool model work runs on.
    pub pool: ModelPool,
    /// Tokenizing, a bounded number of texts at once.
    pub tokenizing: super::tokenizing::Tokenizing,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Start-up time (for `uptime_s`).
    pub started: Instant,
    /// One permit: the lookup prefetch that may run (`POST /v1/chunks/lookup`).
    pub prefetching: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    /// Parses a chunk id (64 hex digits).
    pub fn parse_id(id: &str) -> ApiResult<ChunkKey> {
        ChunkKey::from_hex(id).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_chunk_id",
                format!("`{id}` is not a chunk id (64 hexadecimal digits)"),
            )
        })
    }

    /// What chunk `key` holds, if it is stored **and** belongs to `tenant`: the tenant must
    /// know it as its own ([`Tenant::owns`], checked in memory first, so that another
    /// tenant's id costs what an id never stored costs: no timing oracle), and the id must
    /// be the tenant's own name of the object ([`kvquilt_blend::ChunkCodec::names`]: its
    /// chunk key of the object's tokens, or for a page of a conversation's history or a
    /// link of `prefix` mode's chain, a link of the tenant's own chain). Another tenant's id
    /// is "unknown", exactly like an id never stored.
    ///
    /// With a remote tier, chunks also come from other sidecars (and from this one before a
    /// restart: the remote lists no keys at start): an id not known here is looked up, and
    /// adopted when it is the tenant's own key of the stored tokens. Another tenant's id is
    /// then still "unknown", but its lookup costs a remote read (ids are keys salted by the
    /// tenant's secret namespace: one cannot be guessed, only leaked).
    pub async fn owned_info(&self, tenant: &Tenant, key: &ChunkKey) -> ApiResult<Option<Found>> {
        let known = tenant.owns(key);
        let shared = self.blender.store().tiers().iter().any(|t| t.is_remote());
        if !known && !shared {
            return Ok(None);
        }
        let Some(found) = self.blender.store().lookup(key).await? else {
            return Ok(None);
        };
        let codec = self.blender.codec(&tenant.namespace);
        if !codec.names(&found.info) || found.info.layout != *codec.layout() {
            return Ok(None);
        }
        if !known {
            tenant.add(
                *key,
                found.info.raw_len(),
                found.info.chain.map(|l| l.parent),
            );
        }
        Ok(Some(found))
    }

    /// [`Shared::owned_info`], with an unknown id as a 404 naming it.
    pub async fn require_owned(&self, tenant: &Tenant, key: &ChunkKey) -> ApiResult<Found> {
        self.owned_info(tenant, key)
            .await?
            .ok_or_else(|| unknown_chunk(key))
    }

    /// Accounts every stored object to the tenant whose namespace names it (once, at
    /// start-up, so quotas hold across restarts): a chunk to the tenant whose key of its
    /// tokens it is stored under, a chain link (a conversation's page) to the tenant whose
    /// chain root it records ([`kvquilt_blend::ChunkCodec::names`]). A link written before
    /// object format v6 records no root and is charged to nobody until written again.
    pub async fn account_existing(&self) -> ApiResult<usize> {
        let store = self.blender.store();
        let mut keys: Vec<ChunkKey> = store.tiers().iter().flat_map(|t| t.keys()).collect();
        keys.sort_unstable_by_key(|k| k.0);
        keys.dedup();
        let codecs: Vec<_> = self
            .tenants
            .all()
            .iter()
            .map(|t| (t, self.blender.codec(&t.namespace)))
            .collect();
        let mut n = 0;
        for key in keys {
            // an object that cannot be read is not served either: never a reason to refuse
            // to start (a damaged file's objects are dropped by the tier as they are met)
            let found = match store.lookup(&key).await {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(%key, error = %e, "an unreadable stored object is not accounted to any tenant");
                    continue;
                }
            };
            for (t, codec) in &codecs {
                if codec.names(&found.info) && found.info.layout == *codec.layout() {
                    t.add(
                        key,
                        found.info.raw_len(),
                        found.info.chain.map(|l| l.parent),
                    );
                    n += 1;
                    break;
                }
            }
        }
        Ok(n)
    }
}

impl Shared {
    /// The model's end-of-turn and end-of-sequence token ids.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = self.tokenizer.eos_ids().to_vec();
        for t in ["<|im_end|>", "<|endoftext|>"] {
            if let Some(id) = self.tokenizer.token_id(t)
                && !ids.contains(&id)
            {
                ids.push(id);
            }
        }
        ids
    }
}

/// The 404 for a chunk id the caller's tenant does not hold.
pub fn unknown_chunk(key: &ChunkKey) -> ApiError {
    ApiError::not_found("unknown_chunk", format!("no chunk {key} is stored"))
}
