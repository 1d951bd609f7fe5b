//! The documents name real things: every file that README.md and ARCHITECTURE.md name in
//! backticks exists, and every test that they or BENCHMARKS.md name as pinning a claim
//! (`path.rs::name`, `module::tests::name`) is a function of that file or module.
//!
//! ARCHITECTURE.md's invariants each name the test that pins them; this keeps those names
//! true when a test is renamed or moved. BENCHMARKS.md is a log, so files it names may have
//! been removed since (it says so where they were); only its test names are checked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The repository's root: this package's folder is `tests/`. Cargo's run-time
/// `CARGO_MANIFEST_DIR` comes first: this binary depends on no crate of the workspace, so a
/// build made in another checkout sharing the target directory stays fresh here, and its
/// compiled-in path would name that checkout (a local CI run failed so).
fn root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Every file under the root, as `/`-separated paths relative to it, without build output
/// (`target/`) and git's own folder.
fn repo_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("readable folder") {
            let entry = entry.expect("readable entry");
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let kind = entry.file_type().expect("file type");
            if kind.is_dir() {
                if name != ".git" && name != "target" && name != "__pycache__" {
                    stack.push(path);
                }
            } else {
                let rel = path.strip_prefix(root).expect("under the root");
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    out
}

/// The backticked spans of a Markdown text that hold no whitespace, with their line numbers;
/// fenced code blocks are skipped.
fn spans(text: &str) -> Vec<(usize, String)> {
    let mut prose = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            prose.push('\n');
            continue;
        }
        if !fenced {
            prose.push_str(line);
        }
        prose.push('\n');
    }
    let mut out = Vec::new();
    let mut line = 1;
    for (i, piece) in prose.split('`').enumerate() {
        if i % 2 == 1 && !piece.is_empty() && !piece.chars().any(char::is_whitespace) {
            out.push((line, piece.to_string()));
        }
        line += piece.matches('\n').count();
    }
    out
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

const FILE_KINDS: [&str; 7] = [".rs", ".sh", ".py", ".toml", ".cu", ".json", ".md"];

/// `path.ext` or `path.ext::item::…`, split; `None` for anything else.
fn file_reference(span: &str) -> Option<(&str, Option<&str>)> {
    let (file, item) = match span.split_once("::") {
        Some((file, item)) => (file, Some(item)),
        None => (span, None),
    };
    let named = FILE_KINDS.iter().any(|ext| file.ends_with(ext))
        && file
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./-".contains(c));
    (named && !file.starts_with('/') && !file.starts_with("../")).then_some((file, item))
}

/// What the repository defines: `fn` and `mod` names per Rust file, `def` and `class` names
/// per Python file, and the text of CUDA
/// files (their kernels are looked up as words).
struct Definitions {
    files: Vec<String>,
    by_file: BTreeMap<String, BTreeSet<String>>,
}

impl Definitions {
    fn read(root: &Path) -> Self {
        let files = repo_files(root);
        let mut by_file = BTreeMap::new();
        for file in files
            .iter()
            .filter(|f| f.ends_with(".rs") || f.ends_with(".cu") || f.ends_with(".py"))
        {
            let text = std::fs::read_to_string(root.join(file)).unwrap_or_default();
            let mut names = BTreeSet::new();
            let words: Vec<&str> = text
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| !w.is_empty())
                .collect();
            for pair in words.windows(2) {
                let python = file.ends_with(".py") && (pair[0] == "def" || pair[0] == "class");
                if file.ends_with(".cu") || pair[0] == "fn" || pair[0] == "mod" || python {
                    names.insert(pair[1].to_string());
                }
            }
            by_file.insert(file.clone(), names);
        }
        Definitions { files, by_file }
    }

    /// The repository's files that a document's `path` names: itself, or any file whose
    /// path ends with `/path` (documents name files relative to their crate or module).
    fn matching(&self, path: &str) -> Vec<&String> {
        let suffix = format!("/{path}");
        self.files
            .iter()
            .filter(|f| *f == path || f.ends_with(&suffix))
            .collect()
    }

    /// Whether `name` is defined in `file` or in a file of its module folder
    /// (`a/b.rs` → `a/b/…`).
    fn defines_in(&self, file: &str, name: &str) -> bool {
        let folder = format!("{}/", file.trim_end_matches(".rs"));
        self.by_file
            .iter()
            .any(|(f, names)| (f == file || f.starts_with(&folder)) && names.contains(name))
    }

    /// Whether `name` is a function of a file whose path has `module` as a file stem or a
    /// folder (`plan::tests::x` → a `plan.rs` or `plan/…`); any file when `module` is none.
    fn defines_under(&self, module: Option<&str>, name: &str) -> bool {
        self.by_file.iter().any(|(f, names)| {
            names.contains(name)
                && module.is_none_or(|m| {
                    f.split('/')
                        .any(|part| part == m || part.strip_suffix(".rs") == Some(m))
                })
        })
    }
}

