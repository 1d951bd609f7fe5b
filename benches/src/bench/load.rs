//! `kvquilt bench load`: HTTP load against a real `kvquilt serve` child process.
//!
//! Starts the server (the `kvquilt` binary beside this one) on loopback with a fresh data
//! directory, stores a set of chunks, then drives chunk lookups (`GET /v1/chunks/{id}`),
//! blend requests (`POST /v1/blend` over stored chunks) and, with `--completion-s`, chat
//! completions over stored chunks that decode up to `--max-tokens` tokens each (optionally
//! over a prompt KV compressed by `--compress`) at each concurrency for a fixed time.
//! Reports throughput (and generated tokens per second), p50/p99 latency, errors (non-2xx or
//! transport) and the server's RSS before and after. The load generator shares the machine
//! with the server: the numbers are what both together reach on it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kvquilt_client::api::CompressSpec;
use kvquilt_client::{BlendRequest, ChatMessage, ChatRequest, ChunkRef, Client, ModeSpec};
use serde::Serialize;

use super::write_report;

#[derive(clap::Args)]
pub struct LoadBenchArgs {
    /// Concurrent clients per level.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Seconds per lookup level.
    #[arg(long, default_value_t = 10.0)]
    lookup_s: f64,
    /// Seconds per blend level.
    #[arg(long, default_value_t = 20.0)]
    blend_s: f64,
    /// Stored chunks the lookups cycle through.
    #[arg(long, default_value_t = 64)]
    chunks: usize,
    /// Chunks per blend request.
    #[arg(long, default_value_t = 4)]
    chunks_per_blend: usize,
    /// Blend mode of the blend requests (`reuse`, `blend`, `full`).
    #[arg(long, default_value = "blend")]
    mode: String,
    /// Seconds per chat-completion level (0: none).
    #[arg(long, default_value_t = 0.0)]
    completion_s: f64,
    /// Most tokens each chat completion generates.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Stream the chat completions (server-sent events) and report time to first token and
    /// time per output token after it.
    #[arg(long)]
    stream: bool,
    /// The chat completions' prompt KV compressed by this token policy, N× (`snapkv:4`;
    /// none by default).
    #[arg(long)]
    compress: Option<String>,
    /// Model requests the server computes at once.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// One more argument for `kvquilt serve` (repeat it: `--serve-arg=--device
    /// --serve-arg=cuda`).
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    serve_args: Vec<String>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Level {
    kind: &'static str,
    concurrency: usize,
    requests: usize,
    errors: usize,
    seconds: f64,
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// `/health` probed every 50 ms during the level: its slowest answer, ms.
    health_max_ms: f64,
    /// Tokens the requests generated (chat completions; 0 for the other kinds).
    generated_tokens: usize,
    /// Generated tokens per second over the level.
    generated_per_s: f64,
    /// Streamed chat completions: time to the first content, median and 99th percentile, ms.
    ttft_p50_ms: Option<f64>,
    ttft_p99_ms: Option<f64>,
    /// Streamed chat completions: time per output token after the first, median, ms.
    tpot_p50_ms: Option<f64>,
}

/// What one level's task measured.
#[derive(Default)]
struct TaskResult {
    /// Each request's latency, seconds.
    lat: Vec<f64>,
    errors: usize,
    /// Tokens generated.
    tokens: usize,
    /// Streamed requests: seconds to the first content.
    ttft: Vec<f64>,
    /// Streamed requests: seconds per output token after the first.
    tpot: Vec<f64>,
}

/// One successful request: tokens generated and, when streamed, its first-token time and
/// time per output token after it (seconds).
#[derive(Default)]
struct Outcome {
    tokens: usize,
    ttft: Option<f64>,
    tpot: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    chunks: usize,
    chunk_tokens_mean: f64,
    blend_mode: String,
    server_workers: usize,
    /// `kvquilt serve`'s extra arguments (`--serve-arg`).
    serve_args: Vec<String>,
    /// Most tokens per chat completion.
    max_tokens: usize,
    /// The chat completions' token policy (`--compress`).
    compress: Option<String>,
    /// Chat completions streamed (`--stream`).
    stream: bool,
    rss_mib_before: f64,
    rss_mib_after: f64,
    levels: Vec<Level>,
}

/// The server child; killed when dropped.
struct ServerChild(Child);

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn run(a: LoadBenchArgs) -> Result<()> {
    // every argument checked before the server starts
    anyhow::ensure!(a.chunks >= 1, "--chunks {}: at least one", a.chunks);
    anyhow::ensure!(
        a.chunks_per_blend >= 1,
        "--chunks-per-blend {}: at least one",
        a.chunks_per_blend
    );
    anyhow::ensure!(
        a.concurrency.iter().all(|&c| c >= 1),
        "--concurrency {:?}: at least one client per level",
        a.concurrency
    );
    anyhow::ensure!(
        a.max_tokens >= 1,
        "--max-tokens {}: at least one",
        a.max_tokens
    );
    let compress = a.compress.as_deref().map(compress_spec).transpose()?;
    let dir = tempfile::tempdir().context("a scratch data directory")?;
    let mut child = Command::new(crate::kvquilt_binary()?)
        .args(["serve", "--listen", "127.0.0.1:0", "--workers"])
        .arg(a.workers.to_string())
        .arg("--data-dir")
        .arg(dir.path())
        .args(&a.serve_args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting kvquilt serve")?;
    let stderr = child.stderr.take().context("server stderr")?;
    let server = ServerChild(child);
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(u) = l.strip_prefix("kvquilt: listening on ") {
                    break u.trim().to_string();
                }
            }
            _ => bail!("kvquilt serve exited before listening"),
        }
    };
    std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
    let pid = server.0.id();
    // One thread: the generator takes at most one of the cores it shares with the server.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(drive(&a, &url, pid, compress))?;
    eprintln!(
        "{:<8} {:>5} {:>9} {:>7} {:>10} {:>9} {:>9} {:>12} {:>12} {:>10} {:>10} {:>10}",
        "kind",
        "conc",
        "requests",
        "errors",
        "per s",
        "p50 ms",
        "p99 ms",
        "health max",
        "tokens/s",
        "ttft p50",
        "ttft p99",
        "tpot p50"
    );
    let ms = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.1}"));
    for l in &report.levels {
        eprintln!(
            "{:<8} {:>5} {:>9} {:>7} {:>10.1} {:>9.3} {:>9.3} {:>12.3} {:>12.1} {:>10} {:>10} {:>10}",
            l.kind,
            l.concurrency,
            l.requests,
            l.errors,
            l.per_s,
            l.p50_ms,
            l.p99_ms,
            l.health_max_ms,
            l.generated_per_s,
            ms(l.ttft_p50_ms),
            ms(l.ttft_p99_ms),
            ms(l.tpot_p50_ms)
        );
    }
    eprintln!(
        "server RSS: {:.1} MiB before, {:.1} MiB after",
        report.rss_mib_before, report.rss_mib_after
    );
    if a.json {
        write_report(&report, None)?;
    }
    if let Some(p) = &a.out {
        write_report(&report, Some(p))?;
    }
    drop(server);
    Ok(())
}

