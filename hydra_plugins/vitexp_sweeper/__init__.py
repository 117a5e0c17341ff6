"""vitexp's Optuna sweeper for Hydra (`hparams_search=optuna`): trials asked from a study in Optuna's storage, which
several workers share and a search run again continues; the study's side is `vitexp.search`.

Hydra imports every module under hydra_plugins when it starts (plugin discovery), so this one imports nothing heavy
at its top."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper

log = logging.getLogger("vitexp")


class OptunaSweeper(Sweeper):
    """Run `n_trials` trials of the study `study_name` in `storage` (default: a journal file in the sweep folder),
    sampled by `sampler` from `params`, stopped early by `pruner` (None: never); trial N runs in job folder N."""

    def __init__(
        self,
        sampler: Any,
        direction: Any,
        study_name: str,
        storage: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: Any,
        pruner: Any = None,
    ) -> None:
        self.sampler_config, self.direction, self.study_name, self.storage_url = sampler, direction, study_name, storage
        self.n_trials, self.n_jobs, self.max_failure_rate, self.params = n_trials, n_jobs, max_failure_rate, params
        self.pruner = pruner
        self.own_threads = "OMP_NUM_THREADS" in os.environ

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        import sys

        from vitexp import VitexpError

        try:
            self._search(arguments)
        except VitexpError as e:  # a study refused, or none of its trials completed: one line, as `vitexp.__main__`
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    def _search(self, arguments: list[str]) -> None:
        """Check the stored study against this command's search before anything is written, then claim and run
        trials (stopped ones first) until the study holds `n_trials`."""
        import optuna
        from omegaconf import OmegaConf

        from vitexp import files, search

        folder = Path(self.config.hydra.sweep.dir)
        wanted = search.declared_search(self.params, arguments, self.study_name, self.direction)
        self.place = place = search.where(self.storage_url, folder)
        if self.storage_url is None and os.path.lexists(folder / search.JOURNAL_FILE):
            search.checked_study(search.storage(None, folder), wanted, place)
        files.make_folder(folder, folder)
        with search.study_lock(folder), search.study_errors(place):
            store = search.storage(self.storage_url, folder)
            search.checked_study(store, wanted, place)
            if self.storage_url is None:
                search.refuse_cut_journal(folder / search.JOURNAL_FILE)
            study = optuna.create_study(
                study_name=wanted.name, storage=store, directions=wanted.directions, load_if_exists=True
            )
            files.write_text(folder / "multirun.yaml", OmegaConf.to_yaml(self.config), root=folder)
            done = len(study.trials)
        log.info(f"Optuna study {wanted.name} in {place}: {done} trials, {max(self.n_trials - done, 0)} to go")
        worker = search.register_worker(folder)
        try:
            self._run_trials(study, wanted, folder)
        finally:
            search.release(worker, search.worker_file(folder))
        self._finish(study, wanted, folder)

    def _run_trials(self, study: Any, wanted: Any, folder: Path) -> None:
        """Claim a batch of trials, run it, tell the study each result; until no trial is left to claim."""
        from vitexp import search

        ran = failed = 0
        while batch := self._claim(study, wanted, folder):
            self._set_threads(folder, len(batch))
            try:
                failed += self._launch(study, wanted, batch)
            finally:
                for trial, handle in batch:
                    search.release(handle, folder / f".trial_{trial.number}.lock")
            ran += len(batch)
            if failed / ran > self.max_failure_rate:
                log.error(f"{failed} of {ran} trials failed, more than hydra.sweeper.max_failure_rate: search stopped")
                return

    def _claim(self, study: Any, wanted: Any, folder: Path) -> list[tuple[Any, Any]]:
        """Up to `n_jobs` trials for this worker: those of the first `n_trials` that an earlier start left running (no
        worker holds them), then new ones while the study holds fewer than `n_trials`; each with its trial lock. A
        waiting trial (`study.enqueue_trial`) is checked before `study.ask` takes it up."""
        from optuna.trial import TrialState

        from vitexp import search

        batch = []
        with search.study_lock(folder), search.study_errors(self.place):
            for waiting in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                fixed = waiting.system_attrs.get("fixed_params", {})
                search.launch_check(self.place, waiting.number, fixed, wanted, complete=False)
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                room = len(batch) < self.n_jobs and trial.number < self.n_trials  # n_trials in all, stopped ones too
                handle = search.trial_lock(folder, trial.number) if room else None
                if handle is not None:
                    log.info(f"finishing trial {trial.number}, stopped by an earlier start")
                    batch.append((trial, handle))
            while len(batch) < self.n_jobs and len(study.trials) < self.n_trials:
                study.sampler = self._sampler(len(study.trials))
                trial = study.ask(fixed_distributions=wanted.space)
                for key, value in wanted.fixed.items():
                    trial.set_user_attr(key, value)
                batch.append((trial, search.trial_lock(folder, trial.number)))
        return batch

    def _sampler(self, number: int) -> Any:
        """The sampler of the config, seeded with seed + the number of the trial it draws (workers sharing a study,
        and a search continued, draw other points than the trials before them)."""
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        seed = OmegaConf.select(self.sampler_config, "seed")
        return instantiate(self.sampler_config, **({} if seed is None else {"seed": seed + number}))

    def _set_threads(self, folder: Path, jobs: int) -> None:
        """Jobs side by side on this machine (this batch, times the live workers) split its cores, unless
        OMP_NUM_THREADS was set."""
        import torch

        from vitexp import search

        if self.own_threads:
            return
        threads = max(1, (os.cpu_count() or 1) // (jobs * search.live_workers(folder)))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # jobs in other processes

    def _launch(self, study: Any, wanted: Any, batch: list[tuple[Any, Any]]) -> int:
        """Run a batch's jobs (trial N in job folder N; trials of consecutive numbers in one launch, side by side
        with a launcher that runs jobs at once), tell the study each result; the number that failed. Every job's
        overrides pass the launch check before the first starts."""
        from vitexp import search

        groups: list[list[Any]] = []
        for trial, _ in batch:
            if groups and groups[-1][-1].number + 1 == trial.number:
                groups[-1].append(trial)
            else:
                groups.append([trial])
        launches = [[search.launch_check(self.place, t.number, t.params, wanted) for t in group] for group in groups]
        failed = 0
        for group, jobs in zip(groups, launches):
            for trial, ret in zip(group, self.launcher.launch(jobs, initial_job_idx=group[0].number)):
                with search.study_errors(self.place):  # a job's results.json stays: a run again picks it up
                    failed += _tell(study, trial, ret)
        return failed

    def _finish(self, study: Any, wanted: Any, folder: Path) -> None:
        """Write the best trial to optimization_results.yaml, or refuse with one line when none completed (or a
        trial written into the study meanwhile is not one of this search's)."""
        import yaml
        from optuna.trial import TrialState

        from vitexp import VitexpError, files, search
        from vitexp.files import printable

        with search.study_errors(self.place):
            trials = study.get_trials(deepcopy=False)
            search.check_trials(self.place, trials, wanted)
        if not any(t.state == TrialState.COMPLETE for t in trials):
            if not trials:
                raise VitexpError(f"study {printable(study.study_name)} has no trials; raise hydra.sweeper.n_trials")
            raise VitexpError(
                f"all {len(trials)} trials of study {printable(study.study_name)} failed; see "
                f"{printable(folder / str(trials[-1].number) / 'results.json')}"
            )
        if len(study.directions) == 1:
            with search.study_errors(self.place):
                best_trial = study.best_trial
            best = {"name": "optuna", "best_params": best_trial.params, "best_value": best_trial.value}
            files.write_text(folder / "optimization_results.yaml", yaml.safe_dump(best), root=folder)
            log.info(f"best trial {best_trial.number}: {best_trial.value} with {best_trial.params}")


def _tell(study: Any, trial: Any, ret: Any) -> int:
    """Tell the study how a trial's job ended: its value, pruned, or failed (1: the search goes on)."""
    from hydra.core.utils import JobStatus
    from optuna.trial import TrialState

    from vitexp import search

    value = ret.return_value if ret.status == JobStatus.COMPLETED else None
    if value == search.PRUNED:
        study.tell(trial.number, state=TrialState.PRUNED)
    elif isinstance(value, (int, float)):
        study.tell(trial.number, float(value))
    else:
        log.warning(f"trial {trial.number} failed")
        study.tell(trial.number, state=TrialState.FAIL)
        return 1
    return 0
