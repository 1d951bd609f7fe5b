//! Prefix chains: KV that is exactly what full prefill computes, stored as links, each
//! keyed by everything before it and its own tokens ([`ChunkCodec::prefix_keys`]).
//!
//! `prefix` mode runs its whole prompt (but the suffix) as one chain; `reuse` and `blend` run
//! a long prefix as a chain of fixed-size pages ([`Blender::prefix_pages`]). A prefix is
//! paged because a conversation's next turn renders this turn's history and then some: its
//! prefix opens with this one's, so it reads the pages they share and computes only the
//! rest, and stores only its new pages — where one object per prefix would be a new, longer
//! object every turn that reuses nothing of the last (pinned by
//! `blend/tests/pages.rs::a_conversation_s_next_turn_reads_the_pages_it_shares`).
//!
//! [`run`] loads the longest stored run of links from the start at their positions; the
//! links after it are prefilled over the run at their absolute positions, in one pass, and
//! queued for storing — or, when nothing lies between the prefix and the question (`reuse`
//! without documents: a chat's next turn), left as a [`Tail`] that the question's own pass
//! computes with it, one read of the weights instead of two. [`compute`] reads nothing: a
//! paged prefix recomputed because that is faster than reading it.
//! A link decoded from a lossy codec is used, but nothing computed over it is stored (it is
//! not the prefix's exact KV).

use std::time::Instant;

use kvquilt_kvstore::{ChainLink, ChunkKey, TierKind};
use kvquilt_model::{KvCache, positions};

use super::sources::stall_deadline;
use super::store_back::Pending;
use super::{Blender, device_elapsed};
use crate::chunk::ChunkCodec;
use crate::error::Result;
use crate::priority::PromptTurn;
use crate::request::SegmentSource;

/// A `reuse` or `blend` prompt's prefix kept as pages: its links and their chain keys.
///
/// Invariants: `pages` and `keys` are parallel and non-empty; the pages joined are the
/// prefix; `keys` are [`ChunkCodec::prefix_keys`] of `pages`, so the last names the whole
/// prefix.
pub(crate) struct PrefixPages<'r> {
    /// The prefix's pages, in order.
    pub(crate) pages: Vec<&'r [u32]>,
    /// Each page's chain key.
    pub(crate) keys: Vec<ChunkKey>,
    /// The key naming the whole prefix: its last page's.
    pub(crate) key: ChunkKey,
}

impl<'r> PrefixPages<'r> {
    /// The pages of `prefix` in `codec`'s namespace when `b` pages it
    /// ([`Blender::prefix_pages`]: longer than a page) and its KV at the start of a prompt
    /// is what the chunk contract stores for it (`ChunkEncoding::exact_at_start`: a prefix
    /// the contract would prefill behind a sink stays one chunk, as `reuse` and `blend`
    /// have always kept it).
    pub(crate) fn of(b: &Blender, codec: &ChunkCodec, prefix: &'r [u32]) -> Option<Self> {
        if !codec.encoding().exact_at_start(prefix) {
            return None;
        }
        let pages = b.prefix_pages(prefix)?;
        let keys = codec.prefix_keys(&pages);
        let key = *keys.last()?;
        Some(Self { pages, keys, key })
    }

    /// The longest run of pages the store holds from the start (remote tiers as far as
    /// their hints say: probe first), each page's tier and length.
    pub(crate) fn held_run(&self, b: &Blender) -> Vec<(TierKind, usize)> {
        self.keys
            .iter()
            .zip(&self.pages)
            .map_while(|(k, p)| Some((b.store.locate(k)?, p.len())))
            .collect()
    }
}

/// What [`run`] made of a chain.
pub(crate) struct Chain {
    /// The KV of every link's tokens, in order, at positions `0..N`.
    pub(crate) cache: KvCache,
    /// How each link's KV was obtained, and whether it was decoded from a lossy codec.
    pub(crate) links: Vec<(SegmentSource, bool)>,
    /// Tokens of the links read from the store before any lossy one: KV exactly as full
    /// prefill computes it (`BlendStats::cached_tokens`).
    pub(crate) cached_tokens: usize,
    /// Tokens of the links computed here.
    pub(crate) computed_tokens: usize,
    /// The links computed over an exact chain, to store.
    pub(crate) pending: Pending,
    /// The links after the run, left for the request's own pass ([`run`] with `defer`):
    /// `cache` then holds the run only.
    pub(crate) tail: Option<Tail>,
}

