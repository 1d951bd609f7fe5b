//! Reading a request holds no more memory than the fields the request keeps: unknown fields
//! are skipped, not buffered, and `documents`, `stop` and message content are read straight
//! into their types. serde's `flatten` and untagged enums buffered them in an in-memory tree
//! first (32 bytes a value): a body of small numbers in a field the server ignores grew about
//! 16× while it was read, past the body budget it was admitted under.
//!
//! One test function per file: the counting allocator below sees every thread's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use kvquilt_api::Object;
use kvquilt_api::openai::{ChatRequest, CompletionRequest};

/// The system allocator, counting the bytes live and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
            grew(new_size);
        }
        p
    }
}

fn grew(bytes: usize) {
    let now = LIVE.fetch_add(bytes, Ordering::SeqCst) + bytes;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated at the peak of `f`, beyond what was live when it started.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f();
    (out, PEAK.load(Ordering::SeqCst).saturating_sub(base))
}

/// `n` small numbers as a JSON list: 2 bytes each.
fn zeros(n: usize) -> String {
    let mut s = String::with_capacity(2 * n + 2);
    s.push('[');
    for i in 0..n {
        s.push_str(if i == 0 { "0" } else { ",0" });
    }
    s.push(']');
    s
}

#[test]
fn reading_a_request_holds_about_what_it_keeps() {
    const N: usize = 1 << 20;
    let pad = zeros(N);
    // an unknown field, where OpenAI SDKs put theirs (`user`, `metadata`, ...)
    let chat =
        format!(r#"{{"messages": [{{"role": "user", "content": "hi"}}], "metadata": {pad}}}"#);
    let (read, peak) = peak_of(|| serde_json::from_str::<Object<ChatRequest>>(&chat));
    let read = read.expect("a chat request");
    assert_eq!(read.0.messages.len(), 1);
    assert!(
        peak < 64 << 10,
        "chat: {peak} bytes held reading {} bytes",
        chat.len()
    );

    let completion = format!(r#"{{"unknown": {pad}, "prompt": "p", "max_tokens": 3}}"#);
    let (read, peak) = peak_of(|| serde_json::from_str::<Object<CompletionRequest>>(&completion));
    assert_eq!(
        read.expect("a completion request").0.common.max_tokens,
        Some(3)
    );
    assert!(
        peak < 64 << 10,
        "completion: {peak} bytes held reading {} bytes",
        completion.len()
    );

    // known fields cost what their values keep: N stop strings of one byte are N Strings,
    // read once (24 bytes each and the allocator's smallest block), not first buffered
    let stops = format!("[{}]", vec![r#""s""#; N].join(","));
    let body = format!(r#"{{"prompt": "p", "stop": {stops}}}"#);
    let kept = N * (std::mem::size_of::<String>() + 8);
    let (read, peak) = peak_of(|| serde_json::from_str::<Object<CompletionRequest>>(&body));
    assert!(read.is_ok());
    assert!(peak < kept * 2, "stop: {peak} bytes held for {kept} kept");
}
