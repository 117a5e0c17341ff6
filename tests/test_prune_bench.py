"""The prune-vs-scratch bench without training: its aggregation over seeds, table, plot, the uniform ratio that
reaches a smaller model's MACs, and its one-line errors."""

from __future__ import annotations

import pytest
import torch

from tests.builders import model_of
from tests.conftest import compose_config
from vitexp import VitexpError
from vitexp.bench import prune_vs_scratch
from vitexp.models import count_macs
from vitexp.pruning import apply_layout, uniform_layout


def _row(method, allocation, epochs, acc, seed, speed=100.0):
    return {
        "method": method,
        "allocation": allocation,
        "epochs": epochs,
        "val_acc1": acc,
        "macs": 1_000_000 if method == "dense" else 500_000,
        "shape": "dense" if method == "dense" else allocation,
        "img_per_s_eager_b256": speed,
        "latency_ms_eager": 2.0,
        "speedup_eager_b256": 1.0 if method == "dense" else 2.0,
        "seed": seed,
    }


ROWS = [
    _row("dense", "-", 0, 0.9, 0),
    _row("prune + fine-tune", "uniform", 3, 0.80, 0),
    _row("prune + fine-tune", "global", 3, 0.70, 0),
    _row("dense", "-", 0, 0.9, 1),
    _row("prune + fine-tune", "uniform", 3, 0.84, 1),
    _row("prune + fine-tune", "global", 3, 0.76, 1),
    _row("dense", "-", 0, 0.9, 2),
    _row("prune + fine-tune", "uniform", 3, 0.86, 2),
    _row("prune + fine-tune", "global", 3, 0.73, 2),
]


def test_two_and_three_seeds_aggregate_to_mean_std_and_n():
    summary = prune_vs_scratch.aggregate(ROWS)
    assert [(r["method"], r["allocation"], r["n"]) for r in summary] == [
        ("dense", "-", 3),
        ("prune + fine-tune", "uniform", 3),
        ("prune + fine-tune", "global", 3),
    ]
    uniform, global_ = summary[1], summary[2]
    # by hand: mean (0.80 + 0.84 + 0.86) / 3; deviations -1/30, 1/150, 4/150, squares summing to 0.0056 / 3
    assert uniform["val_acc1"] == pytest.approx(0.25 / 0.3)
    assert uniform["val_acc1_std"] == pytest.approx((0.0056 / 3 / 2) ** 0.5)
    assert global_["val_acc1"] == pytest.approx(0.73) and global_["val_acc1_std"] == pytest.approx(0.03)
    assert summary[0]["val_acc1_std"] == 0.0 and "seed" not in summary[0]
    two = prune_vs_scratch.aggregate([r for r in ROWS if r["seed"] < 2])
    assert two[1]["n"] == 2 and two[1]["val_acc1"] == pytest.approx(0.82)
    assert two[1]["val_acc1_std"] == pytest.approx(0.04 / 2**0.5)
    one = prune_vs_scratch.aggregate(ROWS[:3])
    assert [r["n"] for r in one] == [1, 1, 1] and one[2]["val_acc1_std"] == 0.0


def test_table_and_plot_show_mean_and_std(tmp_path):
    summary = prune_vs_scratch.aggregate(ROWS)
    text = prune_vs_scratch.table(summary)
    assert "| prune + fine-tune | global | 3 | 73.00% ± 3.00% | 3 | 0.5 |" in text
    assert text.splitlines()[0].startswith("| method | allocation | epochs | val top-1 (mean ± std) | n |")
    path = tmp_path / "plots" / "p.png"
    prune_vs_scratch.plot(summary, path, "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ratio_for_macs_is_the_smallest_ratio_under_the_target():
    torch.manual_seed(0)
    wide = model_of(compose_config("data=cifar10", "model.depth=3").model)
    target = count_macs(model_of(compose_config("data=cifar10", "model.depth=2").model))
    ratio = prune_vs_scratch.ratio_for_macs(wide, target, 8)

    def macs(r):
        return count_macs(apply_layout(model_of(compose_config("data=cifar10", "model.depth=3").model), layout(r)))

    def layout(r):
        return uniform_layout(3, 4, 512, r, 8)

    assert 0 < ratio < 1 and macs(ratio) <= target < macs(ratio - 0.001)
    assert prune_vs_scratch.ratio_for_macs(wide, count_macs(wide), 8) == 0.0
    with pytest.raises(VitexpError, match="cannot be pruned to 0.0M MACs; choose a larger target"):
        prune_vs_scratch.ratio_for_macs(wide, 10, 8)


def test_no_seeds_is_a_one_line_error(tmp_path):
    with pytest.raises(VitexpError, match="--seeds 0 must be at least 1"):
        prune_vs_scratch.main(["--seeds", "0", "--out", str(tmp_path)])


def test_the_wide_model_is_pruned_to_the_target_by_global_allocation_when_it_is_measured():
    assert prune_vs_scratch._wide(["uniform", "global"]) == "global"
    assert prune_vs_scratch._wide(["uniform"]) == "uniform"
