//! `kvquilt serve`: the HTTP sidecar (axum on tokio).
//!
//! Start-up loads the model, opens the data directory's store and counts each tenant's
//! stored bytes; then the router serves until SIGINT/SIGTERM, finishes in-flight requests,
//! and flushes the store. Model work runs on `pool::ModelPool`, never on the async
//! workers, so `/health` and chunk lookups stay fast under load.

pub mod bodies;
pub mod config;
pub mod connections;
pub mod error;
mod extract;
mod generation;
pub mod metrics;
pub mod openapi;
mod pool;
mod routes;
pub mod state;
pub mod tenants;
pub(crate) mod text_stream;
pub mod tokenizing;
mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{MethodRouter, get, post};
use kvquilt_api::Method;
use kvquilt_blend::calibration::{self, BlendDefault};
use kvquilt_blend::{Blender, ModelIdentity};
use kvquilt_kvstore::{PolicyKind, TieredStore};
use kvquilt_model::{ChatTemplate, LoadedModel};

use crate::model_source::ModelArgs;
use crate::store_setup::open_store;
use config::Config;
use error::ApiError;
use metrics::{Metrics, RouteLabels, RouteOnly};
use pool::ModelPool;
use state::{AppState, Shared};
use tenants::{NamespaceKey, Tenants};

/// `kvquilt serve` flags; each beats its environment variable, which beats the config file.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on (default 127.0.0.1:8077).
    #[arg(long, env = "KVQUILT_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory (the store lives in `store/` under it).
    #[arg(long, env = "KVQUILT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Bearer token of the default tenant (repeatable; required off loopback).
    #[arg(long = "api-token", env = "KVQUILT_API_TOKENS", value_delimiter = ',')]
    api_tokens: Vec<String>,
    /// TOML configuration file (see `serve::config`).
    #[arg(long, env = "KVQUILT_CONFIG")]
    config: Option<PathBuf>,
    /// Model requests computed at once.
    #[arg(long, env = "KVQUILT_WORKERS")]
    workers: Option<usize>,
    /// A .gguf file, an HF model directory, or a known model name (default: the default model).
    #[arg(long, env = "KVQUILT_MODEL")]
    model: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "KVQUILT_DEVICE")]
    device: Option<String>,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, env = "KVQUILT_DTYPE")]
    dtype: Option<String>,
    /// Attention implementation: auto, reference or fused.
    #[arg(long, env = "KVQUILT_ATTENTION")]
    attention: Option<String>,
    /// Precision of the CPU's tiled attention products: f32 or bf16.
    #[arg(long, env = "KVQUILT_CPU_ATTENTION")]
    cpu_attention: Option<String>,
    /// Precision of the CPU's weight products over many rows: f32 or bf16.
    #[arg(long, env = "KVQUILT_CPU_MATMUL")]
    cpu_matmul: Option<String>,
    /// Precision of the CPU's weight products over the GGUF's blocks (decode): q16, q8 or
    /// f32.
    #[arg(long, env = "KVQUILT_CPU_DECODE")]
    cpu_decode: Option<String>,
    /// Seed nodes of the shared remote tier (Redis Cluster, `host:port`, comma-separated);
    /// the rest of `[store.remote]` comes from the config file.
    #[arg(long, env = "KVQUILT_REMOTE_SEEDS", value_delimiter = ',')]
    remote_seeds: Vec<String>,
    /// Folder of calibration records (`[blend] calibration_dir`; default
    /// `<cache root>/calibration`, then the built-in records).
    #[arg(long, env = "KVQUILT_CALIBRATION_DIR")]
    calibration_dir: Option<PathBuf>,
    /// Check the configuration (defaults, file, environment, flags: every check `serve`
    /// makes before it loads the model), print what it resolves to, and exit: 0 when it is
    /// valid, 1 with the error naming the setting otherwise. Loads no model, opens no store.
    #[arg(long)]
    check_config: bool,
}

impl Args {
    /// Defaults, then the file, then flags/variables.
    pub fn config(&self) -> Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        if let Some(l) = self.listen {
            c.listen = l;
        }
        if let Some(d) = &self.data_dir {
            c.data_dir = d.clone();
        }
        if !self.api_tokens.is_empty() {
            c.api_tokens = self.api_tokens.clone();
        }
        if let Some(w) = self.workers {
            c.limits.workers = w;
        }
        if self.model.is_some() {
            c.model = self.model.clone();
        }
        if let Some(d) = &self.device {
            c.device = d.clone();
        }
        if self.dtype.is_some() {
            c.dtype = self.dtype.clone();
        }
        if let Some(a) = &self.attention {
            c.attention = a.clone();
        }
        if let Some(p) = &self.cpu_attention {
            c.cpu_attention = p.clone();
        }
        if let Some(p) = &self.cpu_matmul {
            c.cpu_matmul = p.clone();
        }
        if let Some(p) = &self.cpu_decode {
            c.cpu_decode = p.clone();
        }
        if !self.remote_seeds.is_empty() {
            c.store.remote.seeds = self.remote_seeds.clone();
        }
        if let Some(d) = &self.calibration_dir {
            c.blend.calibration_dir = Some(d.clone());
        }
        c.validate()?;
        Ok(c)
    }
}