async fn drive(
    a: &LoadBenchArgs,
    url: &str,
    pid: u32,
    compress: Option<CompressSpec>,
) -> Result<Report> {
    let client = Client::new(url);
    // distinct passages of ~60 tokens
    let texts: Vec<String> = (0..a.chunks)
        .map(|i| {
            format!(
                "Passage {i}. The harbour of town number {i} was rebuilt in {} after a storm; \
                 its lighthouse keeper, the {i}th of that name, kept a log of every ship that passed.",
                1800 + i
            )
        })
        .collect();
    let mut ids = Vec::new();
    let mut tokens = 0usize;
    for batch in texts.chunks(16) {
        let refs: Vec<ChunkRef> = batch.iter().map(ChunkRef::text).collect();
        let r = client.put_chunks(&refs).await?;
        tokens += r.chunks.iter().map(|c| c.tokens).sum::<usize>();
        ids.extend(r.chunks.into_iter().map(|c| c.id));
    }
    let ids = Arc::new(ids);
    let rss_before = rss_mib(pid);
    let mut levels = Vec::new();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    for &c in &a.concurrency {
        let probe = health_probe(&http, url);
        let mut l = lookups(url, &ids, c, a.lookup_s).await;
        l.health_max_ms = probe.finish().await;
        levels.push(l);
    }
    for &c in &a.concurrency {
        let probe = health_probe(&http, url);
        let mut l = blends(&client, &ids, c, a.blend_s, a.chunks_per_blend, &a.mode).await;
        l.health_max_ms = probe.finish().await;
        levels.push(l);
    }
    if a.completion_s > 0.0 {
        for &c in &a.concurrency {
            let probe = health_probe(&http, url);
            let mut l = completions(&client, url, &ids, c, a, compress.clone()).await;
            l.health_max_ms = probe.finish().await;
            levels.push(l);
        }
    }
    Ok(Report {
        machine: super::machine(),
        chunks: ids.len(),
        chunk_tokens_mean: tokens as f64 / ids.len().max(1) as f64,
        blend_mode: a.mode.clone(),
        server_workers: a.workers,
        serve_args: a.serve_args.clone(),
        max_tokens: a.max_tokens,
        compress: a.compress.clone(),
        stream: a.stream,
        rss_mib_before: rss_before,
        rss_mib_after: rss_mib(pid),
        levels,
    })
}

