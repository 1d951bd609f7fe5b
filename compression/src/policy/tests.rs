//! Hand-computed cases for every policy, the budget rules and the text form.

use super::*;

fn shape(tokens: usize, kv_heads: usize, group: usize, layers: usize) -> Shape {
    Shape {
        tokens,
        kv_heads,
        group,
        layers,
    }
}

/// An observation of the mean over the last `rows` rows.
fn rows_obs(probs: Vec<f32>, rows: usize) -> Observation {
    Observation {
        windows: vec![WindowMean {
            rows,
            probs,
            max: None,
        }],
        column_sums: None,
    }
}

fn keep(
    p: &dyn TokenPolicy,
    obs: Observation,
    s: Shape,
    b: Budget,
) -> Result<Vec<Vec<u32>>, PolicyError> {
    Ok(select(p, &[obs], &s, b, &BudgetSplit::Uniform)?
        .layers
        .remove(0))
}

#[test]
fn streaming_keeps_sinks_and_the_most_recent() {
    let p = StreamingLlm::with_sinks(2);
    let k = keep(
        &p,
        Observation::default(),
        shape(10, 2, 1, 1),
        Budget::Compression(2.0),
    );
    assert_eq!(k.unwrap(), vec![vec![0, 1, 7, 8, 9]; 2]);
}

#[test]
fn sage_takes_the_last_rows_attention_mean_over_the_group() {
    let p = SageKv {
        sinks: 1,
        recent: 2,
    };
    // one KV head, two query heads, the last row only
    let q0 = [0.1, 0.0, 0.3, 0.0, 0.2, 0.1, 0.2, 0.1];
    let q1 = [0.1, 0.2, 0.1, 0.0, 0.4, 0.0, 0.1, 0.1];
    let probs = q0.iter().chain(&q1).copied().collect();
    // mean over the group of rows 1..6: .1 .2 0 .3 .05 → top two are 4 and 2
    let k = keep(
        &p,
        rows_obs(probs, 1),
        shape(8, 1, 2, 1),
        Budget::Entries(5),
    );
    assert_eq!(k.unwrap(), vec![vec![0, 2, 4, 6, 7]]);
}

#[test]
fn snapkv_averages_the_window_then_pools() {
    // rows (.1 .5 .1 .1 .2 0) and (.3 .1 .1 .2 .2 .1): their mean
    let probs = vec![0.2, 0.3, 0.1, 0.15, 0.2, 0.05];
    let s = shape(6, 1, 1, 1);
    // window mean over keys 0..4: .2 .3 .1 .15
    let plain = SnapKv {
        window: 2,
        kernel: 1,
        pooling: Pooling::Avg,
        ..SnapKv::default()
    };
    let k = keep(&plain, rows_obs(probs.clone(), 2), s, Budget::Entries(4));
    assert_eq!(k.unwrap(), vec![vec![0, 1, 4, 5]]);
    // avg-pooled over 3 (zero padding counts): .167 .2 .183 .083 → 1 and 2
    let pooled = SnapKv { kernel: 3, ..plain };
    let k = keep(&pooled, rows_obs(probs, 2), s, Budget::Entries(4));
    assert_eq!(k.unwrap(), vec![vec![1, 2, 4, 5]]);
}

#[test]
fn h2o_normalises_by_the_queries_that_see_each_token() {
    let sums = vec![1.2, 1.0, 0.9, 0.9, 0.1, 0.1];
    let obs = Observation {
        windows: Vec::new(),
        column_sums: Some(sums),
    };
    let s = shape(6, 1, 1, 1);
    // normalised: 1.2/6 1.0/5 .9/4 .9/3 → 3 and 2, plus the recent half {4, 5}
    let k = keep(&H2o::default(), obs.clone(), s, Budget::Entries(4));
    assert_eq!(k.unwrap(), vec![vec![2, 3, 4, 5]]);
    let raw = H2o {
        normalise: false,
        ..H2o::default()
    };
    assert_eq!(
        keep(&raw, obs, s, Budget::Entries(4)).unwrap(),
        vec![vec![0, 1, 4, 5]]
    );
}