/// `kvquilt serve`: merges the configuration, starts logging and a tokio runtime, and serves until SIGINT/SIGTERM.
pub fn run(args: Args) -> Result<()> {
    let config = args.config()?;
    if args.check_config {
        print!("{}", config.summary());
        return Ok(());
    }
    init_logging(&config.log_level);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kvquilt-serve")
        .build()?;
    rt.block_on(serve(config))
}

/// Logs at `level` (a name [`Config`] validated; INFO otherwise) to stderr, coloured only
/// when stderr is a terminal.
pub(crate) fn init_logging(level: &str) {
    use std::io::IsTerminal;
    let level = level.parse().unwrap_or(tracing::Level::INFO);
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Builds everything and serves until a shutdown signal.
pub async fn serve(config: Config) -> Result<()> {
    let model_args = ModelArgs {
        model: config.model.clone(),
        device: config.device.clone(),
        dtype: config.dtype.clone(),
        attention: config.attention.clone(),
        cpu_attention: config.cpu_attention.clone(),
        cpu_matmul: config.cpu_matmul.clone(),
        cpu_decode: config.cpu_decode.clone(),
    };
    let (loaded, store, key) = tokio::task::spawn_blocking({
        let c = config.clone();
        move || -> Result<_> {
            let loaded = model_args.load()?;
            let store = open_store(&c.data_dir, &c.store)?;
            let key =
                tenants::serving_key(&c.data_dir, !c.tenants.is_empty()).with_context(|| {
                    format!(
                        "reading the tenant namespace key in {}",
                        c.data_dir.display()
                    )
                })?;
            Ok((loaded, store, key))
        }
    })
    .await??;
    let store = Arc::new(store);
    let shared = app_state(&config, loaded, Arc::clone(&store), &key)?;
    let counted = shared
        .account_existing()
        .await
        .map_err(|e| anyhow::anyhow!("counting stored chunks: {}", e.message))?;
    let app = router(Arc::clone(&shared));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        model = %shared.model_name,
        // what chunk keys derive from: sidecars sharing a remote tier must agree on it
        key_model = %wire::key_identity(shared.blender.identity()).model,
        data_dir = %config.data_dir.display(),
        stored_chunks = counted,
        "kvquilt serving"
    );
    // the line scripts and tests wait for
    eprintln!("kvquilt: listening on http://{}", listener.local_addr()?);
    let l = &config.limits;
    let limits = connections::ConnectionLimits {
        header_timeout: std::time::Duration::from_secs(l.header_timeout_s),
        // the store's files (at most `store.ssd_open_files`), the model's, the log, remote
        // connections: twice the store's bound kept free
        max_connections: connections::fit_to_descriptor_limit(
            l.max_connections,
            2 * config.store.ssd_open_files as usize,
        ),
        send_timeout: std::time::Duration::from_secs(l.send_timeout_s),
        shutdown_grace: std::time::Duration::from_secs(l.shutdown_grace_s),
    };
    connections::serve_connections(listener, app, limits, shutdown_signal()).await;
    tracing::info!("shutting down: flushing the store");
    // Every acknowledged object is already durable (synced WAL); a flush that fails (a full
    // disk) loses only access times and pins' last state, so the stop stays clean.
    if let Err(e) = store.flush().await {
        tracing::warn!(error = %e, "flushing the store at shutdown failed; stored objects are durable, recent access times are lost");
    }
    eprintln!("kvquilt: stopped");
    Ok(())
}