/// Lookups over one keep-alive HTTP/1.1 connection per concurrent client (hyper's client
/// connection: no pool, redirects or URL parsing per request, so the generator's share of
/// the two cores stays small).
async fn lookups(url: &str, ids: &Arc<Vec<String>>, conc: usize, secs: f64) -> Level {
    let host = Arc::new(url.trim_start_matches("http://").to_string());
    let paths: Arc<Vec<String>> =
        Arc::new(ids.iter().map(|id| format!("/v1/chunks/{id}")).collect());
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..conc)
        .map(|t| {
            let (host, paths) = (Arc::clone(&host), Arc::clone(&paths));
            tokio::spawn(async move {
                let mut r = TaskResult::default();
                let mut conn = None;
                let mut i = t;
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    let ok = lookup_once(&mut conn, &host, &paths[i % paths.len()]).await;
                    r.lat.push(t0.elapsed().as_secs_f64());
                    r.errors += usize::from(!ok);
                    i += conc;
                }
                r
            })
        })
        .collect();
    collect("lookup", conc, tasks, start).await
}

type Conn = hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// One `GET path` on `conn` (connected first if need be; dropped after a transport error).
async fn lookup_once(conn: &mut Option<Conn>, host: &str, path: &str) -> bool {
    use http_body_util::BodyExt;
    if conn.is_none() {
        *conn = connect(host).await.ok();
    }
    let Some(c) = conn.as_mut() else { return false };
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .body(http_body_util::Empty::new());
    let (Ok(req), Ok(())) = (req, c.ready().await) else {
        *conn = None;
        return false;
    };
    match c.send_request(req).await {
        Ok(resp) => {
            let ok = resp.status().is_success();
            if resp.into_body().collect().await.is_err() {
                *conn = None;
                return false;
            }
            ok
        }
        Err(_) => {
            *conn = None;
            false
        }
    }
}

async fn connect(host: &str) -> Result<Conn> {
    let stream = tokio::net::TcpStream::connect(host).await?;
    stream.set_nodelay(true)?;
    let (send, driver) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(driver);
    Ok(send)
}

