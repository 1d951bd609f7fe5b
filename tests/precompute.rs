//! The precompute job over 100 MuSiQue passages (data/musique_dev.json), interrupted with
//! SIGINT and with SIGKILL part-way and resumed: no chunk is computed twice, and at the end
//! every chunk is present and verified. The job runs the tiny chat model
//! (`model/tests/fixtures/tiny-chat`): what is tested is the job's bookkeeping, not the
//! model's KV, and the real model's chunk KV is covered by blend's and the API's tests.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::repo_root;
use serde_json::{Value, json};

fn write_input(path: &Path) -> usize {
    let data: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("data/musique_dev.json")).unwrap(),
    )
    .unwrap();
    let mut lines = Vec::new();
    'outer: for (q, ex) in data.as_array().unwrap().iter().enumerate() {
        for (p, ctx) in ex["ctxs"].as_array().unwrap().iter().enumerate() {
            let text = ctx["text"].as_str().unwrap();
            let mut cut = text.len().min(400);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            let text = format!("{}\n\n{}", ctx["title"].as_str().unwrap(), &text[..cut]);
            lines.push(json!({"id": format!("q{q}-p{p}"), "text": text}).to_string());
            if lines.len() == 100 {
                break 'outer;
            }
        }
    }
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    lines.len()
}

/// `kvquilt precompute` on the tiny chat model over `input`, storing into `data`.
fn job(input: &Path, data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvquilt-under-test"));
    c.args(["precompute", "--model"])
        .arg(repo_root().join("model/tests/fixtures/tiny-chat"))
        .arg("--input")
        .arg(input)
        .arg("--data-dir")
        .arg(data);
    c
}

/// One run of the job: its events, its summary (if it printed one) and exit code.
struct Run {
    stored: Vec<String>,
    skipped: Vec<String>,
    summary: Option<Value>,
    code: Option<i32>,
}

/// Runs `kvquilt precompute`; with `stop_after = Some((n, signal))`, sends `signal` once
/// `n` chunks were stored by this run.
fn run(input: &Path, data: &Path, extra: &[&str], stop_after: Option<(usize, i32)>) -> Run {
    let mut child = job(input, data)
        .args(["--events", "--json"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting kvquilt precompute");
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut r = Run {
        stored: Vec::new(),
        skipped: Vec::new(),
        summary: None,
        code: None,
    };
    let mut signalled = false;
    for line in out.lines() {
        let v: Value = serde_json::from_str(&line.unwrap()).expect("JSON lines on stdout");
        match v["event"].as_str() {
            Some("stored") => r.stored.push(v["chunk_id"].as_str().unwrap().to_string()),
            Some("skipped") => r.skipped.push(v["chunk_id"].as_str().unwrap().to_string()),
            _ => r.summary = Some(v),
        }
        if let Some((n, sig)) = stop_after
            && !signalled
            && r.stored.len() >= n
        {
            // SAFETY: kill(2) on our own child
            unsafe {
                libc::kill(child.id() as i32, sig);
            }
            signalled = true;
        }
    }
    r.code = child.wait().unwrap().code();
    r
}

#[test]
fn interrupted_precompute_resumes_without_computing_anything_twice() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("passages.jsonl");
    let data = dir.path().join("data");
    assert_eq!(write_input(&input), 100);

    // SIGINT: finishes what is in flight, prints its summary, exits 130
    let first = run(&input, &data, &[], Some((8, libc::SIGINT)));
    assert_eq!(first.code, Some(130));
    let s = first.summary.as_ref().expect("a summary after SIGINT");
    assert_eq!(s["interrupted"], true);
    assert_eq!(s["computed"].as_u64().unwrap() as usize, first.stored.len());
    assert!(first.stored.len() < 100);

    // SIGKILL: no summary, but every chunk it reported stored is durable
    let second = run(&input, &data, &[], Some((8, libc::SIGKILL)));
    assert_eq!(second.code, None, "killed by the signal");
    let done_1: HashSet<&String> = first.stored.iter().collect();
    let skipped_2: HashSet<&String> = second.skipped.iter().collect();
    assert!(
        done_1.is_subset(&skipped_2),
        "run 2 recomputed a chunk of run 1"
    );
    assert!(second.stored.iter().all(|k| !done_1.contains(k)));

    // to the end, with verification
    let third = run(&input, &data, &["--verify"], None);
    assert_eq!(third.code, Some(0));
    let s = third.summary.as_ref().expect("summary");
    let earlier: HashSet<&String> = first.stored.iter().chain(&second.stored).collect();
    assert!(
        third.stored.iter().all(|k| !earlier.contains(k)),
        "a chunk was computed twice"
    );
    let all: HashSet<&String> = earlier
        .iter()
        .copied()
        .chain(&third.stored)
        .chain(&third.skipped)
        .collect();
    assert_eq!(s["chunks"], 100);
    assert_eq!(s["verified"].as_u64().unwrap() as usize, all.len());
    assert_eq!(third.stored.len() + third.skipped.len(), 100);

    // a fourth run has nothing left to do
    let fourth = run(&input, &data, &[], None);
    assert_eq!(fourth.summary.unwrap()["computed"], 0);
    assert_eq!(fourth.skipped.len(), 100);
}

#[test]
fn bad_input_fails_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.jsonl");
    std::fs::write(
        &input,
        "{\"id\": 1, \"text\": \"fine\"}\n{\"id\": 2, \"txt\": \"typo\"}\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_kvquilt-under-test"))
        .args(["precompute", "--input"])
        .arg(&input)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.jsonl:2"), "{err}");
    assert!(!data.exists(), "nothing may be written for bad input");
}

