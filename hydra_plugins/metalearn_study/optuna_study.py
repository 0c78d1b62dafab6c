"""The sweeper of `hparams_search=...` (hydra/sweeper=optuna): an Optuna study on its ask-and-tell API.

Each trial is one job of Hydra's launcher (basic, joblib, submitit), asked for in batches of n_jobs; the
job's best validation accuracy is told back as the trial's value. A job learns its trial's number
(hydra.sweeper.trial) and reports each validation to the study through its storage, where the pruner
(hydra/sweeper/pruner=...) may stop it (metalearn.study_trial); a pruned trial is told PRUNED.

n_trials is the size of the study: trials that ended (complete, pruned or failed) or run count towards it,
so the same command with the same storage finishes a study a stopped sweeper left short. Trials a stopped
process left running are taken up again when their run folder is in this sweep (the job resumes from its
checkpoint), and marked failed otherwise.

Hydra loads sweepers only from the hydra_plugins package, hence this module's place. It imports Optuna when
a study starts, so Hydra's plugin scan works without the sweep extra.
"""

import contextlib
import functools
import logging
import math
from pathlib import Path

from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from metalearn.errors import MetalearnError, RunFailed

log = logging.getLogger(__name__)


class OptunaStudy(Sweeper):
    def __init__(
        self,
        sampler,
        direction: str = "maximize",
        study_name: str | None = None,
        storage: str | None = None,
        n_trials: int = 20,
        n_jobs: int = 1,
        max_failure_rate: float = 1.0,
        params: DictConfig | None = None,
        pruner=None,
        trial: int | None = None,  # each job's own: its trial's number, set by this sweeper
    ) -> None:
        if isinstance(pruner, str) or isinstance(sampler, str):
            which = "pruner" if isinstance(pruner, str) else "sampler"
            raise MetalearnError(
                f"hydra.sweeper.{which} is a config group: choose one with hydra/sweeper/{which}=<name> "
                f"(pruners: none, median, successive_halving, hyperband; samplers: tpe, random, grid)."
            )
        self.sampler, self.pruner = sampler, pruner
        self.direction, self.study_name, self.storage = direction, study_name or "study", storage
        self.n_trials, self.n_jobs, self.max_failure_rate = int(n_trials), max(1, int(n_jobs)), max_failure_rate
        self.params = OmegaConf.to_container(params, resolve=True) if params is not None else {}

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.sweep_dir_given = str(config.hydra.sweep.dir)
        self.sweep_dir = Path(self.sweep_dir_given).absolute()

    # --- the study ------------------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> None:
        try:
            self._sweep(arguments)
        except MetalearnError as err:  # one line, as the other commands end on
            raise RunFailed(f"metalearn: error: {err}") from None

    def _sweep(self, arguments: list[str]) -> None:
        from hydra_plugins.metalearn_study.search_space import grid, search_space

        self.space, self.fixed = search_space(self.params, arguments)
        if not self.space:
            raise MetalearnError(
                "the study has nothing to search: give hydra.sweeper.params, or a key as choice(), range() or "
                "interval() on the command line."
            )
        sampler = self.sampler(search_space=grid(self.space)) if self._partial(self.sampler) else self.sampler
        self.url = absolute_url(self.storage)
        self._check_reachable()
        study = self._open(sampler)
        log.info(
            "study %s (%s): %d trials, %d at a time, %s, %s; storage %s",
            self.study_name,
            self.direction,
            self.n_trials,
            self.n_jobs,
            type(study.sampler).__name__,
            type(study.pruner).__name__,
            self.url or "in memory",
        )
        for key, dist in self.space.items():
            log.info("  %s: %s", key, dist)
        resumed = self._take_up_stale(study)
        for start in range(0, len(resumed), self.n_jobs):
            self._run(study, resumed[start : start + self.n_jobs])
        self.grid_done = False
        while (missing := self.n_trials - counted(study)) > 0 and not self.grid_done:
            trials = [study.ask(self.space) for _ in range(min(self.n_jobs, missing))]
            self._run(study, [(t.number, t.params) for t in trials])
        self._summarize(study)

    @staticmethod
    def _partial(sampler) -> bool:
        return isinstance(sampler, functools.partial)  # `_partial_: true`: the grid sampler, given its grid here

    def _check_reachable(self) -> None:
        """A study in memory is out of reach of trials in other processes, which report to it for pruning."""
        from optuna.pruners import NopPruner

        basic = type(self.launcher).__name__ == "BasicLauncher"
        if self.url is None and not basic and not isinstance(self.pruner, (NopPruner, type(None))):
            raise MetalearnError(
                "a pruned study's trials report to it from their own processes, but hydra.sweeper.storage=null keeps "
                "it in this process's memory: give it a storage (hydra.sweeper.storage=sqlite:///<file>.db)."
            )

    def _open(self, sampler):
        import optuna

        from hydra_plugins.metalearn_study.study_storage import open_storage
        from metalearn.study_trial import IN_PROCESS

        made = self._make_study_folder()
        try:
            storage = open_storage(self.url) if self.url else optuna.storages.InMemoryStorage()
        except BaseException:
            for folder in made:  # a study that cannot start leaves no sweep folder behind
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        study = optuna.create_study(
            study_name=self.study_name,
            storage=storage,
            sampler=sampler,
            pruner=self.pruner,
            direction=self.direction,
            load_if_exists=True,
        )
        if [d.name.lower() for d in study.directions] != [str(self.direction).lower()]:  # a name another study took
            raise RunFailed(
                f"metalearn: error: study {self.study_name} in {self.url} optimizes in another direction "
                f"({study.directions[0].name.lower()}, not {self.direction}): choose another "
                f"hydra.sweeper.study_name, or another hydra.sweeper.storage."
            )
        if self.url is None:
            IN_PROCESS[self.study_name] = study
        return study

    def _make_study_folder(self) -> list[Path]:
        """The folders of a new SQLite study file in the sweep folder (the default), the deepest first."""
        if not (self.url or "").startswith("sqlite:///"):
            return []
        folder = Path(self.url[len("sqlite:///") :]).parent
        if folder.exists() or not folder.is_relative_to(self.sweep_dir):
            return []
        made = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(parents=True)
        return made

    def _take_up_stale(self, study) -> list[tuple[int, dict]]:
        """Trials a stopped process left running: those whose run folder is in this sweep go on there (the job
        resumes from its checkpoint); the others are marked failed."""
        if self.url is None:
            return []
        from hydra_plugins.metalearn_study.study_storage import record_owner, stale_trials
        from metalearn.study_trial import RUN_ATTR

        resumed = []
        for trial in stale_trials(study._storage, study._study_id):
            run = trial.system_attrs.get(RUN_ATTR)
            if isinstance(run, str) and Path(run).parent == self.sweep_dir and set(trial.params) == set(self.space):
                record_owner(study._storage, trial._trial_id)
                log.warning(
                    "trial %d of study %s was left running by a process that stopped: it goes on in %s",
                    trial.number,
                    self.study_name,
                    run,
                )
                resumed.append((trial.number, trial.params))
            else:
                fail_stale(study, trial)
        return resumed

    # --- the trials -----------------------------------------------------------------------------------

    def _run(self, study, trials: list[tuple[int, dict]]) -> None:
        """One batch of trials as jobs of the launcher, each result told to the study."""
        from hydra_plugins.metalearn_study.search_space import as_override

        batch = [
            [
                *self.fixed,
                *(as_override(key, value) for key, value in params.items()),
                f"hydra.sweeper.trial={number}",
                *([f"hydra.sweeper.storage={self.url}"] if self.url else []),
            ]
            for number, params in trials
        ]
        numbers = [number for number, _ in trials]
        consecutive = numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        if consecutive:  # hydra.job.num is the trial's number
            returns = self.launcher.launch(batch, initial_job_idx=numbers[0])
        else:  # trials of several sweepers on one study: one job at a time keeps each its number
            returns = [self.launcher.launch([job], initial_job_idx=n)[0] for n, job in zip(numbers, batch, strict=True)]
        failures = [ret for ret in returns if ret.status != JobStatus.COMPLETED]
        for number, ret in zip(numbers, returns, strict=True):
            self._tell(study, number, ret)
        if failures and len(failures) / len(returns) > self.max_failure_rate:
            failures[0].return_value  # noqa: B018 -- raises the job's error: too many failed trials stop the study

    def _tell(self, study, number: int, ret) -> None:
        from optuna.trial import TrialState

        from metalearn.study_trial import Pruned

        storage = study._storage
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        if storage.get_trial(trial_id).state.is_finished():
            return  # finished by another process (a worker that took it up)
        if ret.status != JobStatus.COMPLETED:
            self._told(study, number, state=TrialState.FAIL)
            log.warning("trial %d failed: %s", number, _first_line(ret._return_value))
            return
        value = ret.return_value
        if isinstance(value, Pruned):
            storage.set_trial_user_attr(trial_id, "pruned_at_step", value.step)
            self._told(study, number, state=TrialState.PRUNED)  # its value: the last validation reported
            log.info("trial %d pruned at step %d (best val accuracy %.4f)", number, value.step, value.accuracy)
        elif value is None or not math.isfinite(float(value)):
            self._told(study, number, state=TrialState.FAIL)
            log.warning("trial %d has no score", number)
        else:
            self._told(study, number, float(value))
            log.info("trial %d: %.4f", number, float(value))

    def _told(self, study, number: int, *args, **kwargs) -> None:
        try:
            study.tell(number, *args, **kwargs)
        except RuntimeError as err:
            if "Study.stop" not in str(err):
                raise
            self.grid_done = True  # the grid sampler saw its last point (the trial is stored all the same)

    def _summarize(self, study) -> None:
        from optuna.trial import TrialState

        done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        states = {}
        for trial in study.get_trials(deepcopy=False):
            states[trial.state.name.lower()] = states.get(trial.state.name.lower(), 0) + 1
        if not done:
            raise RunFailed(
                f"metalearn: error: no trial of the study completed; each trial's train.log under "
                f"{self.sweep_dir_given} says why it failed."
            )
        best = study.best_trial
        results = {
            "name": "optuna",
            "study_name": self.study_name,
            "storage": self.url,
            "best_trial": best.number,
            "best_params": best.params,
            "best_value": best.value,
            "trials": states,
        }
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optimization_results.yaml")
        log.info("best trial %d: %.4f with %s", best.number, best.value, best.params)
        log.info("trials: %s", ", ".join(f"{count} {state}" for state, count in sorted(states.items())))


def counted(study) -> int:
    """Trials that count towards n_trials: those that ended or run (queued ones are asked for first)."""
    from optuna.trial import TrialState

    return sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))


def fail_stale(study, trial) -> None:
    from optuna.trial import TrialState

    from hydra_plugins.metalearn_study.study_storage import OWNER

    try:
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except RuntimeError:
        return  # another worker starting on the same study ended it first
    owner = trial.system_attrs.get(OWNER)
    log.warning(
        "trial %d of study %s was left running by a process that stopped (%s): marked failed",
        trial.number,
        study.study_name,
        "asked through Optuna" if owner is None else f"process {owner.get('pid')} on {owner.get('host')}",
    )


def absolute_url(url: str | None) -> str | None:
    """An SQLite file's URL with an absolute path: trials in other processes or folders reach the same file."""
    if url is None or not str(url).startswith("sqlite:///") or str(url).startswith("sqlite:////"):
        return None if url is None else str(url)
    return "sqlite:///" + str(Path(str(url)[len("sqlite:///") :]).absolute())


def _first_line(err) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
