"""Pinned numbers: a tiny model trained for a few steps with a fixed seed gives the losses and accuracy written here,
so that a change which shifts every run alike (an init, a default, the order of random draws) is caught."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY, metric_rows, vitexp

# epoch -> (train/loss, val/loss, val/acc1) of `python -m vitexp debug=fast` with SETTINGS, on the digits: a run that
# learns (chance is 0.1), so that a changed weight decay, AdamW beta, schedule or init moves these numbers (weight
# decay 0 moves epoch 1's train/loss by 1.5e-4 and ends at 0.69; betas (0.9, 0.99) end at 0.79)
PINNED = {
    1: (2.308075294066011, 2.1932867765426636, 0.1328125),
    2: (2.196736882241924, 2.0954500436782837, 0.1953125),
    3: (1.9814682864071278, 1.8676816821098328, 0.359375),
    4: (1.7799351724346033, 1.5997253060340881, 0.4453125),
    5: (1.536701159530811, 1.343650460243225, 0.5390625),
    6: (1.2761755954013783, 1.0030223429203033, 0.7265625),
    7: (1.1158059795251054, 0.7886767983436584, 0.8046875),
    8: (0.9653312597381934, 0.692447304725647, 0.8359375),
    9: (0.9349780993515187, 0.6480159759521484, 0.8515625),
    10: (0.8331674297204178, 0.6433305740356445, 0.859375),
}
# fp32 on every machine (bf16 autocast would depend on the CPU's support for it)
SETTINGS = (
    "trainer.precision=32",
    "seed=0",
    "trainer.max_epochs=10",
    "trainer.limit_train_batches=null",
    "optim.lr=2e-3",
    "optim.warmup_epochs=1",
)
LOSS_RTOL = 1e-4
ONE_IMAGE = 1 / 128  # of the 128 validation images (debug=fast: 2 batches of 64)


def test_tiny_run_gives_the_pinned_numbers(tmp_path):
    run = tmp_path / "run"
    vitexp(*TINY, *SETTINGS, f"hydra.run.dir={run}", cwd=tmp_path)
    rows = metric_rows(run / "metrics.csv")
    got = {int(r["epoch"]): (float(r["train/loss"]), float(r["val/loss"]), float(r["val/acc1"])) for r in rows}
    assert got.keys() == PINNED.keys()
    for epoch, (train_loss, val_loss, acc1) in PINNED.items():
        assert got[epoch][0] == pytest.approx(train_loss, rel=LOSS_RTOL), f"epoch {epoch} train/loss"
        assert got[epoch][1] == pytest.approx(val_loss, rel=LOSS_RTOL), f"epoch {epoch} val/loss"
        assert got[epoch][2] == pytest.approx(acc1, abs=ONE_IMAGE), f"epoch {epoch} val/acc1"
    assert got[max(PINNED)][2] >= 0.8  # it learns, whatever the pinned numbers say
    results = json.loads((run / "results.json").read_text())
    assert results["best_val_acc1"] == pytest.approx(max(a for _, _, a in PINNED.values()), abs=ONE_IMAGE)


@pytest.mark.slow
def test_the_default_recipe_beats_chance_by_a_wide_margin_on_the_digits(tmp_path):
    """`python -m vitexp` as shipped (the baseline ViT, AdamW, warmup and cosine, the digits), 3 of its 30 epochs:
    0.336 of the 360 validation images here (2-core x86-64 CPU, bf16); chance is 0.1 (binomial std 0.016)."""
    vitexp("trainer.device=cpu", "logger=none", "trainer.max_epochs=3", "hydra.run.dir=run", cwd=tmp_path)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["val_images"] == 360 and results["best_val_acc1"] >= 0.25