/// Every broken reference of one document, as `DOC:LINE: what`.
fn check(doc: &str, defs: &Definitions, files_too: bool) -> Vec<String> {
    let text = std::fs::read_to_string(root().join(doc)).expect("the document exists");
    let mut broken = Vec::new();
    for (line, span) in spans(&text) {
        if let Some((file, item)) = file_reference(&span) {
            let found = defs.matching(file);
            if found.is_empty() {
                if files_too {
                    broken.push(format!("{doc}:{line}: no file `{file}`"));
                }
                continue;
            }
            let Some(name) = item.and_then(|i| i.rsplit("::").next()) else {
                continue;
            };
            if is_identifier(name) && !found.iter().any(|f| defs.defines_in(f, name)) {
                broken.push(format!("{doc}:{line}: `{span}`: no `{name}` in {found:?}"));
            }
        } else if let Some((path, name)) = span.rsplit_once("::") {
            let segments: Vec<&str> = path.split("::").collect();
            let Some(at) = segments.iter().position(|s| *s == "tests") else {
                continue;
            };
            let module = at.checked_sub(1).map(|i| segments[i]);
            if is_identifier(name) && !defs.defines_under(module, name) {
                broken.push(format!("{doc}:{line}: `{span}`: no such test"));
            }
        }
    }
    broken
}

#[test]
fn documents_name_files_and_tests_that_exist() {
    let defs = Definitions::read(&root());
    let mut broken = check("ARCHITECTURE.md", &defs, true);
    broken.extend(check("README.md", &defs, true));
    broken.extend(check("BENCHMARKS.md", &defs, false));
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn the_checker_finds_what_is_missing() {
    let defs = Definitions::read(&root());
    // Real names resolve, the way the documents write them.
    assert!(defs.defines_in("tests/docs.rs", "the_checker_finds_what_is_missing"));
    assert!(defs.defines_under(Some("docs"), "spans"));
    assert!(!defs.matching("key.rs").is_empty());
    // Misspelt or moved ones do not.
    assert!(!defs.defines_in("tests/docs.rs", "no_such_test_anywhere"));
    assert!(!defs.defines_under(Some("no_such_module"), "spans"));
    assert!(defs.matching("kvstore/src/no_such_file.rs").is_empty());
    // Python tests are `def`s of their file.
    let py = "clients/python/tests/test_unit.py";
    assert!(defs.defines_in(py, "test_a_refusal_says_when_to_retry"));
    assert!(!defs.defines_in(py, "no_such_test_anywhere"));
    // Spans: inline code only, wrapped spans and fenced blocks skipped, lines counted.
    let text = "a `x.rs::f` b\n```\n`y.rs`\n```\n`two\nlines` `z.rs`";
    let got = spans(text);
    assert_eq!(
        got,
        vec![(1, "x.rs::f".to_string()), (6, "z.rs".to_string())]
    );
    assert_eq!(file_reference("x.rs::f"), Some(("x.rs", Some("f"))));
    assert_eq!(file_reference("/v1/openapi.json"), None);
    assert_eq!(file_reference("../shared/a.md"), None);
    assert_eq!(file_reference("kvquilt"), None);
}