async fn blends(
    client: &Client,
    ids: &Arc<Vec<String>>,
    conc: usize,
    secs: f64,
    per: usize,
    mode: &str,
) -> Level {
    let (client, ids, mode) = (client.clone(), Arc::clone(ids), mode.to_string());
    level("blend", conc, secs, move |i| {
        let refs: Vec<ChunkRef> = (0..per)
            .map(|j| ChunkRef::id(&ids[(i * 7 + j * 13) % ids.len()]))
            .collect();
        let req =
            BlendRequest::question("Which year was the harbour rebuilt?", refs).mode(&mode, None);
        let client = client.clone();
        async move { client.blend(&req).await.ok().map(|_| Outcome::default()) }
    })
    .await
}

/// `--compress POLICY:N` as the request field.
fn compress_spec(s: &str) -> Result<CompressSpec> {
    let (policy, n) = s
        .rsplit_once(':')
        .context("--compress POLICY:N (e.g. snapkv:4)")?;
    let n: f32 = n.parse().context("--compress POLICY:N: N a number")?;
    anyhow::ensure!(
        n.is_finite() && n > 1.0,
        "--compress {s}: N× less KV, N a number above 1"
    );
    Ok(CompressSpec {
        policy: Some(policy.to_string()),
        compression: Some(n),
        ..CompressSpec::default()
    })
}

/// Chat completions over `a.chunks_per_blend` stored chunks, each generating up to
/// `a.max_tokens` tokens (a request for a long answer, so that most reach the limit).
async fn completions(
    client: &Client,
    url: &str,
    ids: &Arc<Vec<String>>,
    conc: usize,
    a: &LoadBenchArgs,
    compress: Option<CompressSpec>,
) -> Level {
    let (client, ids) = (client.clone(), Arc::clone(ids));
    let (per, max_tokens, stream) = (a.chunks_per_blend, a.max_tokens, a.stream);
    let http = reqwest::Client::new();
    let url = format!("{url}/v1/chat/completions");
    level("chat", conc, a.completion_s, move |i| {
        let mut req = ChatRequest::new(vec![ChatMessage::user(
            "Write a long, detailed history of every harbour in these passages, one paragraph each.",
        )]);
        req.common.documents = (0..per)
            .map(|j| ChunkRef::id(&ids[(i * 7 + j * 13) % ids.len()]))
            .collect();
        req.common.max_tokens = Some(max_tokens);
        req.common.kvquilt = Some(ModeSpec {
            compress: compress.clone(),
            ..ModeSpec::default()
        });
        let (client, http, url) = (client.clone(), http.clone(), url.clone());
        async move {
            let got = match stream {
                true => streamed(&http, &url, req).await,
                false => client.chat(&req).await.map_err(|e| e.to_string()).map(|r| Outcome {
                    tokens: r.usage.completion_tokens,
                    ..Outcome::default()
                }),
            };
            got.map_err(|e| eprintln!("chat completion failed: {e}")).ok()
        }
    })
    .await
}

/// One chat completion streamed as server-sent events: its tokens (the last event's usage),
/// the time to its first content and the time per output token after it.
async fn streamed(
    http: &reqwest::Client,
    url: &str,
    mut req: ChatRequest,
) -> std::result::Result<Outcome, String> {
    req.common.stream = true;
    req.common.stream_options = Some(kvquilt_client::api::openai::StreamOptions {
        include_usage: true,
    });
    let t0 = Instant::now();
    let mut resp = http
        .post(url)
        .json(&req)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        let status = resp.status();
        return Err(format!(
            "{status}: {}",
            resp.text().await.unwrap_or_default()
        ));
    }
    let (mut first, mut last, mut tokens) = (None, None, None);
    let mut pending = String::new();
    while let Some(bytes) = resp.chunk().await.map_err(|e| e.to_string())? {
        pending.push_str(&String::from_utf8_lossy(&bytes));
        // complete events only: each ends with a blank line
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if data == "[DONE]" {
                    continue;
                }
                let v: serde_json::Value =
                    serde_json::from_str(data).map_err(|e| format!("an event: {e}"))?;
                if let Some(e) = v.get("error") {
                    return Err(format!("error event: {e}"));
                }
                let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
                if !content.is_empty() {
                    let t = t0.elapsed().as_secs_f64();
                    first.get_or_insert(t);
                    last = Some(t);
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    tokens = Some(n as usize);
                }
            }
        }
    }
    let tokens = tokens.ok_or("a stream without usage")?;
    let tpot = match (first, last) {
        (Some(f), Some(l)) if tokens >= 2 => Some((l - f) / (tokens - 1) as f64),
        _ => None,
    };
    Ok(Outcome {
        tokens,
        ttft: first,
        tpot,
    })
}

