"""Pinned numbers: a tiny model trained for a few steps with a fixed seed gives the losses and accuracy written here,
so that a change which shifts every run alike (an init, a default, the order of random draws) is caught."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY, metric_rows, vitexp

# epoch -> (train/loss, val/loss, val/acc1) of `python -m vitexp debug=fast` with SETTINGS, on the digits
PINNED = {
    1: (2.336652374267578, 2.3585010766983032, 0.1484375),
    2: (2.306366539001465, 2.3431336879730225, 0.109375),
    3: (2.2712274551391602, 2.344508409500122, 0.109375),
}
SETTINGS = (
    "trainer.precision=32",
    "seed=0",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=20",
    "optim.lr=2e-3",
    "optim.warmup_epochs=0",
)
# fp32 kernels differ in the last bits between CPU instruction sets; a shifted run differs by far more
LOSS_RTOL = 1e-3
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
    results = json.loads((run / "results.json").read_text())
    assert results["best_val_acc1"] == pytest.approx(max(a for _, _, a in PINNED.values()), abs=ONE_IMAGE)