/// A data directory on a read-only filesystem: the job stops before computing anything,
/// naming the condition (the sidecar serves such a store; the job's whole point is writing
/// to it). On a real tmpfs, remounted read-only after a first run stored into it.
#[test]
fn a_read_only_store_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mount = |opts: &str| {
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(&mnt)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !mount("size=256m") {
        eprintln!("tmpfs mount not permitted here; kvstore's read_only tests cover the tier");
        return;
    }
    let input = dir.path().join("docs.jsonl");
    write_input(&input);
    let data = mnt.join("data");
    let first = run(&input, &data, &[], None);
    assert_eq!(first.code, Some(0));
    let remounted = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    let out = job(&input, &data).output().unwrap();
    let _ = Command::new("umount").arg(&mnt).status();
    assert!(remounted, "remount read-only");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("read-only"), "{err}");
}

/// Arguments that cannot work are refused by name before any model or store is touched
/// (found by a probe of the command line).
#[test]
fn bad_arguments_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("docs.jsonl");
    let corpus = "{\"id\": 1, \"text\": \"The tower is old.\"}\n";
    std::fs::write(&input, corpus).unwrap();
    let data = dir.path().join("data");
    let precompute = |extra: &[&str]| job(&input, &data).args(extra).output().unwrap();
    for (extra, says) in [
        (&["--tenant", ""][..], "--tenant \"\" is empty"),
        (&["--tenant", " acme"][..], "white space"),
        (&["--tenant", "a\nb"][..], "control character"),
        (&["--overlap", "8"][..], "--overlap needs --chunk-tokens"),
    ] {
        let out = precompute(extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains(says), "{extra:?}: {err}");
        assert!(!err.contains("Stack backtrace"), "{err}");
        assert!(!data.exists(), "{extra:?}: nothing may be written");
    }
    // a manifest that would overwrite the input is refused, the input kept
    let out = precompute(&["--manifest", input.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is the input itself"), "{err}");
    assert_eq!(std::fs::read_to_string(&input).unwrap(), corpus);
    // a reader gone from stdout is an error, not a panic (exit 101)
    let mut child = job(&input, &data)
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("writing the summary to stdout"), "{err}");
}

/// Damage to a store's files after a job (bytes flipped in its blob files, or the files
/// deleted): the next run counts its chunks as stored (by presence, not bytes), and its
/// `--verify` fails naming the damage (RocksDB stops writes over it, or a chunk is found
/// dropped as damaged); the run after that (the store moved aside) ends with every chunk
/// present and verified. A deleted blob file once failed every later run the same way.
#[test]
fn verify_meets_damage_and_the_next_run_restores_every_chunk() {
    for delete in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("passages.jsonl");
        let data = dir.path().join("data");
        write_input(&input);
        let first = run(&input, &data, &[], None);
        assert_eq!(first.code, Some(0));
        let distinct = first.stored.len();
        let blobs: Vec<_> = std::fs::read_dir(data.join("store"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "blob"))
            .collect();
        assert!(
            !blobs.is_empty(),
            "the job flushed its chunks to blob files"
        );
        for b in &blobs {
            if delete {
                std::fs::remove_file(b).unwrap();
                continue;
            }
            let mut bytes = std::fs::read(b).unwrap();
            for tenth in [1, 3, 5, 7] {
                let m = bytes.len() * tenth / 10;
                for x in &mut bytes[m..m + 64] {
                    *x ^= 0x5a;
                }
            }
            std::fs::write(b, bytes).unwrap();
        }
        let second = run(&input, &data, &["--verify"], None);
        assert_eq!(second.code, Some(1), "delete {delete}: the damage is met");
        let third = run(&input, &data, &["--verify"], None);
        assert_eq!(third.code, Some(0), "delete {delete}");
        let s = third.summary.unwrap();
        assert_eq!(s["verified"], distinct, "{s}");
        // the dropped chunks, or all of them when the store was moved aside
        assert!(s["computed"].as_u64().unwrap() >= 1, "{s}");
    }
}