/// What every handler shares, built from a loaded model and an open store (in `serve`, or
/// by a test around a tiny model and a host-only store). Call inside a tokio runtime: the
/// blender keeps its handle for store reads.
pub fn app_state(
    config: &Config,
    loaded: LoadedModel,
    store: Arc<TieredStore>,
    namespace_key: &NamespaceKey,
) -> Result<AppState> {
    let identity = ModelIdentity::of(&loaded)?;
    // a known model's name as given (its dots are not an extension), a path's file stem
    let model_name = match &config.model {
        None => kvquilt_model::fetch::SMOLLM2_135M_INSTRUCT.name.to_string(),
        Some(m)
            if kvquilt_model::fetch::KNOWN_MODELS
                .iter()
                .any(|s| s.name == m) =>
        {
            m.clone()
        }
        Some(m) => std::path::Path::new(m)
            .file_stem()
            .map_or_else(|| m.clone(), |s| s.to_string_lossy().into_owned()),
    };
    let blend_default = blend_default(config, &identity)?;
    let tokenizer = loaded.tokenizer()?.clone();
    let template = loaded.chat_template.unwrap_or_else(ChatTemplate::chatml);
    let on_gpu = !loaded.model.device().is_cpu();
    let l = &config.limits;
    let kv_body_limit = match l.max_kv_body_bytes {
        Some(n) => n,
        None => usize::try_from(identity.layout.object_bytes(l.max_request_tokens))
            .unwrap_or(usize::MAX)
            .saturating_add(1 << 20),
    };
    let largest = kv_body_limit.max(l.max_body_bytes) as u64;
    let budget = l
        .body_budget_bytes
        .unwrap_or_else(|| (1u64 << 30).max(largest.saturating_mul(2)));
    if budget < largest {
        anyhow::bail!(
            "limits.body_budget_bytes ({budget}) is below the largest body a request may send ({largest} bytes: limits.max_body_bytes, limits.max_kv_body_bytes)"
        );
    }
    // (one tenant alone has nobody to leave room for)
    let tenant_share = if config.tenants.is_empty() {
        1.0
    } else {
        l.tenant_body_share
    };
    let decode_batch = config.limits.effective_decode_batch();
    if config.limits.decode_batch.is_some_and(|n| n >= 2) && config.limits.workers < 2 {
        tracing::warn!(
            decode_batch,
            workers = config.limits.workers,
            "limits.decode_batch has no effect with one worker: one request decodes at a time"
        );
    }
    let blender = Arc::new(
        Blender::new(
            Arc::new(loaded.model),
            identity,
            store,
            tokio::runtime::Handle::current(),
        )
        .with_device_tier(
            if on_gpu { config.store.device_bytes } else { 0 },
            PolicyKind::Lru,
        )
        .with_stall_floor(std::time::Duration::from_millis(config.store.stall_ms))
        .with_fallback_to_full(config.blend.fall_back_to_full)
        .with_prefix_page(config.blend.prefix_page)
        .with_idle_graphs(config.limits.workers)
        .with_prompt_priority(std::time::Duration::from_millis(
            config.limits.decode_yield_ms,
        ))
        .with_decode_batching(decode_batch)
        .context("starting the decode batcher")?,
    );
    Ok(Arc::new(Shared {
        blender: Arc::clone(&blender),
        tokenizer: Arc::new(tokenizer),
        template: Arc::new(template),
        model_name,
        blend_default,
        tenants: Tenants::from_config(config, namespace_key),
        limits: config.limits.clone(),
        kv_body_limit,
        body_budget: bodies::BodyBudget::new(budget).with_tenant_share(tenant_share),
        kv_budget: bodies::BodyBudget::new(budget).with_tenant_share(tenant_share),
        pool: ModelPool::new(config.limits.workers, config.limits.max_queue),
        tokenizing: tokenizing::Tokenizing::per_core(),
        metrics: Metrics::new(blender),
        started: Instant::now(),
        prefetching: Arc::new(tokio::sync::Semaphore::new(1)),
    }))
}

/// What `blend` means for the served model: its calibration record (the configured folder,
/// then the built-in records), or `prefix` unless the configuration opts in. Logged once.
fn blend_default(config: &Config, identity: &ModelIdentity) -> Result<BlendDefault> {
    let dir = config.blend.calibration_dir();
    // a folder named in the config (or --calibration-dir) that is not there is most likely a
    // typo: said, since the built-in records then answer in its place
    if config.blend.calibration_dir.is_some() && !dir.is_dir() {
        tracing::warn!(
            folder = %dir.display(),
            "the configured calibration folder does not exist; only the built-in records are consulted"
        );
    }
    let found = calibration::find(Some(&dir), identity).with_context(|| {
        format!(
            "reading the calibration record of this model (folder {})",
            dir.display()
        )
    })?;
    let default = BlendDefault::from_record(
        found.as_ref(),
        config.blend.blend_uncalibrated()?,
        &config.device,
    );
    match &default {
        BlendDefault::Calibrated {
            config,
            source,
            variant,
        } => tracing::info!(
            ratio = %config.ratio,
            selection = %variant,
            record = %source,
            "calibrated: blend requests without a ratio recompute {:.0}% of chunk tokens",
            config.ratio * 100.0
        ),
        BlendDefault::Uncalibrated {
            reason,
            opt_in: None,
        } => tracing::warn!(
            key = %calibration::calibration_key(identity),
            "{reason}: blend requests without a ratio are served as prefix (exact); run `kvquilt calibrate` or set blend.uncalibrated = \"blend\""
        ),
        BlendDefault::Uncalibrated {
            reason,
            opt_in: Some(c),
        } => tracing::warn!(
            ratio = %c.ratio,
            "{reason}: blending anyway at the uncalibrated default (blend.uncalibrated = \"blend\")"
        ),
    }
    Ok(default)
}

