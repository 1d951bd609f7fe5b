//! A long prefix kept as pages (`blend/src/engine/chain.rs`): a conversation's next turn,
//! whose prefix opens with this turn's, reads the pages they share in every mode, computes
//! only the rest, and stores only its new pages; what it reads is what computing the prefix
//! gives. On the tiny random llama (no chat template: no sink, so every prefix is exact at
//! the start) with 8-token pages.

mod support;

use std::sync::Arc;

use kvquilt_blend::{
    BlendConfig, BlendRequest, Blender, Mode, ModelIdentity, PlannedMode, SegmentSource,
};
use kvquilt_kvstore::{ChunkKey, PolicyKind, StoreConfig, TieredStore};
use kvquilt_model::LoadedModel;
use tokio::runtime::Runtime;

use support::max_diff;

/// Tokens per page in these tests.
const PAGE: usize = 8;

fn tiny_llama() -> LoadedModel {
    support::tiny("llama")
}

struct Setup {
    blender: Blender,
    rt: Runtime,
}

/// A blender over a host tier with `PAGE`-token pages, its own mode always run
/// (`fallback`: off), a device tier of `device_bytes` (0: off).
fn setup(fallback: bool, device_bytes: u64) -> Setup {
    let rt = Runtime::new().unwrap();
    let loaded = tiny_llama();
    let identity = ModelIdentity::of(&loaded).unwrap();
    let store = TieredStore::open(StoreConfig::host_only(1 << 30)).unwrap();
    let blender = Blender::new(
        Arc::new(loaded.model),
        identity,
        Arc::new(store),
        rt.handle().clone(),
    )
    .with_fallback_to_full(fallback)
    .with_device_tier(device_bytes, PolicyKind::Lru)
    .with_prefix_page(PAGE);
    Setup { blender, rt }
}

/// `n` pseudo-random token ids in `1..512` from `seed`.
fn toks(seed: u32, n: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            1 + x % 511
        })
        .collect()
}

/// The chain keys of `prefix`'s pages in `ns`.
fn page_keys(b: &Blender, ns: &[u8], prefix: &[u32]) -> Vec<ChunkKey> {
    let pages: Vec<&[u32]> = prefix.chunks(PAGE).collect();
    b.codec(ns).prefix_keys(&pages)
}

/// Asserts that every page of `prefix` in `ns` is stored recording its place in its chain
/// (object format v6): its root and parent, which name it for its own namespace only.
#[track_caller]
fn assert_linked(s: &Setup, ns: &[u8], prefix: &[u32]) {
    let b = &s.blender;
    let codec = b.codec(ns);
    let keys = page_keys(b, ns, prefix);
    for (i, (key, link)) in keys.iter().zip(codec.chain(&keys)).enumerate() {
        let found = s.rt.block_on(b.store().lookup(key)).unwrap();
        let info = found.expect("the page is stored").info;
        assert_eq!(info.chain, Some(link), "page {i}");
        let parent = if i == 0 { link.root } else { keys[i - 1] };
        assert_eq!(link.parent, parent, "page {i}");
        assert!(codec.names(&info), "page {i}");
        assert!(!b.codec(b"another").names(&info), "page {i}");
    }
}