/// Runs `conc` tasks for `secs` seconds, each sending `request(i)` (`Some`: success) for
/// its own sequence of `i` (task `t` sends `t`, `t + conc`, ...), and measures them.
async fn level<F, Fut>(kind: &'static str, conc: usize, secs: f64, request: F) -> Level
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Option<Outcome>> + Send,
{
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..conc)
        .map(|t| {
            let request = request.clone();
            tokio::spawn(async move {
                let mut r = TaskResult::default();
                let mut i = t;
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    let got = request(i).await;
                    r.lat.push(t0.elapsed().as_secs_f64());
                    match got {
                        Some(o) => {
                            r.tokens += o.tokens;
                            r.ttft.extend(o.ttft);
                            r.tpot.extend(o.tpot);
                        }
                        None => r.errors += 1,
                    }
                    i += conc;
                }
                r
            })
        })
        .collect();
    collect(kind, conc, tasks, start).await
}

async fn collect(
    kind: &'static str,
    conc: usize,
    tasks: Vec<tokio::task::JoinHandle<TaskResult>>,
    start: Instant,
) -> Level {
    let mut all = TaskResult::default();
    for t in tasks {
        match t.await {
            Ok(r) => {
                all.lat.extend(r.lat);
                all.errors += r.errors;
                all.tokens += r.tokens;
                all.ttft.extend(r.ttft);
                all.tpot.extend(r.tpot);
            }
            Err(_) => all.errors += 1,
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let TaskResult {
        mut lat,
        errors,
        tokens,
        mut ttft,
        mut tpot,
    } = all;
    // the `p` quantile of `v`, ms (None when empty)
    let quantile = |v: &mut Vec<f64>, p: f64| -> Option<f64> {
        v.sort_by(f64::total_cmp);
        let last = v.len().checked_sub(1)?;
        Some(v[(last as f64 * p).round() as usize] * 1e3)
    };
    let (p50, p99) = (quantile(&mut lat, 0.50), quantile(&mut lat, 0.99));
    Level {
        kind,
        concurrency: conc,
        requests: lat.len(),
        errors,
        seconds,
        per_s: lat.len() as f64 / seconds,
        p50_ms: p50.unwrap_or(f64::NAN),
        p99_ms: p99.unwrap_or(f64::NAN),
        health_max_ms: f64::NAN,
        generated_tokens: tokens,
        generated_per_s: tokens as f64 / seconds,
        ttft_p50_ms: quantile(&mut ttft, 0.50),
        ttft_p99_ms: quantile(&mut ttft, 0.99),
        tpot_p50_ms: quantile(&mut tpot, 0.50),
    }
}

/// Polls `/health` until finished; reports the slowest answer.
struct HealthProbe {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<f64>,
}

fn health_probe(http: &reqwest::Client, url: &str) -> HealthProbe {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (http, u, s) = (http.clone(), format!("{url}/health"), Arc::clone(&stop));
    let task = tokio::spawn(async move {
        let mut worst: f64 = 0.0;
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            let t0 = Instant::now();
            let ok = matches!(http.get(&u).send().await, Ok(r) if r.status().is_success());
            let ms = if ok {
                t0.elapsed().as_secs_f64() * 1e3
            } else {
                f64::INFINITY
            };
            worst = worst.max(ms);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        worst
    });
    HealthProbe { stop, task }
}

impl HealthProbe {
    async fn finish(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap_or(f64::NAN)
    }
}

/// Resident set of a process, MiB (Linux `/proc`).
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}
