"""Compares the DSL benchmark runs with the dense one and checks the targets of issue 3.

    python benchmarks/dsl_vs_dense.py   # after `make benchmark benchmark-dsl`

Reads benchmarks/results/mf_gowalla_{dense,dsl_d0.2,dsl_d0.1}.json, prints a table and writes
benchmarks/results/dsl_vs_dense_gowalla.json.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    dense = json.loads((RESULTS / "mf_gowalla_dense.json").read_text())
    rows = []
    for density in ("0.2", "0.1"):
        dsl = json.loads((RESULTS / f"mf_gowalla_dsl_d{density}.json").read_text())
        recall_ratio = dsl["final_metrics"]["recall@20"] / dense["final_metrics"]["recall@20"]
        throughput_ratio = (dsl["train_samples_per_s_between_updates"] /
                            dense["train_samples_per_s"])
        rows.append({
            "density": float(density),
            "recall@20": dsl["final_metrics"]["recall@20"],
            "ndcg@20": dsl["final_metrics"]["ndcg@20"],
            "recall_vs_dense": recall_ratio,
            "throughput_between_updates_vs_dense": throughput_ratio,
            "update_time_fraction": dsl["update_time_fraction"],
            "updates": dsl["updates"],
            "peak_rss_mb_per_rank": dsl["peak_rss_mb_per_rank"],
            "final_density": dsl["final_density"],
            "targets": {"recall_within_3pct": recall_ratio >= 0.97,
                        "throughput_at_least_0.95": throughput_ratio >= 0.95,
                        "updates_at_most_3pct": dsl["update_time_fraction"] <= 0.03},
        })
    summary = {"dense": {"recall@20": dense["final_metrics"]["recall@20"],
                         "ndcg@20": dense["final_metrics"]["ndcg@20"],
                         "train_samples_per_s": dense["train_samples_per_s"],
                         "peak_rss_mb_per_rank": dense["peak_rss_mb_per_rank"]},
               "dsl": rows}
    print(f"dense: Recall@20 {dense['final_metrics']['recall@20']:.4f}, "
          f"{dense['train_samples_per_s']:,.0f} samples/s")
    for r in rows:
        print(f"DSL d={r['density']}: Recall@20 {r['recall@20']:.4f} "
              f"({r['recall_vs_dense']:.1%} of dense), throughput between updates "
              f"{r['throughput_between_updates_vs_dense']:.1%} of dense, updates "
              f"{r['update_time_fraction']:.1%} of training time; targets {r['targets']}")
    out = RESULTS / "dsl_vs_dense_gowalla.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