#[test]
fn a_window_wider_than_any_cache_keeps_everything() {
    // `t + recent` once wrapped for a window near `usize::MAX`: the regions counted ~1 row
    // and a budget far below them was applied instead of refused
    for recent in [usize::MAX, usize::MAX - 3, 1 << 63] {
        let r = Regions {
            sinks: 0,
            recent,
            protected: Vec::new(),
        };
        assert_eq!(r.count(100), 100, "recent {recent}");
        assert!(r.contains(0, 100) && r.contains(99, 100));
    }
    let huge = SageKv {
        recent: usize::MAX,
        ..SageKv::default()
    };
    let obs = rows_obs(vec![0.01; 100], 1);
    let e = keep(&huge, obs, shape(100, 1, 1, 1), Budget::Entries(6)).unwrap_err();
    assert!(
        matches!(
            e,
            PolicyError::BudgetTooSmall {
                budget: 6,
                needed: 100,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_budget_below_the_kept_regions_is_an_error_naming_the_limit() {
    let p = SageKv::default();
    let obs = rows_obs(vec![0.01; 100], 1);
    let e = keep(&p, obs, shape(100, 1, 1, 1), Budget::Compression(2.0)).unwrap_err();
    assert!(
        matches!(
            &e,
            PolicyError::BudgetTooSmall {
                budget: 50,
                needed: 68,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("(4 sinks + 64 recent, of a cache of 100)"),
        "{e}"
    );
    for bad in [1.0, 0.5, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            Budget::Compression(bad).validate(),
            Err(PolicyError::BadCompression(_))
        ));
    }
    // a cache no longer than the budget keeps everything, regions or not
    let short = keep(
        &p,
        rows_obs(vec![0.1; 10], 1),
        shape(10, 1, 1, 1),
        Budget::Entries(10),
    );
    assert_eq!(short.unwrap(), vec![(0..10).collect::<Vec<u32>>()]);
}

#[test]
fn missing_or_misshaped_observations_are_errors() {
    let s = shape(6, 1, 1, 1);
    let snap = SnapKv {
        window: 2,
        ..SnapKv::default()
    };
    let e = keep(&snap, Observation::default(), s, Budget::Entries(3));
    assert!(matches!(e, Err(PolicyError::BadObservation { .. })));
    let sage = SageKv {
        sinks: 1,
        recent: 1,
    };
    let e = keep(&sage, rows_obs(vec![0.1; 5], 1), s, Budget::Entries(3));
    assert!(matches!(e, Err(PolicyError::BadObservation { .. })));
    // a window of another size than the policy's
    let e = keep(&snap, rows_obs(vec![0.1; 6], 3), s, Budget::Entries(3));
    assert!(matches!(e, Err(PolicyError::BadObservation { .. })));
    let two_layers = select(
        &StreamingLlm::with_sinks(1),
        &[Observation::default()],
        &shape(6, 1, 1, 2),
        Budget::Entries(3),
        &BudgetSplit::Uniform,
    );
    assert!(matches!(
        two_layers,
        Err(PolicyError::BadObservation { .. })
    ));
}

#[test]
fn per_head_budgets_follow_scores_across_heads_above_a_floor() {
    // head 0 has every high score; with a floor of half the budget head 1 keeps 2 of 4
    let s0 = [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0];
    let s1 = [0.5, 0.1, 0.4, 0.1, 0.3, 0.1, 0.2, 0.1];
    let sums = s0.iter().chain(&s1).copied().collect();
    let obs = Observation {
        windows: Vec::new(),
        column_sums: Some(sums),
    };
    let raw = H2o {
        normalise: false,
        recent_fraction: 0.0,
    };
    // recent = max(1, 0) = 1 row always kept per head
    let set = select(
        &raw,
        &[obs],
        &shape(8, 2, 1, 1),
        Budget::Entries(4),
        &BudgetSplit::PerHead { floor: 0.5 },
    )
    .unwrap();
    assert_eq!(set.layers[0][0], vec![0, 1, 2, 3, 4, 7]);
    assert_eq!(set.layers[0][1], vec![0, 7]);
    assert_eq!(set.entries(), 8);
    assert_eq!(set.max_per_head(), 6);
}

#[test]
fn per_layer_weights_scale_each_layers_budget() {
    let set = select(
        &StreamingLlm::with_sinks(0),
        &[Observation::default(), Observation::default()],
        &shape(10, 1, 1, 2),
        Budget::Entries(3),
        &BudgetSplit::PerLayer(vec![1.0, 2.0]),
    )
    .unwrap();
    assert_eq!(set.layers[0][0], vec![8, 9]);
    assert_eq!(set.layers[1][0], vec![6, 7, 8, 9]);
    let bad = select(
        &StreamingLlm::default(),
        &[Observation::default()],
        &shape(10, 1, 1, 1),
        Budget::Entries(3),
        &BudgetSplit::PerLayer(vec![f32::NAN]),
    );
    assert!(matches!(bad, Err(PolicyError::BadParameter { .. })));
}

/// EpiCache's `pair` split over per-layer budgets: each layer's budget from its weight, then
/// chosen across that layer's heads by score.
#[test]
fn per_layer_budgets_split_across_heads_together() {
    let s0 = [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0];
    let s1 = [0.5, 0.1, 0.4, 0.1, 0.3, 0.1, 0.2, 0.1];
    let sums: Vec<f32> = s0.iter().chain(&s1).copied().collect();
    let obs = Observation {
        windows: Vec::new(),
        column_sums: Some(sums),
    };
    let raw = H2o {
        normalise: false,
        recent_fraction: 0.0,
    };
    let split = BudgetSplit::Uniform.with_layer_weights(vec![1.0, 3.0]);
    assert_eq!(split, BudgetSplit::PerLayer(vec![1.0, 3.0]));
    let split = BudgetSplit::PerHead { floor: 0.0 }.with_layer_weights(vec![1.0, 3.0]);
    let set = select(
        &raw,
        &[obs.clone(), obs],
        &shape(8, 2, 1, 2),
        Budget::Entries(2),
        &split,
    )
    .unwrap();
    // 2 per head over 2 layers = 4 per head: layer 0 gets 1 (2 entries), layer 1 gets 3
    // (6 entries); every head keeps its last row (H2O's recent 1), the rest go to head 0
    assert_eq!(set.layers[0], vec![vec![7], vec![7]]);
    assert_eq!(set.layers[1], vec![vec![0, 1, 2, 3, 7], vec![7]]);
    let bad = BudgetSplit::PerLayerAndHead {
        weights: vec![1.0, 1.0],
        floor: 1.5,
    };
    assert!(check_budget(&raw, &shape(8, 2, 1, 2), Budget::Entries(2), &bad).is_err());
}

#[test]
fn specs_parse_print_and_reject_what_they_do_not_know() {
    for text in [
        "full",
        "streaming:sinks=4",
        "streaming:sinks=2:positions=compact",
        "h2o:recent=0.5:normalise=true",
        "snapkv:window=32:kernel=7:pool=max:group=mean",
        "snapkv:window=8:kernel=7:pool=max:group=max",
        "sage:sinks=4:recent=64",
    ] {
        let spec: PolicySpec = text.parse().unwrap();
        assert_eq!(spec.to_string(), text);
        assert_eq!(spec.to_string().parse::<PolicySpec>().unwrap(), spec);
    }
    assert_eq!("snapkv".parse::<PolicySpec>().unwrap().name(), "snapkv");
    assert_eq!(
        "streaming:positions=original".parse::<PolicySpec>(),
        "streaming:sinks=4".parse::<PolicySpec>()
    );
    assert!(matches!(
        "pyramid".parse::<PolicySpec>(),
        Err(PolicyError::UnknownPolicy(_))
    ));
    for bad in [
        "snapkv:kernel=4",
        "snapkv:kernel=129",
        "snapkv:window=0",
        "snapkv:pool=median",
        "snapkv:group=sum",
        "sage:window=3",
        "h2o:recent=1.5",
        "streaming:sinks=-1",
        "streaming:sinks",
        "streaming:positions=shifted",
        "snapkv:positions=compact",
    ] {
        let e = bad.parse::<PolicySpec>().unwrap_err();
        assert!(matches!(e, PolicyError::BadParameter { .. }), "{bad}: {e}");
    }
}

/// Layers are selected on several threads: the keep set is each layer's own selection in
/// layer order, and the error is the first failing layer's, as one thread would report.
#[test]
fn many_layers_select_as_each_alone_and_the_first_failure_is_reported() {
    let (tokens, heads, group, layers) = (40, 2, 2, 37);
    let s = shape(tokens, heads, group, layers);
    let snap = SnapKv {
        window: 4,
        ..SnapKv::default()
    };
    let obs: Vec<Observation> = (0..layers)
        .map(|l| {
            let probs = (0..heads * group * tokens)
                .map(|i| ((i * 7919 + l * 104_729) % 1000) as f32 / 1000.0)
                .collect();
            rows_obs(probs, 4)
        })
        .collect();
    let all = select(&snap, &obs, &s, Budget::Entries(12), &BudgetSplit::Uniform).unwrap();
    assert_eq!(all.layers.len(), layers);
    for (l, o) in obs.iter().enumerate() {
        let alone = keep(
            &snap,
            o.clone(),
            shape(tokens, heads, group, 1),
            Budget::Entries(12),
        );
        assert_eq!(all.layers[l], alone.unwrap(), "layer {l}");
    }
    assert!(all.layers.windows(2).any(|w| w[0] != w[1]), "layers differ");
    // layers 20 and 30 are misshaped: the error names layer 20
    let mut bad = obs;
    bad[30] = rows_obs(vec![0.1; 3], 4);
    bad[20] = rows_obs(vec![0.1; 5], 4);
    match select(&snap, &bad, &s, Budget::Entries(12), &BudgetSplit::Uniform) {
        Err(PolicyError::BadObservation { layer, .. }) => assert_eq!(layer, 20),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_empty_cache_keeps_nothing_and_never_panics() {
    // a zero-token shape once panicked in `clamp(1, 0)` (layer budgets) and `chunks(0)` (H2O)
    let s = shape(0, 2, 1, 1);
    let layers = BudgetSplit::PerLayer(vec![1.0]);
    let kept = select(
        &StreamingLlm::default(),
        &[Observation::default()],
        &s,
        Budget::Entries(1),
        &layers,
    )
    .unwrap();
    assert_eq!(kept.layers, vec![vec![Vec::<u32>::new(); 2]]);
    let sums = Observation {
        column_sums: Some(Vec::new()),
        ..Observation::default()
    };
    let kept = select(
        &H2o::default(),
        &[sums],
        &s,
        Budget::Entries(1),
        &BudgetSplit::Uniform,
    )
    .unwrap();
    assert_eq!(kept.layers, vec![vec![Vec::<u32>::new(); 2]]);
}