/// What a probe of the job found (each failed before its fix): a manifest's temporary
/// file took the name of a file beside it (the input, once: deleted); a store written with
/// a lossy codec and run again without lossy objects allowed never converged (its chunks
/// counted as stored, `--verify` failing every run); a tier too small for any chunk, a
/// remote tier that is down, and chunks longer than the model's context less the sink
/// they are prefilled behind all exited 0 or failed part-way; `--jobs` had no bound.
#[test]
fn the_probes_findings_fail_clearly_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("docs.jsonl");
    let corpus =
        "{\"id\": 1, \"text\": \"The tower is old.\"}\n{\"id\": 2, \"text\": \"A river runs.\"}\n";
    std::fs::write(&input, corpus).unwrap();
    let data = dir.path().join("data");
    let precompute = |data: &Path, extra: &[&str]| job(&input, data).args(extra).output().unwrap();
    let fails_with = |out: std::process::Output, says: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{says}: {err}");
        assert!(err.contains(says), "{says}: {err}");
    };

    // a file named like the old temporary name survives the manifest's write
    let manifest = dir.path().join("ids.jsonl");
    let neighbour = dir.path().join("ids.tmp");
    std::fs::write(&neighbour, "important").unwrap();
    let out = precompute(&data, &["--manifest", manifest.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(std::fs::read_to_string(&neighbour).unwrap(), "important");
    assert_eq!(
        std::fs::read_to_string(&manifest).unwrap().lines().count(),
        2
    );
    assert_eq!(std::fs::read_to_string(&input).unwrap(), corpus);

    // lossy objects the next run does not serve are computed again, exactly, once
    let lossy = dir.path().join("lossy");
    let out = precompute(&lossy, &["--ssd-codec", "int8", "--allow-lossy", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    for computed in [2, 0] {
        let out = precompute(&lossy, &["--verify", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let s: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (s["computed"].as_u64(), s["verified"].as_u64()),
            (Some(computed), Some(2)),
            "{s}"
        );
    }

    // a tier that can hold no chunk, and a remote tier that is down, fail the job
    fails_with(
        precompute(&dir.path().join("tiny-ssd"), &["--ssd-bytes", "1"]),
        "smaller than one chunk's object",
    );
    let remote = dir.path().join("remote");
    fails_with(
        precompute(&remote, &["--remote-seeds", "127.0.0.1:1"]),
        "the remote tier (--remote-seeds 127.0.0.1:1) does not hold 2 of the chunks",
    );
    // ... keeping what it stored locally
    let out = precompute(&remote, &["--verify", "--json"]);
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (s["computed"].as_u64(), s["verified"].as_u64()),
        (Some(0), Some(2)),
        "{s}"
    );

    // windows as long as the context cannot be prefilled behind the sink; --jobs is bounded
    fails_with(
        precompute(&data, &["--chunk-tokens", "4096"]),
        "at most 4095",
    );
    let out = precompute(&data, &["--jobs", "100000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("1..=256"), "{err}");

    // ids given twice, and pre-cut documents beside --chunk-tokens, are run as given, with
    // a warning
    let twice = dir.path().join("twice.jsonl");
    std::fs::write(
        &twice,
        "{\"id\": 1, \"text\": \"One.\"}\n{\"id\": \"1\", \"chunks\": [\"Two.\"]}\n",
    )
    .unwrap();
    let out = job(&twice, &data)
        .args(["--chunk-tokens", "64"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("1 document(s) repeat an earlier id (the first: `1`)"),
        "{err}"
    );
    assert!(
        err.contains("does not cut the 1 document(s) given as `chunks`"),
        "{err}"
    );
}

#[path = "../kvstore/tests/support/cluster.rs"]
mod cluster;

/// A temporary directory holding `docs.jsonl`: two one-sentence documents.
fn two_documents() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("docs.jsonl");
    std::fs::write(
        &input,
        "{\"id\": 1, \"text\": \"The tower is old.\"}\n{\"id\": 2, \"text\": \"A river runs.\"}\n",
    )
    .unwrap();
    (dir, input)
}

/// Chunks another data directory's run shared through the remote tier are found there and
/// copied into this store: not computed, not counted missing. (They were found, never
/// copied, so a fresh directory over a shared remote failed the job: "smaller than one
/// chunk's object", and `--verify` failed on every run.)
#[test]
fn chunks_found_on_the_remote_are_copied_here() {
    let c = cluster::Cluster::start();
    let seeds = c.seeds.join(",");
    let (dir, input) = two_documents();
    let summary = |data: &Path, extra: &[&str]| -> Value {
        let out = job(&input, data)
            .args(["--remote-seeds", &seeds, "--json"])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        serde_json::from_slice(&out.stdout).expect("a summary")
    };
    let first = summary(&dir.path().join("a"), &[]);
    assert_eq!(
        (first["computed"].as_u64(), first["remote_missing"].as_u64()),
        (Some(2), Some(0)),
        "{first}"
    );
    let second = summary(&dir.path().join("b"), &["--verify"]);
    assert_eq!(
        (
            second["computed"].as_u64(),
            second["not_kept"].as_u64(),
            second["verified"].as_u64()
        ),
        (Some(0), Some(0), Some(2)),
        "{second}"
    );
}

/// A store written with a lossy SSD codec while the remote tier was down: the next run,
/// with the remote up, computes each chunk's exact object again and uploads it (lossy
/// values are never uploaded, so the job failed with `remote_missing` on every run).
#[test]
fn chunks_stored_lossy_reach_the_remote_exactly() {
    let c = cluster::Cluster::start();
    let seeds = c.seeds.join(",");
    let (dir, input) = two_documents();
    let data = dir.path().join("data");
    let lossy = ["--ssd-codec", "int8", "--allow-lossy", "--json"];
    let down = job(&input, &data)
        .args(lossy)
        .args(["--remote-seeds", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1), "the remote is down");
    let up = job(&input, &data)
        .args(lossy)
        .args(["--remote-seeds", &seeds])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&up.stderr);
    assert_eq!(up.status.code(), Some(0), "{err}");
    let s: Value = serde_json::from_slice(&up.stdout).unwrap();
    assert_eq!(
        (s["computed"].as_u64(), s["remote_missing"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
}

/// `--config` takes the sidecar's `[store]` section, so chunks land where `serve` looks
/// them up: its remote namespace (a run without it wrote to the `default` namespace, which
/// a sidecar of another namespace never reads), its capacities, its `data_dir`. The store
/// flags are refused beside it.
#[test]
fn the_sidecar_config_says_where_chunks_go() {
    let c = cluster::Cluster::start();
    let (dir, input) = two_documents();
    let config = dir.path().join("kvquilt.toml");
    let data = dir.path().join("from-config");
    let seeds: Vec<String> = c.seeds.iter().map(|s| format!("{s:?}")).collect();
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\n[store.remote]\nseeds = [{}]\nnamespace = \"team-a\"\n",
            seeds.join(", ")
        ),
    )
    .unwrap();
    let run = |cmd: &mut Command| -> (Option<i32>, Value, String) {
        let out = cmd.arg("--json").output().unwrap();
        let summary = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), summary, err)
    };
    // the config's data_dir and namespace (no --data-dir: `job` names one, so build it here)
    let mut with_config = Command::new(env!("CARGO_BIN_EXE_kvquilt-under-test"));
    with_config
        .args(["precompute", "--model"])
        .arg(repo_root().join("model/tests/fixtures/tiny-chat"))
        .arg("--input")
        .arg(&input)
        .arg("--config")
        .arg(&config)
        // a service's environment names the seeds too: layered over the file, not refused
        .env("KVQUILT_REMOTE_SEEDS", c.seeds.join(","));
    let (code, s, err) = run(&mut with_config);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(s["computed"], 2, "{s}");
    assert!(data.exists(), "the config's data_dir was used");
    let written = c.keys("kvq:*").len();
    assert!(written >= 4, "{written} keys");
    // the default namespace holds none of them: a run without the config computes both
    let (code, s, err) =
        run(job(&input, &dir.path().join("flags")).args(["--remote-seeds", &c.seeds.join(",")]));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(s["computed"], 2, "another namespace: {s}");
    assert_eq!(c.keys("kvq:*").len(), 2 * written);
    // store flags beside the config are refused
    let out = job(&input, &dir.path().join("x"))
        .args(["--config", config.to_str().unwrap(), "--ssd-bytes", "5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
