//! The Python side against the real server: the official `openai` package with
//! `documents`, and a LangChain chain (real `langchain-core`) that retrieves, warms and
//! answers (clients/python/tests, run with pytest in the venv of scripts/client-venv.sh); and
//! the package installs with pip from its pyproject.

mod common;

use std::process::Command;

use common::{Server, repo_root};

#[test]
fn openai_package_and_langchain_chain_end_to_end() {
    let root = repo_root();
    let venv = Command::new(root.join("scripts/client-venv.sh"))
        .output()
        .expect("running scripts/client-venv.sh");
    assert!(
        venv.status.success(),
        "setting up the client venv (PyPI):\n{}",
        String::from_utf8_lossy(&venv.stderr)
    );
    let python = String::from_utf8(venv.stdout).unwrap().trim().to_string();
    let dir = tempfile::tempdir().unwrap();

    // the package installs from its pyproject (built from a copy: no build files in the clone)
    let copy = dir.path().join("pkg");
    let cp = Command::new("cp")
        .arg("-r")
        .arg(root.join("clients/python"))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(cp.success());
    let site = dir.path().join("site");
    let install = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
        ])
        .arg(&site)
        .arg(&copy)
        .output()
        .expect("pip install");
    assert!(
        install.status.success(),
        "pip install clients/python:\n{}",
        String::from_utf8_lossy(&install.stderr)
    );
    let import = Command::new(&python)
        .args([
            "-c",
            "import kvquilt, kvquilt.langchain; print(kvquilt.__file__)",
        ])
        .env("PYTHONPATH", &site)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );
    assert!(String::from_utf8_lossy(&import.stdout).contains("site"));

    let token = "python-test-token";
    let server = Server::start(&dir.path().join("data"), &["--api-token", token]);
    let out = Command::new(&python)
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "clients/python/tests",
        ])
        .current_dir(&root)
        .env("PYTHONPATH", root.join("clients/python"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("KVQUILT_URL", &server.url)
        .env("KVQUILT_TOKEN", token)
        .output()
        .expect("running pytest");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pytest failed:\n{report}");
    // every test ran, none skipped (the end-to-end module skips itself without KVQUILT_URL)
    assert!(
        report.lines().any(|l| l.starts_with("46 passed")) && !report.contains("skipped"),
        "{report}"
    );
}