/// One row of the route table: a method on a path (OpenAPI template syntax) and its handler.
pub struct RouteEntry {
    /// The method.
    pub method: Method,
    /// The path, as `kvquilt_api::ROUTES` spells it.
    pub path: &'static str,
    handler: MethodRouter<AppState>,
}

fn entry(method: Method, path: &'static str, handler: MethodRouter<AppState>) -> RouteEntry {
    RouteEntry {
        method,
        path,
        handler,
    }
}

/// The route table the router is built from: every route the API serves, once. Tests compare
/// it with `kvquilt_api::ROUTES` (and so with the OpenAPI document) in both directions.
pub fn routes() -> Vec<RouteEntry> {
    use axum::routing::{delete, head, put};
    use routes::{blend, chunks, openai, ops};
    vec![
        entry(Method::Get, "/health", get(ops::health)),
        entry(Method::Get, "/metrics", get(ops::metrics)),
        entry(Method::Get, "/openapi.json", get(ops::openapi)),
        entry(Method::Get, "/v1/stats", get(ops::stats)),
        entry(Method::Get, "/v1/models", get(openai::models)),
        entry(Method::Get, "/v1/models/{model}", get(openai::model)),
        entry(Method::Post, "/v1/chunks", post(chunks::create)),
        entry(Method::Post, "/v1/chunks/lookup", post(chunks::lookup)),
        entry(Method::Get, "/v1/chunks/{id}", get(chunks::info)),
        entry(Method::Head, "/v1/chunks/{id}", head(chunks::info)),
        entry(Method::Delete, "/v1/chunks/{id}", delete(chunks::delete)),
        entry(Method::Post, "/v1/chunks/{id}/pin", post(chunks::pin)),
        entry(Method::Delete, "/v1/chunks/{id}/pin", delete(chunks::unpin)),
        entry(Method::Get, "/v1/chunks/{id}/kv", get(chunks::get_kv)),
        entry(Method::Put, "/v1/chunks/{id}/kv", put(chunks::put_kv)),
        entry(Method::Post, "/v1/blend", post(blend::blend)),
        entry(Method::Post, "/v1/completions", post(openai::completions)),
        entry(Method::Post, "/v1/chat/completions", post(openai::chat)),
    ]
}

/// The API's router, built from [`routes`]: auth and limits per handler, metrics per
/// matched route, a JSON 404 for anything else and a JSON 405 (with `Allow`) for a known
/// path asked with another method.
pub fn router(state: AppState) -> Router {
    let mut by_path: Vec<(&'static str, MethodRouter<AppState>, Vec<Method>)> = Vec::new();
    for r in routes() {
        match by_path.iter_mut().find(|(p, ..)| *p == r.path) {
            Some((_, m, methods)) => {
                *m = std::mem::take(m).merge(r.handler);
                methods.push(r.method);
            }
            None => by_path.push((r.path, r.handler, vec![r.method])),
        }
    }
    let mut app = Router::new();
    for (path, handler, methods) in by_path {
        app = app.route(path, handler.merge(method_not_allowed(&methods)));
    }
    // bodies are read (limited, timed, budgeted) by `bodies` before a handler runs; the
    // extractors then take them from memory
    app.route_layer(middleware::from_fn_with_state(
        Arc::clone(&state),
        bodies::read_within_limits,
    ))
    .route_layer(middleware::from_fn_with_state(Arc::clone(&state), track))
    .fallback(|| async { ApiError::not_found("no_such_route", "no such route; see /openapi.json") })
    .layer(DefaultBodyLimit::disable())
    .with_state(state)
}

/// A JSON 405 naming the methods `path` takes (in `Allow` and in the message).
fn method_not_allowed(methods: &[Method]) -> MethodRouter<AppState> {
    use axum::http::{HeaderValue, StatusCode, header::ALLOW};
    use axum::response::IntoResponse;
    let allow = methods
        .iter()
        .map(|m| m.openapi_name().to_uppercase())
        .collect::<Vec<_>>()
        .join(", ");
    MethodRouter::new().fallback(move || {
        let allow = allow.clone();
        async move {
            let msg = format!("this route does not take that method; it takes {allow}");
            let mut out = ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", msg)
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&allow) {
                out.headers_mut().insert(ALLOW, v);
            }
            out
        }
    })
}

/// Counts every request and its latency by route.
async fn track(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let start = Instant::now();
    let resp = next.run(req).await;
    s.metrics
        .requests
        .get_or_create(&RouteLabels {
            route: route.clone(),
            status: resp.status().as_u16(),
        })
        .inc();
    s.metrics
        .latency
        .get_or_create(&RouteOnly { route })
        .observe(start.elapsed().as_secs_f64());
    resp
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received; finishing in-flight requests");
}