/// The links of a chain after its stored run, left uncomputed for the request's own pass
/// to compute with its question (one pass, one read of the weights, where [`run`] would
/// prefill them in a pass of their own first).
///
/// Invariants: `tokens` is the links joined; `links` holds each one's length and name, in
/// order; the tokens sit at positions `at..` right after the run.
pub(crate) struct Tail {
    /// The first position of the tail: the tokens read before it.
    at: usize,
    /// The links' tokens, joined.
    tokens: Vec<u32>,
    /// Each link's length and name (its key and place in the chain).
    links: Vec<(usize, (ChunkKey, ChainLink))>,
}

impl Tail {
    /// The tail's tokens, at positions `at()..`.
    pub(crate) fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The tail's first position.
    pub(crate) fn at(&self) -> usize {
        self.at
    }

    /// Queues every link of the tail for storing, its KV cut from `cache` (the prompt's from
    /// position 0, the tail computed over the exact run), as [`run`] queues the links it
    /// prefills; a link's cost is its estimated prefill time.
    pub(crate) fn queue(
        self,
        b: &Blender,
        codec: &ChunkCodec,
        cache: &KvCache,
        pending: &mut Pending,
    ) -> Result<()> {
        let mut at = self.at;
        for (len, name) in self.links {
            let seg = &self.tokens[at - self.at..at - self.at + len];
            let cost_s = b.costs.prefill_s(len).unwrap_or(0.0);
            queue_link(codec, name, seg, cache, at, cost_s, pending)?;
            at += len;
        }
        Ok(())
    }
}

impl Chain {
    /// How the chain as a whole was obtained ([`summary`] of every link).
    pub(crate) fn source(&self) -> SegmentSource {
        summary(&self.links).0
    }

    /// Whether some link was decoded from a lossy codec.
    pub(crate) fn lossy(&self) -> bool {
        summary(&self.links).1
    }
}

/// How consecutive links taken as one segment (a paged prefix) were obtained: a hit of the
/// last link's tier when every link was read, else how the first link not read was (`Miss`
/// or `Unusable`: a prefix partly read is no hit; `cached_tokens` says how much was read);
/// and whether some link was decoded from a lossy codec.
pub(crate) fn summary(links: &[(SegmentSource, bool)]) -> (SegmentSource, bool) {
    let lossy = links.iter().any(|&(_, lossy)| lossy);
    let first_not_read = links
        .iter()
        .find(|(how, _)| !matches!(how, SegmentSource::Hit(_)));
    let how = match (first_not_read, links.last()) {
        (Some(&(how, _)), _) => how,
        (None, Some(&(how, _))) => how,
        (None, None) => SegmentSource::Miss,
    };
    (how, lossy)
}

