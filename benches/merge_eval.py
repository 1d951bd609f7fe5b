#!/usr/bin/env python3
"""Merge `kvquilt eval --json` reports of one evaluation split with `--skip/--limit`.

Rows are recomputed from the per-example details exactly as `kvquilt eval` computes them
(means of F1, accuracy, first-token KL, answer agreement and recompute fraction; the median
of TTFT; ratios against `full`), and printed as the same Markdown table. Every part must be
of the same task, model and device, and no example may appear twice.

    python3 benches/merge_eval.py part1.json part2.json ... [--json merged.json]
"""

import argparse
import json
import statistics
import sys


def label_key(detail):
    return detail["config"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+")
    ap.add_argument("--json", help="write the merged report here")
    args = ap.parse_args()

    reports = []
    for path in args.parts:
        with open(path) as f:
            reports.append(json.load(f))
    first = reports[0]
    for r in reports[1:]:
        for field in ("task", "model", "device", "chunk_encoding"):
            if r.get(field) != first.get(field):
                sys.exit(f"parts differ in {field}: {first[field]!r} vs {r[field]!r}")
        def configs(rep):
            return [(x["mode"], x.get("codec", "raw"), x["variant"], x["ratio"]) for x in rep["rows"]]

        if configs(r) != configs(first):
            sys.exit("parts evaluated different configurations")

    details = [d for r in reports for d in r["details"]]
    seen = set()
    for d in details:
        key = (d["example"], d["config"])
        if key in seen:
            sys.exit(f"example {d['example']} appears twice for {d['config']}")
        seen.add(key)
    for d in details:
        if "first_token_kl" not in d:
            sys.exit("a part lacks per-example KL (made by an older kvquilt)")

    by_config = {}
    for d in details:
        by_config.setdefault(label_key(d), []).append(d)
    examples = len({d["example"] for d in details})

    def stats(ds):
        return {
            "f1": statistics.fmean(d["f1"] for d in ds),
            "acc": statistics.fmean(1.0 if d["correct"] else 0.0 for d in ds),
            # (a NaN KL is written as JSON's null: it stays NaN here)
            "kl": statistics.fmean(nan_if_none(d["first_token_kl"]) for d in ds),
            "agree": statistics.fmean(d["answer_token_agreement"] for d in ds),
            "ttft": statistics.median(d["ttft_ms"] for d in ds),
            "recompute": statistics.fmean(d["recompute_fraction"] for d in ds),
            # a codec row's agreement with the same configuration read raw (parts written
            # before these fields existed lack them: no column then, not a wrong one)
            "kl_vs_raw": mean_or_none([optional_metric(d, "kl_vs_raw") for d in ds]),
            "agree_vs_raw": mean_or_none([optional_metric(d, "agreement_vs_raw") for d in ds]),
        }

    full = stats(by_config["full"])
    rows = []
    for row in first["rows"]:
        mode, variant, ratio = row["mode"], row["variant"], row["ratio"]
        codec = row.get("codec", "raw")
        label = mode if variant is None else f"{mode} {variant} r={fmt_ratio(ratio)}"
        if codec != "raw":
            label = f"{label} [{codec}]"
        ds = by_config.get(label)
        if ds is None or len(ds) != examples:
            sys.exit(f"{label}: {0 if ds is None else len(ds)} of {examples} examples")
        s = stats(ds)
        rows.append(
            {
                "mode": mode,
                "codec": codec,
                "variant": variant,
                "ratio": ratio,
                "f1": s["f1"],
                "f1_vs_full": s["f1"] / full["f1"] if full["f1"] > 0 else None,
                "acc": s["acc"],
                "acc_vs_full": s["acc"] / full["acc"] if full["acc"] > 0 else None,
                "first_token_kl": s["kl"],
                "answer_token_agreement": s["agree"],
                "ttft_ms_median": s["ttft"],
                "ttft_speedup_vs_full": full["ttft"] / s["ttft"],
                "recompute_fraction": s["recompute"],
                "kl_vs_raw": s["kl_vs_raw"],
                "agreement_vs_raw": s["agree_vs_raw"],
            }
        )

    print(f"{first['task']} task, {examples} examples, model {first['model']}, device {first['device']}")
    print(
        "| mode | codec | variant | ratio | F1 | F1/full | acc | acc/full | first-token KL "
        "| answer agreement | TTFT median ms | speed-up | recomputed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    opt = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    for r in rows:
        print(
            f"| {r['mode']} | {r['codec']} | {r['variant'] or '–'} | "
            f"{'–' if r['ratio'] is None else fmt_ratio(r['ratio'])} | {r['f1']:.3f} | "
            f"{opt(r['f1_vs_full'])} | {r['acc']:.3f} | {opt(r['acc_vs_full'])} | "
            f"{r['first_token_kl']:.3f} | {r['answer_token_agreement']:.2f} | "
            f"{r['ttft_ms_median']:.0f} | {r['ttft_speedup_vs_full']:.1f}× | "
            f"{r['recompute_fraction']:.3f} |"
        )
    against_raw = [r for r in rows if r["kl_vs_raw"] is not None]
    if against_raw:
        print()
        print("| mode | codec | variant | ratio | KL vs raw | agreement vs raw |")
        print("|---|---|---|---|---|---|")
        for r in against_raw:
            print(
                f"| {r['mode']} | {r['codec']} | {r['variant'] or '–'} | "
                f"{'–' if r['ratio'] is None else fmt_ratio(r['ratio'])} | "
                f"{r['kl_vs_raw']:.4f} | {r['agreement_vs_raw']:.2f} |"
            )
    if args.json:
        merged = dict(first, examples=examples, rows=rows, details=details)
        merged.pop("prompt_tokens_median", None)
        with open(args.json, "w") as f:
            json.dump(merged, f, indent=2)


def nan_if_none(x):
    """A metric as written: JSON's null (a NaN) read back as NaN."""
    return float("nan") if x is None else x


def optional_metric(d, name):
    """An optional metric of a detail: None when absent, NaN when written as null."""
    return nan_if_none(d[name]) if name in d else None


def mean_or_none(xs):
    """The mean of `xs`, or None when any part lacks them; a NaN one (null) stays NaN."""
    return None if not xs or any(x is None for x in xs) else statistics.fmean(xs)


def fmt_ratio(r):
    """The ratio as Rust's `f32` Display writes it (0.15, 0.3, 1)."""
    return f"{r:g}"


if __name__ == "__main__":
    main()
