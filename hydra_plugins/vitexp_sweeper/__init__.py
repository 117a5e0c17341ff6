"""vitexp's Optuna sweeper for Hydra: hydra-optuna-sweeper's own, continuing the study its sweep folder holds.

Hydra imports every module under hydra_plugins when it starts (plugin discovery), so this one imports nothing heavy
at its top; the work is in `vitexp.sweeps`.
"""

from __future__ import annotations

import functools

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class ResumingOptunaSweeper(OptunaSweeper):
    """`hydra/sweeper=optuna` whose study is kept in the sweep folder (optuna_study.json, or the Optuna storage that
    `hydra.sweeper.storage` names) and continues, with its past trials, when the search is run again into it."""

    def sweep(self, arguments: list[str]) -> None:
        import sys
        from pathlib import Path

        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        from vitexp import VitexpError
        from vitexp.sweeps import continue_study

        impl = self.sweeper
        folder = Path(impl.config.hydra.sweep.dir)
        node = impl.config.hydra.sweeper.sampler
        seed = OmegaConf.select(node, "seed")
        fixed = seed is None or isinstance(impl.sampler, functools.partial)  # unseeded, or a grid: nothing to reseed
        try:
            continue_study(impl, arguments, folder, None if fixed else lambda n: instantiate(node, seed=seed + n))
        except VitexpError as e:  # a study refused, or none of its trials completed: one line, as `vitexp.__main__`
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