/// Runs the chain of `links` (prompt order, each non-empty) named by `keys` (parallel:
/// [`ChunkCodec::prefix_keys`] of `links`) in `codec`'s namespace: the longest stored run
/// loaded, the rest prefilled over it in one pass and queued for storing while the chain
/// below is exact. With `defer`, a rest after a non-empty exact run is not computed here:
/// it is left as the chain's [`Tail`] for the request's own pass.
pub(crate) fn run(
    b: &Blender,
    codec: &ChunkCodec,
    links: &[&[u32]],
    keys: &[ChunkKey],
    turn: &PromptTurn<'_>,
    defer: bool,
) -> Result<Chain> {
    let mut chain = Chain {
        cache: b.model.empty_cache()?,
        links: Vec::with_capacity(links.len()),
        cached_tokens: 0,
        computed_tokens: 0,
        pending: Pending::default(),
        tail: None,
    };
    let mut at = 0usize;
    // the links read, joined into one cache once the run ends (one copy, not one per link)
    let mut read: Vec<KvCache> = Vec::new();
    // once a link was decoded from a lossy codec, the links computed over it are not the
    // prefix's exact KV: they are used, never stored (nothing is re-encoded from lossy values)
    let mut exact = true;
    // the first link not read (all read: `links.len()`)
    let mut first = links.len();
    let chain_of = codec.chain(keys);
    for (i, ((seg, key), link)) in links.iter().zip(keys).zip(&chain_of).enumerate() {
        match load_link(b, codec, key, link, seg, turn) {
            Ok((kv, tier, lossy)) => {
                read.push(kv.with_positions(positions(at, seg.len()))?);
                chain.links.push((SegmentSource::Hit(tier), lossy));
                exact &= !lossy;
                if exact {
                    chain.cached_tokens += seg.len();
                }
                at += seg.len();
            }
            Err(how) => {
                chain.links.push((how, false));
                first = i;
                break;
            }
        }
    }
    chain.cache = join(chain.cache, read)?;
    // the links after the run: one prefill over it (a forward pass per link would read the
    // weights once per link), each link's rows queued as its object
    let rest = &links[first..];
    if rest.is_empty() {
        return Ok(chain);
    }
    chain
        .links
        .extend(rest.iter().skip(1).map(|_| (SegmentSource::Miss, false)));
    let tokens: Vec<u32> = rest.concat();
    chain.computed_tokens = tokens.len();
    if defer && exact && at > 0 {
        let named = keys[first..]
            .iter()
            .copied()
            .zip(chain_of[first..].iter().copied());
        chain.tail = Some(Tail {
            at,
            tokens,
            links: rest.iter().map(|l| l.len()).zip(named).collect(),
        });
        return Ok(chain);
    }
    let took = prefill_over(b, &mut chain.cache, &tokens, at)?;
    if exact {
        let named = keys[first..]
            .iter()
            .copied()
            .zip(chain_of[first..].iter().copied());
        for (seg, name) in rest.iter().zip(named) {
            let cost_s = took * seg.len() as f64 / tokens.len() as f64;
            queue_link(
                codec,
                name,
                seg,
                &chain.cache,
                at,
                cost_s,
                &mut chain.pending,
            )?;
            at += seg.len();
        }
    }
    Ok(chain)
}

/// Computes the chain of `links` (named by `keys`, as [`run`] takes them) without reading
/// any of it, in one prefill: a paged prefix recomputed because that is estimated faster
/// than reading its pages (`Plan::page_prefix`). Every link is reported recomputed for
/// speed; the links the fastest tier does not hold are queued for storing ([`queue_from`]).
pub(crate) fn compute(
    b: &Blender,
    codec: &ChunkCodec,
    links: &[&[u32]],
    keys: &[ChunkKey],
) -> Result<Chain> {
    let mut cache = b.model.empty_cache()?;
    let tokens: Vec<u32> = links.concat();
    prefill_over(b, &mut cache, &tokens, 0)?;
    let mut pending = Pending::default();
    queue_from(b, codec, links, keys, &cache, &mut pending)?;
    Ok(Chain {
        cache,
        links: vec![(SegmentSource::RecomputedForSpeed, false); links.len()],
        cached_tokens: 0,
        computed_tokens: tokens.len(),
        pending,
        tail: None,
    })
}

/// Prefills `tokens` at positions `at..` over `cache` (which holds `0..at`), recording the
/// prefill in the cost model; returns its seconds.
fn prefill_over(b: &Blender, cache: &mut KvCache, tokens: &[u32], at: usize) -> Result<f64> {
    let t0 = Instant::now();
    b.model
        .prefill(tokens, &positions(at, tokens.len()), cache)?;
    let took = device_elapsed(&b.model, t0)?.as_secs_f64();
    b.costs.record_prefill_after(at, tokens.len(), took);
    Ok(took)
}

/// `cache` followed by `read` (the links read after it, at their positions).
fn join(cache: KvCache, read: Vec<KvCache>) -> Result<KvCache> {
    if read.is_empty() {
        return Ok(cache);
    }
    let parts: Vec<&KvCache> = std::iter::once(&cache).chain(&read).collect();
    Ok(KvCache::cat(&parts)?)
}

