//! Reading a request holds about what the request keeps: unknown fields are skipped, not
//! buffered; fields read only to be checked (`tools`, ...) and lists the server limits
//! (`documents`, `stop`, `prompt`) are refused past a count as they are read; kept text is
//! read once into its type. serde's `flatten` and untagged enums buffered fields in an
//! in-memory tree first (32 bytes a value): a body of small numbers in a field the server
//! ignores grew 16–32× while it was read, past the body budget it was admitted under.
//!
//! One test function per file: the counting allocator below sees every thread's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use kvquilt_api::Object;
use kvquilt_api::openai::{ChatMessage, ChatRequest, CompletionRequest};

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

    // fields read only to be checked are refused past a count, not read whole (a 16×
    // `serde_json::Value` tree); lists the server limits anyway are refused past the limit
    let padded = [
        ("tools", format!(r#"{{"messages": [], "tools": {pad}}}"#)),
        (
            "response_format",
            format!(r#"{{"messages": [], "response_format": {{"type": "text", "x": {pad}}}}}"#),
        ),
        (
            "logit_bias",
            format!(r#"{{"messages": [], "logit_bias": {{"1": {pad}}}}}"#),
        ),
        (
            "documents",
            format!(
                r#"{{"messages": [], "documents": [{}]}}"#,
                vec![r#""""#; N].join(",")
            ),
        ),
        (
            "stop",
            format!(
                r#"{{"messages": [], "stop": [{}]}}"#,
                vec![r#""""#; N].join(",")
            ),
        ),
    ];
    for (field, body) in padded {
        let (read, peak) = peak_of(|| serde_json::from_str::<Object<ChatRequest>>(&body));
        assert!(read.is_err(), "{field}: a padded body was read");
        assert!(
            peak < 1 << 20,
            "{field}: {peak} bytes held reading {} bytes",
            body.len()
        );
    }
    let prompts = format!(r#"{{"prompt": [{}]}}"#, vec![r#""p""#; N].join(","));
    let (read, peak) = peak_of(|| serde_json::from_str::<Object<CompletionRequest>>(&prompts));
    assert!(read.is_err() && peak < 64 << 10, "prompts: {peak} bytes");

    // a chat request's messages and content parts are counted: a body of a million tiny
    // messages (6–9× its size once read) is refused within the count
    let tiny = format!("[{}]", vec![r#"{"role":""}"#; N].join(","));
    let body = format!(r#"{{"messages": {tiny}}}"#);
    let (read, peak) = peak_of(|| serde_json::from_str::<Object<ChatRequest>>(&body));
    assert!(read.is_err(), "a million messages were read");
    let most = kvquilt_api::MAX_MESSAGE_ITEMS * (std::mem::size_of::<ChatMessage>() + 32);
    assert!(
        peak < most * 2,
        "messages: {peak} bytes held, {most} at most"
    );

    // text the request keeps costs what it keeps: M message texts of one byte are M
    // messages, read once (not first buffered), within twice their size (a list's growth)
    let m = kvquilt_api::MAX_MESSAGE_ITEMS;
    let messages = format!("[{}]", vec![r#"{"role":"u","content":"c"}"#; m].join(","));
    let body = format!(r#"{{"messages": {messages}}}"#);
    let (read, peak) = peak_of(|| serde_json::from_str::<Object<ChatRequest>>(&body));
    let kept = m * (std::mem::size_of::<ChatMessage>() + 2);
    assert_eq!(read.expect("messages").0.messages.len(), m);
    assert!(
        peak < kept * 2,
        "messages: {peak} bytes held for {kept} kept"
    );
}
