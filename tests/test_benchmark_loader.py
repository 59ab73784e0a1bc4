"""The loader benchmark runs end to end on a small corpus and reports what the issue asks: tokens/s
of loading + packing per corpus, the consumption estimate it is compared with, and the ratio."""

from __future__ import annotations

import argparse

from experiments.benchmarks import loader as bench


def test_loader_benchmark_reports_rates_and_the_estimate(tmp_path):
    args = argparse.Namespace(
        config="configs/pretrain_tiny.py", docs=3000, batches=2, peak_tflops=989.0, mfu=0.5, workdir=str(tmp_path)
    )
    report = bench.run(args)
    est = report["consumption_estimate"]
    assert est["tokens_per_s"] == 989e12 * 0.5 / report["train_flops_per_token"]
    assert set(report["corpora"]) == {"tasks", "long", "mixture"}
    for name, r in report["corpora"].items():
        assert r["packer_tokens_per_s"] > 0 and r["grain_tokens_per_s"] > 0, name
        assert r["ratio"] == min(r["packer_tokens_per_s"], r["grain_tokens_per_s"]) / est["tokens_per_s"]
    assert report["corpora"]["long"]["mean_doc_tokens"] > 10 * report["corpora"]["tasks"]["mean_doc_tokens"]
    assert report["min_ratio"] == min(r["ratio"] for r in report["corpora"].values())
