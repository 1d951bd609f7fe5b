//! Keys are the same in separate processes (no per-process seeds anywhere).

mod common;

use kvquilt_kvstore::KvDType;

fn keys_here() -> Vec<String> {
    let l = common::layout(KvDType::BF16, 30);
    let c = common::context(&l);
    vec![
        c.chunk_key(&[504, 3575, 282, 4649, 314]).to_hex(),
        c.prefix_chain(&(0..1000).collect::<Vec<u32>>(), 256)
            .last()
            .unwrap()
            .to_hex(),
        kvquilt_kvstore::Fingerprint::new()
            .field("weights", b"abc")
            .finish()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    ]
}

#[test]
fn same_keys_in_two_processes() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "print_keys_child",
            "--nocapture",
            "--include-ignored",
        ])
        .env("KVQ_PRINT_KEYS", "1")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let theirs: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("KEY "))
        .collect();
    let ours = keys_here();
    assert_eq!(theirs, ours.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
#[ignore = "runs only as the child of same_keys_in_two_processes"]
fn print_keys_child() {
    if std::env::var_os("KVQ_PRINT_KEYS").is_none() {
        return;
    }
    for k in keys_here() {
        println!("KEY {k}");
    }
}