fn modes() -> [(&'static [u8], Mode); 3] {
    [
        (b"p", Mode::Prefix),
        (b"r", Mode::Reuse),
        (b"b", Mode::Blend(BlendConfig::cacheblend(0.3))),
    ]
}

/// Two turns of a conversation: turn 2's prefix is turn 1's (20 tokens: pages of 8, 8, 4)
/// and 13 more (33: 8, 8, 8, 8, 1), beside one document each. Turn 2 reads the two full
/// pages they share (16 tokens, counted as cached), computes the rest over them and stores
/// only its own pages; no object of the whole prefix is stored. Its answer is what the same
/// request gives with nothing stored, in every mode.
#[test]
fn a_conversation_s_next_turn_reads_the_pages_it_shares() {
    let s = setup(false, 0);
    let b = &s.blender;
    let history = toks(1, 20);
    let turn1 = |mode| BlendRequest::new(history.clone(), vec![toks(2, 12)], toks(3, 5), mode);
    let mut longer = history.clone();
    longer.extend(toks(4, 13));
    let turn2 = |mode| BlendRequest::new(longer.clone(), vec![toks(5, 10)], toks(6, 5), mode);
    for (ns, mode) in modes() {
        let codec = b.codec(ns);
        let first = b.run(ns, &turn1(mode.clone())).unwrap();
        assert_eq!(first.stats.cached_tokens, 0, "{mode:?}: nothing stored yet");
        let stored: Vec<ChunkKey> = first.stored.iter().map(|o| o.key).collect();
        for k in page_keys(b, ns, &history) {
            assert!(stored.contains(&k), "{mode:?}: turn 1 stores its pages");
        }
        assert_linked(&s, ns, &history);
        assert!(
            b.store().locate(&codec.key(&history)).is_none(),
            "{mode:?}: no object of the whole prefix"
        );

        // the reference: turn 2 on a blender that has stored nothing
        let cold = setup(false, 0);
        let want = cold.blender.run(ns, &turn2(mode.clone())).unwrap();
        assert_eq!(want.stats.cached_tokens, 0);

        let second = b.run(ns, &turn2(mode.clone())).unwrap();
        assert_eq!(
            second.stats.cached_tokens,
            2 * PAGE,
            "{mode:?}: the two full pages turn 1 stored: {:?}",
            second.stats.segments
        );
        let diff = max_diff(&second.logits, &want.logits);
        assert!(
            diff < 1e-4,
            "{mode:?}: reading pages changed logits by {diff}"
        );
        let new_pages = &page_keys(b, ns, &longer)[2..];
        let stored: Vec<ChunkKey> = second.stored.iter().map(|o| o.key).collect();
        for k in new_pages {
            assert!(stored.contains(k), "{mode:?}: turn 2 stores its new pages");
        }
        let shared = &page_keys(b, ns, &history)[..2];
        assert!(
            !stored.iter().any(|k| shared.contains(k)),
            "{mode:?}: nothing it read is stored again"
        );

        // the same turn again reads its whole prefix
        let again = b.run(ns, &turn2(mode.clone())).unwrap();
        // (`prefix` mode's document is a link of the chain too)
        let links = if mode == Mode::Prefix { 10 } else { 0 };
        assert_eq!(again.stats.cached_tokens, longer.len() + links, "{mode:?}");
        assert!(matches!(again.stats.segments[0], SegmentSource::Hit(_)));
        let diff = max_diff(&again.logits, &want.logits);
        assert!(diff < 1e-4, "{mode:?}: {diff}");
    }
}

/// Pages name the same objects in every mode: what `prefix` mode stored, `blend` reads
/// (and the reverse); a prefix no longer than a page stays one object, as before.
#[test]
fn every_mode_reads_the_pages_another_stored() {
    let s = setup(false, 0);
    let b = &s.blender;
    let prefix = toks(11, 27);
    let blend = Mode::Blend(BlendConfig::cacheblend(0.3));
    let r = |p: &[u32], mode| BlendRequest::new(p.to_vec(), vec![toks(12, 9)], toks(13, 4), mode);
    b.run(b"", &r(&prefix, Mode::Prefix)).unwrap();
    let out = b.run(b"", &r(&prefix, blend.clone())).unwrap();
    assert_eq!(out.stats.cached_tokens, prefix.len());
    let other = toks(14, 30);
    b.run(b"", &r(&other, Mode::Reuse)).unwrap();
    let out = b.run(b"", &r(&other, Mode::Prefix)).unwrap();
    assert_eq!(
        out.stats.cached_tokens,
        other.len(),
        "the pages (`reuse` stored the document as a chunk, not a link)"
    );
    // short: the whole prefix is one chunk, as `reuse` always stored it
    let short = toks(15, PAGE);
    let out = b.run(b"", &r(&short, Mode::Reuse)).unwrap();
    let keys: Vec<ChunkKey> = out.stored.iter().map(|o| o.key).collect();
    assert!(keys.contains(&b.codec(b"").key(&short)));
}

/// A page that went missing ends what is read there: the pages after it are computed over
/// the ones before (and stored again), and the answer is unchanged.
#[test]
fn a_missing_page_is_recomputed_from_there() {
    let s = setup(false, 0);
    let b = &s.blender;
    let prefix = toks(21, 36);
    let r = BlendRequest::new(prefix.clone(), vec![toks(22, 7)], toks(23, 4), Mode::Reuse);
    let first = b.run(b"", &r).unwrap();
    let keys = page_keys(b, b"", &prefix);
    assert!(s.rt.block_on(b.store().remove(&keys[2])).unwrap());
    let out = b.run(b"", &r).unwrap();
    assert_eq!(out.stats.cached_tokens, 2 * PAGE);
    assert_eq!(out.stats.segments[0], SegmentSource::Miss);
    let diff = max_diff(&out.logits, &first.logits);
    assert!(diff < 1e-4, "{diff}");
    let stored: Vec<ChunkKey> = out.stored.iter().map(|o| o.key).collect();
    assert_eq!(
        stored,
        keys[2..].to_vec(),
        "the missing page and the ones after it"
    );
    assert_eq!(b.run(b"", &r).unwrap().stats.cached_tokens, prefix.len());
}

/// A page that cannot be stored ends its chain's store-back: the pages after it are not
/// stored either (no read would reach them past the gap, yet they would be charged). A host
/// tier that fits the prefix's short last page but not a full one stores nothing of it.
#[test]
fn a_page_not_stored_ends_its_chain_s_store_back() {
    let rt = Runtime::new().unwrap();
    let loaded = tiny_llama();
    let identity = ModelIdentity::of(&loaded).unwrap();
    let layout = identity.layout;
    let fits = (layout.object_bytes(PAGE / 2) + layout.object_bytes(PAGE)) / 2;
    let store = TieredStore::open(StoreConfig::host_only(fits)).unwrap();
    let b = Blender::new(
        Arc::new(loaded.model),
        identity,
        Arc::new(store),
        rt.handle().clone(),
    )
    .with_fallback_to_full(false)
    .with_prefix_page(PAGE);
    // pages of 8, 8 and 4
    let prefix = toks(41, 2 * PAGE + PAGE / 2);
    let r = BlendRequest::new(prefix.clone(), Vec::new(), toks(42, 3), Mode::Reuse);
    let out = b.run(b"", &r).unwrap();
    assert_eq!(out.stats.misses, 1, "{:?}", out.stats);
    assert!(out.stored.is_empty(), "{:?}", out.stored);
    let keys = page_keys(&b, b"", &prefix);
    assert_eq!(b.store().locate(&keys[2]), None, "the short last page");
}

/// `reuse` of a prefix and its question alone (a chat without documents) computes the
/// prefix's pages not stored in the question's own pass (`chain::Tail`): the answer is full
/// prefill's, those pages are stored as the ones a cold run stores (the next run reads the
/// whole prefix and answers the same), and a device tier keeps the whole prefix resident.
#[test]
fn a_prefix_s_unstored_pages_are_computed_with_its_question() {
    for device_bytes in [0, 1 << 30] {
        let s = setup(false, device_bytes);
        let b = &s.blender;
        // pages of 8, 8 and 5
        let prefix = toks(51, 2 * PAGE + 5);
        let r = BlendRequest::new(prefix.clone(), vec![], toks(52, 3), Mode::Reuse);
        let as_full = BlendRequest::new(prefix.clone(), vec![], toks(52, 3), Mode::Full);
        let full = b.run(b"", &as_full).unwrap().logits;
        let cold = b.run(b"", &r).unwrap();
        let keys = page_keys(b, b"", &prefix);
        for key in &keys[1..] {
            assert!(s.rt.block_on(b.remove(key)).unwrap());
        }
        let out = b.run(b"", &r).unwrap();
        assert_eq!(out.stats.cached_tokens, PAGE);
        assert_eq!(out.stats.segments, vec![SegmentSource::Miss]);
        let diff = max_diff(&out.logits, &full);
        assert!(diff < 1e-4, "{diff}");
        let stored: Vec<ChunkKey> = out.stored.iter().map(|o| o.key).collect();
        assert_eq!(stored, keys[1..].to_vec(), "the pages after the one read");
        assert_eq!(out.cache.len(), prefix.len() + 3);
        assert_linked(&s, b"", &prefix);
        let again = b.run(b"", &r).unwrap();
        assert_eq!(again.stats.cached_tokens, prefix.len());
        let diff = max_diff(&again.logits, &cold.logits);
        assert!(diff < 1e-4, "{diff}");
        if device_bytes > 0 {
            assert_eq!(again.stats.hits_gpu, 1, "{:?}", again.stats);
        }
    }
}

/// Decodes `n` tokens greedily after `out`'s first: the tokens fed (all but the last
/// produced) and the cache they leave.
fn decode_greedy(
    b: &Blender,
    out: kvquilt_blend::BlendOutput,
    n: usize,
) -> (Vec<u32>, kvquilt_model::KvCache) {
    let mut steps = b.decode_steps(out.cache, n);
    let mut logits = out.logits;
    let mut fed = Vec::new();
    for _ in 1..n {
        let id = kvquilt_model::argmax(&logits.to_vec1::<f32>().unwrap());
        logits = steps.step(b.model(), id).unwrap();
        fed.push(id);
    }
    (fed, steps.cache().expect("an eager decode's cache"))
}

/// A turn without documents leaves its answer as pages: the decode's cache holds the KV of
/// the prompt and every answer token fed, exactly as prefilling them gives; its full pages
/// not yet stored are stored (each recording its chain), and the next turn — whose prefix
/// is this prompt, the answer and more — reads them all, computing only what follows, with
/// the answer a cold store gives. A turn with a document, or that read lossy KV, leaves
/// none.
#[test]
fn a_turn_without_documents_leaves_its_answer_as_pages() {
    let s = setup(false, 0);
    let b = &s.blender;
    let (history, question) = (toks(91, 13), toks(92, 6));
    for (ns, mode) in modes() {
        let r = BlendRequest::new(history.clone(), vec![], question.clone(), mode.clone());
        let out = b.run(ns, &r).unwrap();
        let stats = out.stats.clone();
        // 13 + 6 prompt tokens and 8 fed: 27, three full pages (the first the prompt's own)
        let (fed, cache) = decode_greedy(b, out, 9);
        assert_eq!(cache.len(), 27);
        let (work, listed) = b.answer_pages(ns, &r, &stats, &cache, &fed);
        let mut all = r.tokens();
        all.extend_from_slice(&fed);
        let keys = page_keys(b, ns, &all[..24]);
        assert_eq!(listed, keys, "{mode:?}: every full page, held or not");
        let stored: Vec<ChunkKey> = b.store_back(work).iter().map(|o| o.key).collect();
        assert_eq!(stored, keys[1..].to_vec(), "{mode:?}: the pages not held");
        assert_linked(&s, ns, &all[..24]);
        // again: every page is held, nothing to store
        assert!(b.answer_pages(ns, &r, &stats, &cache, &fed).0.is_empty());

        // the next turn reads them: the conversation so far and a closing token, then a
        // new question
        let mut next = all.clone();
        next.push(7);
        let turn2 = BlendRequest::new(next.clone(), vec![], toks(93, 5), mode.clone());
        let want = setup(false, 0).blender.run(ns, &turn2).unwrap();
        let got = b.run(ns, &turn2).unwrap();
        assert_eq!(got.stats.cached_tokens, 24, "{mode:?}: {:?}", got.stats);
        let diff = max_diff(&got.logits, &want.logits);
        assert!(
            diff < 1e-4,
            "{mode:?}: reading the answer's pages changed logits by {diff}"
        );
    }
    // with a document: nothing (the answer attended to it where the next prompt has none)
    let r = BlendRequest::new(
        history.clone(),
        vec![toks(94, 6)],
        question.clone(),
        Mode::Reuse,
    );
    let out = b.run(b"d", &r).unwrap();
    let stats = out.stats.clone();
    let (fed, cache) = decode_greedy(b, out, 9);
    assert!(b.answer_pages(b"d", &r, &stats, &cache, &fed).0.is_empty());
    // read lossy, or a cache that is not the prompt's and the answer's: nothing
    let r = BlendRequest::new(history.clone(), vec![], question.clone(), Mode::Reuse);
    let out = b.run(b"l", &r).unwrap();
    let stats = out.stats.clone();
    let (fed, cache) = decode_greedy(b, out, 9);
    assert!(
        b.answer_pages(b"l", &r, &stats, &cache, &fed[..7])
            .0
            .is_empty()
    );
    let lossy = kvquilt_blend::BlendStats {
        lossy_hits: 1,
        ..stats.clone()
    };
    assert!(b.answer_pages(b"l", &r, &lossy, &cache, &fed).0.is_empty());
    // (the same request, exact and whole: its pages)
    assert!(!b.answer_pages(b"l", &r, &stats, &cache, &fed).0.is_empty());
}

/// A page stored under the right key but recording another chain (another tenant's root:
/// planted, or a bug) is not read: the chain ends there, the rest is computed, and the
/// answer is unchanged.
#[test]
fn a_page_recording_another_chain_is_not_read() {
    let s = setup(false, 0);
    let b = &s.blender;
    let prefix = toks(24, 30);
    let r = BlendRequest::new(prefix.clone(), vec![toks(25, 7)], toks(26, 4), Mode::Reuse);
    let first = b.run(b"", &r).unwrap();
    let keys = page_keys(b, b"", &prefix);
    let (obj, _) = s.rt.block_on(b.store().get(&keys[1])).unwrap().unwrap();
    let mut link = obj.info().chain.expect("a link");
    link.root = b.codec(b"another").chain(&keys)[0].root;
    let planted = kvquilt_kvstore::KvObject::new(
        keys[1],
        *obj.layout(),
        obj.tokens().to_vec(),
        obj.layers().to_vec(),
        None,
    )
    .unwrap()
    .with_chain(link)
    .unwrap();
    assert!(s.rt.block_on(b.store().remove(&keys[1])).unwrap());
    s.rt.block_on(b.store().put(planted, 0.0)).unwrap();
    let out = b.run(b"", &r).unwrap();
    assert_eq!(out.stats.cached_tokens, PAGE, "read up to the planted page");
    assert_eq!(out.stats.segments[0], SegmentSource::Unusable);
    let diff = max_diff(&out.logits, &first.logits);
    assert!(diff < 1e-4, "{diff}");
}

/// A request that runs as full prefill still leaves its prefix's pages, cut from the full
/// prefill's KV (exactly theirs: `prefix` mode reading them equals full prefill).
#[test]
fn a_request_run_as_full_prefill_stores_its_prefix_s_pages() {
    let s = setup(true, 0);
    let b = &s.blender;
    // (a request falls back only once a prefill rate was measured)
    let other = BlendRequest::new(vec![], vec![toks(30, 6)], toks(34, 3), Mode::Full);
    b.run(b"", &other).unwrap();
    let prefix = toks(31, 19);
    let r = BlendRequest::new(
        prefix.clone(),
        vec![toks(32, 11)],
        toks(33, 5),
        Mode::Blend(BlendConfig::cacheblend(0.3)),
    );
    let out = b.run(b"", &r).unwrap();
    assert!(
        out.stats.fell_back_to_full,
        "nothing stored: nothing to load"
    );
    let stored: Vec<ChunkKey> = out.stored.iter().map(|o| o.key).collect();
    for k in page_keys(b, b"", &prefix) {
        assert!(stored.contains(&k));
    }
    assert_linked(&s, b"", &prefix);
    let exact = BlendRequest {
        mode: Mode::Prefix,
        ..r.clone()
    };
    let read = b.run(b"", &exact).unwrap();
    assert_eq!(
        read.stats.cached_tokens,
        prefix.len(),
        "the document is a chunk"
    );
    let full = b
        .run(
            b"",
            &BlendRequest {
                mode: Mode::Full,
                ..r
            },
        )
        .unwrap();
    let diff = max_diff(&read.logits, &full.logits);
    assert!(diff < 1e-4, "{diff}");
}

/// With a device tier, a paged prefix read once is resident whole under its last page's
/// key: the next request takes it from there, every token counted as cached.
#[test]
fn a_paged_prefix_is_resident_in_the_device_tier_whole() {
    let s = setup(false, 64 << 20);
    let b = &s.blender;
    let prefix = toks(41, 25);
    let r = BlendRequest::new(prefix.clone(), vec![toks(42, 6)], toks(43, 3), Mode::Reuse);
    let first = b.run(b"", &r).unwrap();
    let out = b.run(b"", &r).unwrap();
    assert_eq!(
        out.stats.segments[0],
        SegmentSource::Hit(kvquilt_kvstore::TierKind::GPU)
    );
    assert_eq!(out.stats.cached_tokens, prefix.len());
    let diff = max_diff(&out.logits, &first.logits);
    assert!(diff < 1e-4, "{diff}");
}

/// With fallback to full prefill on (the sidecar's default), a turn whose documents are new
/// but whose history is stored plans to read the history (the longest run of pages held),
/// rather than counting the prefix a miss because its last page is new — which made every
/// such turn "hold nothing" and run as full prefill, reading no history ever.
#[test]
fn with_fallback_on_the_next_turn_still_reads_its_history() {
    let s = setup(true, 0);
    let b = &s.blender;
    // a steady machine: 1 ms per unit of prefill work, host loads at 10 GB/s
    let costs = b.costs();
    for t in [8usize, 40, 92, 20, 64].iter().cycle().take(100) {
        costs.record_full_prefill(*t, 1e-3 * costs.prefill_work(0, *t));
    }
    for _ in 0..40 {
        costs.record_load(
            kvquilt_kvstore::TierKind::HOST,
            1 << 20,
            (1 << 20) as f64 / 10e9,
        );
        costs.record_latency(kvquilt_kvstore::TierKind::HOST, 0.0);
    }
    let history = toks(51, 40);
    // (`reuse`: on a two-layer model a blend's pass is most of a full prefill anyway)
    let mode = Mode::Reuse;
    let turn1 = BlendRequest::new(
        history.clone(),
        vec![toks(52, 12)],
        toks(53, 5),
        mode.clone(),
    );
    let first = b.run(b"", &turn1).unwrap();
    assert!(first.stats.fell_back_to_full, "turn 1 holds nothing");
    let mut longer = history.clone();
    longer.extend(toks(54, 20));
    let turn2 = BlendRequest::new(longer, vec![toks(55, 12)], toks(56, 5), mode);
    let out = b.run(b"", &turn2).unwrap();
    assert!(
        !out.stats.fell_back_to_full,
        "the history is held: {:?}",
        out.stats.fallback
    );
    assert_eq!(
        out.stats.cached_tokens,
        5 * PAGE,
        "{:?}",
        out.stats.segments
    );
}

/// `prefix` mode's stats name segments as the other modes' do — the prefix, then each
/// chunk — however many pages the prefix is: a prefix partly read is no hit (its pages read
/// are in `cached_tokens`).
#[test]
fn prefix_mode_counts_a_paged_prefix_as_one_segment() {
    let s = setup(false, 0);
    let b = &s.blender;
    let prefix = toks(61, 30);
    let r = BlendRequest::new(
        prefix.clone(),
        vec![toks(62, 9), toks(63, 7)],
        toks(64, 3),
        Mode::Prefix,
    );
    let cold = b.run(b"", &r).unwrap();
    assert_eq!(cold.stats.segments, vec![SegmentSource::Miss; 3]);
    assert_eq!(cold.stats.misses, 3);
    let warm = b.run(b"", &r).unwrap();
    assert_eq!(warm.stats.segments.len(), 3);
    assert_eq!(warm.stats.hits_host, 3);
    // the last page gone: the prefix is partly read, the chunks after it computed
    let keys = page_keys(b, b"", &prefix);
    assert!(s.rt.block_on(b.store().remove(&keys[3])).unwrap());
    let part = b.run(b"", &r).unwrap();
    assert_eq!(part.stats.segments, vec![SegmentSource::Miss; 3]);
    assert_eq!(part.stats.cached_tokens, 3 * PAGE);
}

/// A paged prefix held only in a tier that has become slow (a stalled disk or remote) is
/// recomputed for speed, as any stored segment is, rather than read page by page against
/// the tier's deadline on every request: the request runs its own mode over the rest (a
/// document resident in the device tier), its logits are what computing the prefix gives,
/// and only the pages no tier holds are stored.
#[test]
fn a_paged_prefix_on_a_slow_tier_is_recomputed_for_speed() {
    use kvquilt_kvstore::TierKind;
    let s = setup(true, 64 << 20);
    let b = &s.blender;
    let costs = b.costs();
    let host = |seconds_per_mib: f64, latency_s: f64| {
        for _ in 0..40 {
            costs.record_load(TierKind::HOST, 1 << 20, seconds_per_mib);
            costs.record_latency(TierKind::HOST, latency_s);
        }
    };
    // a steady machine: 1 ms per unit of full prefill work, host loads at 10 GB/s
    for t in [8usize, 40, 92, 20, 64].iter().cycle().take(100) {
        costs.record_full_prefill(*t, 1e-3 * costs.prefill_work(0, *t));
    }
    host((1 << 20) as f64 / 10e9, 0.0);
    let (history, doc) = (toks(71, 40), toks(72, 12));
    let turn1 = BlendRequest::new(history.clone(), vec![doc.clone()], toks(73, 5), Mode::Reuse);
    assert!(b.run(b"", &turn1).unwrap().stats.fell_back_to_full);
    // read: the pages from the host tier, the document from the device tier (resident
    // since the fallback computed it)
    let read = b.run(b"", &turn1).unwrap();
    assert_eq!(
        read.stats.segments,
        vec![
            SegmentSource::Hit(TierKind::HOST),
            SegmentSource::Hit(TierKind::GPU)
        ]
    );
    assert_eq!(read.stats.cached_tokens, history.len());
    // (still a steady machine: reuse takes what it is planned at, whatever the loaded test
    // host took to time the read above — that one sample must not teach the correction
    // that reuse is slower than full prefill)
    for e in [0.002, 0.01, 0.05, 0.2].iter().cycle().take(40) {
        costs.record_mode(PlannedMode::Reuse, *e, *e);
    }
    // the host tier stalls: a second per MiB, a second to the first byte
    host(1.0, 1.0);
    let mut longer = history.clone();
    longer.extend(toks(74, 20));
    let turn2 = BlendRequest::new(longer.clone(), vec![doc.clone()], toks(75, 5), Mode::Reuse);
    let out = b.run(b"", &turn2).unwrap();
    assert!(!out.stats.fell_back_to_full, "{:?}", out.stats.fallback);
    assert_eq!(
        out.stats.segments,
        vec![
            SegmentSource::RecomputedForSpeed,
            SegmentSource::Hit(TierKind::GPU)
        ]
    );
    assert_eq!(out.stats.cached_tokens, 0, "no prefix token read");
    let cold = setup(false, 0);
    let want = cold.blender.run(b"", &turn2).unwrap();
    let diff = max_diff(&out.logits, &want.logits);
    assert!(diff < 1e-4, "{diff}");
    let stored: Vec<ChunkKey> = out.stored.iter().map(|o| o.key).collect();
    let keys = page_keys(b, b"", &longer);
    assert_eq!(stored, keys[5..], "only the pages no tier held");
}

/// What a request is made of, as stored objects: in `reuse` and `blend` a paged prefix's
/// pages then each chunk under its own key (duplicates once); in `prefix` mode the links
/// of its chain. A conversation's next turn holds the pages it shares with the turn
/// before, so what it lacks (what a quota check charges its store-back) is its new pages
/// and chunks, not its whole history.
#[test]
fn a_request_is_made_of_its_pages_and_chunks() {
    let s = setup(false, 0);
    let b = &s.blender;
    let (history, doc) = (toks(81, 20), toks(82, 6));
    let r = BlendRequest::new(
        history.clone(),
        vec![doc.clone(), doc.clone()],
        toks(83, 3),
        Mode::Reuse,
    );
    let codec = b.codec(b"t");
    let mut want: Vec<(ChunkKey, usize)> = page_keys(b, b"t", &history)
        .into_iter()
        .zip([8, 8, 4])
        .collect();
    want.push((codec.key(&doc), doc.len()));
    assert_eq!(b.objects_of(b"t", &r), want);
    // prefix mode: the chain of the pages and the chunk (its second copy is another link)
    let p = BlendRequest {
        mode: Mode::Prefix,
        ..r.clone()
    };
    let pages: Vec<&[u32]> = history.chunks(PAGE).collect();
    let links: Vec<&[u32]> = pages.iter().copied().chain([&doc[..], &doc[..]]).collect();
    let chain: Vec<(ChunkKey, usize)> = codec
        .prefix_keys(&links)
        .into_iter()
        .zip(links.iter().map(|l| l.len()))
        .collect();
    assert_eq!(b.objects_of(b"t", &p), chain);
    // its links are the pages (every link in prefix mode), and its stats name them
    assert_eq!(b.links_of(b"t", &r), want[..3].to_vec());
    assert_eq!(b.links_of(b"t", &p), chain);
    let keys = |l: &[(ChunkKey, usize)]| l.iter().map(|x| x.0).collect::<Vec<_>>();
    assert_eq!(b.run(b"t", &p).unwrap().stats.link_keys, keys(&chain));
    // a prefix no longer than a page is a chunk: no links
    let short = BlendRequest::new(toks(87, PAGE), vec![doc.clone()], toks(83, 3), Mode::Reuse);
    assert!(b.links_of(b"t", &short).is_empty());
    assert!(b.run(b"t", &short).unwrap().stats.link_keys.is_empty());
    // after turn 1 ran, turn 2 lacks only its new pages and its document
    let out = b.run(b"t", &r).unwrap();
    assert_eq!(out.stats.link_keys, keys(&want[..3]));
    let mut longer = history.clone();
    longer.extend(toks(84, 10));
    let turn2 = BlendRequest::new(longer.clone(), vec![toks(85, 7)], toks(86, 3), Mode::Reuse);
    let missing: Vec<usize> = b
        .objects_of(b"t", &turn2)
        .iter()
        .filter(|(k, _)| b.store().locate(k).is_none())
        .map(|&(_, n)| n)
        .collect();
    // pages of 8, 8, 8, 6: the first two are turn 1's
    assert_eq!(missing, vec![8, 6, 7]);
}

/// Pages held only in a slower tier (here the SSD, after a restart left the host tier
/// empty) that a request computes instead of reading — the tier estimated slower than
/// prefilling them — are stored again into the fastest tier: otherwise, while that tier
/// stays slow, every later turn of the conversation would compute its whole history again.
#[test]
fn pages_computed_because_their_tier_is_slow_are_copied_up() {
    use kvquilt_kvstore::{SsdConfig, TierKind};
    let dir = tempfile::tempdir().unwrap();
    let open = |rt: &Runtime| {
        let ssd = SsdConfig::new(dir.path(), 1 << 30);
        support::over_ssd(tiny_llama(), ssd, rt).with_prefix_page(PAGE)
    };
    let rt = Runtime::new().unwrap();
    let history = toks(91, 40);
    let turn = BlendRequest::new(
        history.clone(),
        vec![toks(92, 12)],
        toks(93, 5),
        Mode::Reuse,
    );
    {
        let b = open(&rt).with_fallback_to_full(false);
        b.run(b"", &turn).unwrap();
    }
    // restarted: the pages are on the SSD alone, which has become slow
    let b = open(&rt).with_fallback_to_full(true);
    let keys = page_keys(&b, b"", &history);
    assert!(
        keys.iter()
            .all(|k| b.store().locate(k) == Some(TierKind::SSD))
    );
    let costs = b.costs();
    for t in [8usize, 40, 92, 20, 64].iter().cycle().take(100) {
        costs.record_full_prefill(*t, 1e-3 * costs.prefill_work(0, *t));
    }
    for _ in 0..40 {
        costs.record_load(TierKind::SSD, 1 << 20, 1.0);
        costs.record_latency(TierKind::SSD, 1.0);
    }
    let out = b.run(b"", &turn).unwrap();
    assert_eq!(out.stats.cached_tokens, 0, "{:?}", out.stats.segments);
    let stored: Vec<ChunkKey> = out.stored.iter().map(|o| o.key).collect();
    for k in &keys {
        assert!(stored.contains(k), "every page stored again");
        assert_eq!(b.store().locate(k), Some(TierKind::HOST));
    }
}
