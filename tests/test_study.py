"""Studies on tiny synthetic data: outputs written, correlations and crossings computed correctly."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_prune.study.__main__ import main
from lightning_prune.study.curve import crossing
from lightning_prune.study.stats import average_ranks, kendall, pearson, spearman


def test_correlation_measures():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert spearman(a, a.exp()) == pytest.approx(1.0)
    assert kendall(a, -a) == pytest.approx(-1.0)
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0])).tolist() == [2.5, 1.0, 2.5]
    # tau-b with ties: x = [1, 2, 2, 3], y = [1, 3, 2, 4]: 5 concordant, 0 discordant, one tie in x
    x, y = torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])
    assert kendall(x, y) == pytest.approx(5 / (5 * 6) ** 0.5)


def test_crossing_interpolates_the_threshold():
    assert crossing([0, 2, 4], [0.5, 0.8, 1.2], 1.0) == pytest.approx(3.0)
    assert crossing([0, 2], [0.5, 0.6], 1.0) is None
    assert crossing([0, 2], [1.5, 2.0], 1.0) == 0.0


def test_correlation_study_writes_json_markdown_and_png(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_PRUNE_STUDY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "corr"
    report = main(["correlation", "model=tiny", "dataset=synthetic", "images=32", "batch_size=16", f"out_dir={out}",
                   "criteria=[taylor_fo_bn,taylor_fo_weight,taylor_so,obd,apoz,taylor_fo_sq_random,random]",
                   "hessian_samples=2"])  # fmt: skip
    for suffix in ("json", "md", "png"):
        assert (out / f"correlation.{suffix}").stat().st_size > 0
    saved = json.loads((out / "correlation.json").read_text())
    assert saved["neurons"] == report["neurons"] == 12
    # Spearman over n neurons is 1 - 6 sum(d^2) / (n^3 - n): a multiple of 1/286 over all 12 neurons, of 1/35
    # over the 6 of a layer. The seeded data, network and Hutchinson vectors fix the ranks: the closest two
    # scores of a criterion or of the oracle differ by more than 1e-4 of the largest, far above rounding.
    expected = {  # label: spearman over all layers, over bn1, over bn2
        "taylor_fo_bn": (210 / 286, 21 / 35, 29 / 35),
        "taylor_so": (80 / 286, -13 / 35, 23 / 35),
        "obd": (-112 / 286, -5 / 35, -15 / 35),
        "random": (114 / 286, 27 / 35, -3 / 35),
    }
    for label, (all_layers, bn1, bn2) in expected.items():
        r = saved["results"][label]["squared_oracle"]
        assert set(r["per_layer"]) == {"bn1", "bn2"}
        got = (r["all_layers"]["spearman"], r["per_layer"]["bn1"]["spearman"], r["per_layer"]["bn2"]["spearman"])
        assert got == pytest.approx((all_layers, bn1, bn2), abs=1e-9), label
    assert "| taylor_so |" in (out / "correlation.md").read_text()
    assert list((tmp_path / "cache").glob("oracle-*.pt"))  # the oracle is cached


def test_curve_study_writes_json_markdown_and_png(tmp_path):
    out = tmp_path / "curve"
    report = main(["curve", "model=tiny", "dataset=synthetic", "images=16", "pool_images=32", "loss_images=32",
                   "test_images=32", "batch_size=16", "seeds=[0,1]", "step=4", "loss_threshold=1.39",
                   "criteria=[oracle,taylor_fo_bn-fixed,random,{label: sq_random_n4, criterion: taylor_fo_sq, "
                   "kwargs: {gradient: random, normalize_gradient: true}, images: 4, fixed: true}]",
                   f"out_dir={out}"])  # fmt: skip
    for suffix in ("json", "md", "png"):
        assert (out / f"curve.{suffix}").stat().st_size > 0
    assert set(report["summary"]) == {"oracle", "taylor_fo_bn-fixed", "random", "sq_random_n4"}
    for label, runs in report["curves"].items():
        assert len(runs) == 2
        for run in runs:
            assert run["pruned"][0] == 0 and run["pruned"] == sorted(run["pruned"])
            assert run["pruned"][-1] <= 11 and len(run["loss"]) == len(run["accuracy"]) == len(run["pruned"])
    assert "| oracle |" in (out / "curve.md").read_text()


def test_layer_study_compares_criteria_with_combinatorial_and_greedy_oracles(tmp_path):
    out = tmp_path / "layer"
    report = main(["layer", "model=tiny", "dataset=synthetic", "images=16", "batch_size=16", "layer=bn1", "max_k=2",
                   "criteria=[taylor_fo_bn,random]", f"out_dir={out}"])  # fmt: skip
    for suffix in ("json", "md", "png"):
        assert (out / f"layer.{suffix}").stat().st_size > 0
    curves = report["curves"]
    best, greedy = curves["combinatorial oracle"], curves["greedy oracle"]
    assert greedy["k"] == list(range(6))
    for k in (1, 2):  # no choice of k neurons beats the combinatorial oracle
        for label in ("greedy oracle", "taylor_fo_bn", "random"):
            assert best["loss"][k] <= curves[label]["loss"][k] + 1e-6
    assert greedy["loss"][1] == pytest.approx(best["loss"][1], abs=1e-6)
