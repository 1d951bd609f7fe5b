//! Precompute inputs: a JSONL file (`{"id": ..., "text": ...}` or `{"id": ..., "chunks":
//! [...]}` per line) or a directory of text files (one document each, id = file name).
//! Everything is read and checked before any compute starts: a bad line fails the job with
//! its line number and nothing written.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

/// One input document and, if the input gives them, its chunks.
#[derive(Debug, Clone)]
pub(crate) struct Document {
    /// The input's id, as text (numbers are printed).
    pub id: String,
    pub text: Option<String>,
    pub chunks: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    id: Value,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    chunks: Option<Vec<String>>,
    /// Free-form metadata, carried by nothing here but allowed in the input.
    #[serde(default)]
    #[allow(dead_code)]
    metadata: Option<Value>,
}

pub(crate) fn read(path: &Path) -> Result<Vec<Document>> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let docs = if meta.is_dir() {
        read_dir(path)?
    } else {
        read_jsonl(path)?
    };
    if docs.is_empty() {
        bail!("{} holds no documents", path.display());
    }
    Ok(docs)
}

fn read_jsonl(path: &Path) -> Result<Vec<Document>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    // (a byte-order mark, as some editors write, is not part of the first line)
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&bytes);
    let mut docs = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let n = i + 1;
        let Ok(line) = std::str::from_utf8(line) else {
            bail!("{}:{n}: not UTF-8 text", path.display());
        };
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        // (an array would deserialize positionally as `[id, text]`: only objects name
        // their fields)
        if !line.trim_start().starts_with('{') {
            bail!(
                "{}:{n}: not a JSON object (`{{\"id\": ..., \"text\": ...}}`)",
                path.display()
            );
        }
        let l: Line = serde_json::from_str(line)
            .with_context(|| format!("{}:{n}: not a valid input line", path.display()))?;
        let id = match l.id {
            Value::String(s) => s,
            Value::Number(x) => x.to_string(),
            _ => bail!("{}:{n}: `id` must be a string or a number", path.display()),
        };
        // (text that is only whitespace is no document: a directory's such files are
        // skipped with a note, a line naming one is refused)
        let has_text = |t: &str| !t.trim().is_empty();
        match (&l.text, &l.chunks) {
            (Some(t), None) if has_text(t) => {}
            (None, Some(c)) if !c.is_empty() && c.iter().all(|s| has_text(s)) => {}
            _ => bail!(
                "{}:{n}: give a `text` or a `chunks` list (not both), not empty nor only whitespace",
                path.display()
            ),
        }
        docs.push(Document {
            id,
            text: l.text,
            chunks: l.chunks,
        });
    }
    Ok(docs)
}

fn read_dir(path: &Path) -> Result<Vec<Document>> {
    let mut entries: Vec<_> = std::fs::read_dir(path)
        .with_context(|| format!("listing {}", path.display()))?
        .collect::<std::io::Result<Vec<_>>>()?;
    entries.sort_by_key(|e| e.file_name());
    let mut docs = Vec::new();
    for e in entries {
        let p = e.path();
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        if !p.is_file() {
            // (not recursive: say what is left out rather than leave it out silently)
            eprintln!(
                "kvquilt precompute: skipping {} (not a regular file; directories are not read recursively)",
                p.display()
            );
            continue;
        }
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("reading {} (text files only)", p.display()))?;
        if text.trim().is_empty() {
            eprintln!(
                "kvquilt precompute: skipping {} (empty or only whitespace)",
                p.display()
            );
            continue;
        }
        docs.push(Document {
            id: e.file_name().to_string_lossy().into_owned(),
            text: Some(text),
            chunks: None,
        });
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_lines_are_checked_with_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        std::fs::write(
            &p,
            "{\"id\": 1, \"text\": \"a\"}\n\n{\"id\": \"b\", \"chunks\": [\"x\", \"y\"]}\n",
        )
        .unwrap();
        let d = read(&p).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].id, "1");
        assert_eq!(d[1].chunks.as_ref().unwrap().len(), 2);
        std::fs::write(&p, "{\"id\": 1, \"text\": \"a\"}\n{\"id\": 2}\n").unwrap();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(e.contains(":2:"), "{e}");
        std::fs::write(&p, "{\"id\": 1, \"txt\": \"a\"}\n").unwrap();
        assert!(format!("{:#}", read(&p).unwrap_err()).contains(":1:"));
        // a byte-order mark and CRLF line ends are read; bytes that are not UTF-8 are named
        // by line
        std::fs::write(&p, "\u{feff}{\"id\": 1, \"text\": \"a\"}\r\n").unwrap();
        assert_eq!(read(&p).unwrap()[0].text.as_deref(), Some("a"));
        std::fs::write(
            &p,
            b"{\"id\": 1, \"text\": \"a\"}\n{\"id\": 2, \"text\": \"\xff\"}\n",
        )
        .unwrap();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(e.contains(":2: not UTF-8"), "{e}");
        // an array is not read positionally as id and text
        std::fs::write(&p, "{\"id\": 1, \"text\": \"a\"}\n[\"x\", \"hello\"]\n").unwrap();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(e.contains(":2: not a JSON object"), "{e}");
        // text, or a chunk, that is only whitespace is refused by line (a directory's
        // whitespace-only file is skipped: no document either way)
        for bad in [
            "{\"id\": 2, \"text\": \" \\n\\t \"}",
            "{\"id\": 2, \"chunks\": [\"x\", \"  \"]}",
        ] {
            std::fs::write(&p, format!("{{\"id\": 1, \"text\": \"a\"}}\n{bad}\n")).unwrap();
            let e = format!("{:#}", read(&p).unwrap_err());
            assert!(e.contains(":2:") && e.contains("whitespace"), "{bad}: {e}");
        }
        let docs = dir.path().join("docs");
        std::fs::create_dir(&docs).unwrap();
        std::fs::write(docs.join("a.txt"), "hello").unwrap();
        std::fs::write(docs.join("b.txt"), " \n\t").unwrap();
        let d = read(&docs).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].id, "a.txt");
    }
}
