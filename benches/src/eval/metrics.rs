//! Scores: SQuAD-normalised token F1 and containment accuracy against gold answers, and
//! agreement with full prefill (first-token KL divergence, identical greedy tokens).

use std::collections::HashMap;

/// Lower-case, punctuation removed, the articles a/an/the removed, spaces collapsed.
pub(crate) fn normalize(s: &str) -> String {
    let lower: String = s
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    lower
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Token F1 of a prediction against one gold answer, both normalised.
pub(crate) fn f1(prediction: &str, gold: &str) -> f64 {
    let (p, g) = (normalize(prediction), normalize(gold));
    let p: Vec<&str> = p.split_whitespace().collect();
    let g: Vec<&str> = g.split_whitespace().collect();
    if p.is_empty() || g.is_empty() {
        return (p.is_empty() && g.is_empty()) as u8 as f64;
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for w in &g {
        *counts.entry(w).or_default() += 1;
    }
    let mut same = 0i64;
    for w in &p {
        if let Some(c) = counts.get_mut(w)
            && *c > 0
        {
            *c -= 1;
            same += 1;
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / p.len() as f64;
    let recall = same as f64 / g.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Best F1 over the gold answers.
pub(crate) fn best_f1(prediction: &str, golds: &[String]) -> f64 {
    golds.iter().map(|g| f1(prediction, g)).fold(0.0, f64::max)
}

/// Whether the normalised prediction contains a normalised gold answer.
pub(crate) fn contains_gold(prediction: &str, golds: &[String]) -> bool {
    let p = normalize(prediction);
    golds.iter().any(|g| {
        let g = normalize(g);
        !g.is_empty() && p.contains(&g)
    })
}

/// KL(P‖Q) in nats between the softmax distributions of two logit rows: P is the
/// reference's (full prefill, full KV), Q the mode's. A token P gives no mass (a logit of
/// −∞) adds nothing; one Q gives none where P gives some makes it +∞; a NaN logit in either
/// row makes it NaN — never a perfect 0 (an average over examples then shows NaN, and the
/// calibration gate's `KL ≤ bound` fails).
pub(crate) fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let log_softmax = |x: &[f32]| -> Vec<f64> {
        let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let z = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
        x.iter().map(|&v| v as f64 - z).collect()
    };
    let (lp, lq) = (log_softmax(p_logits), log_softmax(q_logits));
    let kl = lp
        .iter()
        .zip(&lq)
        .map(|(&a, &b)| {
            // (0 · log 0 = 0, also where P's mass underflows to 0)
            let p = a.exp();
            if p == 0.0 { 0.0 } else { p * (a - b) }
        })
        .sum::<f64>();
    // (rounding leaves an exact match a hair below 0)
    if kl.is_nan() { kl } else { kl.max(0.0) }
}

/// Positional token agreement: the positions where both sequences hold the same token, over
/// the longer one's length (1 for two empty ones). Positions past a first difference count
/// too, and a shorter answer costs the positions it lacks.
pub(crate) fn token_agreement(reference: &[u32], other: &[u32]) -> f64 {
    if reference.is_empty() {
        return other.is_empty() as u8 as f64;
    }
    let same = reference.iter().zip(other).filter(|(a, b)| a == b).count();
    same as f64 / reference.len().max(other.len()) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squad_normalisation_and_f1() {
        assert_eq!(
            normalize("The  Eiffel-Tower, in PARIS!"),
            "eiffeltower in paris"
        );
        assert_eq!(f1("the Paris", "Paris"), 1.0);
        assert!((f1("in Paris France", "Paris") - 0.5).abs() < 1e-12);
        assert_eq!(f1("London", "Paris"), 0.0);
        assert_eq!(best_f1("Paris", &["London".into(), "paris".into()]), 1.0);
        assert!(contains_gold("It is 4521.", &["4521".into()]));
        assert!(!contains_gold("It is 4522.", &["4521".into()]));
    }

    #[test]
    fn kl_and_agreement() {
        let p = [1.0f32, 2.0, 3.0];
        assert!(kl_divergence(&p, &p) < 1e-12);
        assert!(kl_divergence(&p, &[3.0, 2.0, 1.0]) > 0.5);
        assert_eq!(token_agreement(&[1, 2, 3, 4], &[1, 2, 9, 4]), 0.75);
        assert_eq!(token_agreement(&[1, 2], &[1, 2, 3, 4]), 0.5);
        assert_eq!(token_agreement(&[], &[]), 1.0);
        // a token the reference rules out adds nothing; one the mode rules out is +∞; NaN
        // is never a perfect score
        let inf = f32::NEG_INFINITY;
        assert!(kl_divergence(&[1.0, 2.0, inf], &[1.0, 2.0, 0.5]).is_finite());
        assert!(kl_divergence(&[1.0, 2.0, inf], &[1.0, 2.0, inf]) < 1e-12);
        assert_eq!(
            kl_divergence(&[1.0, 2.0, 3.0], &[1.0, 2.0, inf]),
            f64::INFINITY
        );
        assert!(kl_divergence(&p, &[1.0, f32::NAN, 3.0]).is_nan());
        assert!(kl_divergence(&[1.0, f32::NAN, 3.0], &p).is_nan());
    }
}