/// Queues the links of `links` (named by `keys`, parallel) that the store's fastest tier
/// does not hold for storing, their KV taken from `cache` (the exact KV of the prompt from
/// position 0, e.g. a full prefill's); `cost_s` of a link is its estimated prefill time. A
/// link held only in a slower tier is queued too: computed because reading it was slower
/// (a stalled disk or remote, `compute`; a fallback), it would otherwise be computed again
/// on every turn of the conversation while that tier stays slow, as the device tier holds
/// a paged prefix whole under a key the next turn never asks for.
pub(crate) fn queue_from(
    b: &Blender,
    codec: &ChunkCodec,
    links: &[&[u32]],
    keys: &[ChunkKey],
    cache: &KvCache,
    pending: &mut Pending,
) -> Result<()> {
    let fastest = b.store.tiers().first().map(|t| t.kind());
    let mut at = 0usize;
    let named = keys.iter().copied().zip(codec.chain(keys));
    for (seg, name) in links.iter().zip(named) {
        if fastest.is_none() || b.store.locate(&name.0) != fastest {
            let cost_s = b.costs.prefill_s(seg.len()).unwrap_or(0.0);
            queue_link(codec, name, seg, cache, at, cost_s, pending)?;
        }
        at += seg.len();
    }
    Ok(())
}

/// Queues the link named `(key, link)` (tokens `seg`, whose KV is `cache`'s rows
/// `at..at + T`) in `pending`, its rows moved to positions `0..T` as the object stores
/// them; `cost_s` is what computing it took or would take.
fn queue_link(
    codec: &ChunkCodec,
    name: (ChunkKey, ChainLink),
    seg: &[u32],
    cache: &KvCache,
    at: usize,
    cost_s: f64,
    pending: &mut Pending,
) -> Result<()> {
    let part = cache
        .narrow(at, seg.len())?
        .with_positions(positions(0, seg.len()))?;
    pending.push(codec, (name.0, Some(name.1)), seg, part, cost_s);
    Ok(())
}

/// The stored link under `key` (of tokens `seg`), as KV at positions `0..T`, the tier that
/// held it, and whether it was decoded from a lossy codec (served only where the store's
/// config allows lossy objects). `Err` says why the chain ends here: `Miss` (not stored) or
/// `Unusable` (the read failed, stalled past the deadline a stream's layers get —
/// `stall_deadline`, for the whole object — or the object is not this model's KV of `seg`,
/// or records another place in a chain than `link`; logged). A link written before format
/// v6 records none and is taken on its key.
fn load_link(
    b: &Blender,
    codec: &ChunkCodec,
    key: &ChunkKey,
    link: &ChainLink,
    seg: &[u32],
    turn: &PromptTurn<'_>,
) -> Result<(KvCache, TierKind, bool), SegmentSource> {
    // (no local tier holds it: a remote tier, asked whatever its hints say, is the one read)
    let tier = b.store.locate(key).unwrap_or(TierKind::REMOTE);
    let bytes = usize::try_from(codec.layout().object_bytes(seg.len())).unwrap_or(usize::MAX);
    let deadline = stall_deadline(b, tier, bytes);
    let t0 = Instant::now();
    // (the timer is made inside `block_on`: it needs the runtime's context)
    // (a hit from a slower tier is promoted after the read: the deadline covers the read)
    let read = async { tokio::time::timeout(deadline, b.store.get_promoting_later(key)).await };
    let Ok(got) = b.rt.block_on(turn.paused_while_pending(read)) else {
        tracing::warn!(%key, %tier, ?deadline, "reading a stored prefix link stalled; recomputing from here");
        b.costs.record_load(tier, bytes, t0.elapsed().as_secs_f64());
        return Err(SegmentSource::Unusable);
    };
    match got {
        Ok(Some((obj, _))) if obj.info().chain.is_some_and(|c| c != *link) => {
            tracing::warn!(%key, "stored prefix link records another chain; recomputing from here");
            Err(SegmentSource::Unusable)
        }
        Ok(Some((obj, tier))) => match codec.to_cache(&b.model, &obj, seg) {
            Ok(c) => {
                // (what reading it took: the tier's measure, as a stream's layers record)
                b.costs.record_load(tier, bytes, t0.elapsed().as_secs_f64());
                Ok((c, tier, obj.lossy().is_some()))
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "stored prefix object unusable");
                Err(SegmentSource::Unusable)
            }
        },
        Ok(None) => Err(SegmentSource::Miss),
        Err(e) => {
            tracing::warn!(%key, error = %e, "prefix lookup failed");
            Err(SegmentSource::Unusable)
        }
    }
}
