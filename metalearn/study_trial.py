"""A run that is a trial of an Optuna study (hparams_search=...): each validation is reported to the trial,
and the study's pruner may stop the run there, validated and saved (resumable) like a run at its time limit.

The sweeper (hydra_plugins.metalearn_study) gives each trial's job its number in the study
(hydra.sweeper.trial); the job reaches the study through its storage (hydra.sweeper.storage), so trials in
other processes (joblib) and on other machines (submitit) report and are pruned as one in the sweeper's
own process is. A study without storage lives in the sweeper's memory: its jobs must run in that process.
The run folder's trial.json says which study and trial it is, and how it ended.
"""

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from metalearn.distributed import Ranks
from metalearn.errors import MetalearnError
from metalearn.hooks import Hook, LoopState, Validation
from metalearn.storage.atomic import atomic_text
from metalearn.storage.trial_record import TRIAL_FILE

log = logging.getLogger(__name__)

RUN_ATTR = "metalearn:run"  # a trial's system attribute: the run folder of its job
IN_PROCESS: dict[str, object] = {}  # study name -> the optuna Study of a sweeper in this process without storage


@dataclass(frozen=True)
class Pruned:
    """A job's result when the study's pruner stopped it: at which step, and its validation accuracy there."""

    step: int
    accuracy: float


@dataclass(frozen=True)
class TrialLink:
    study_name: str
    storage: str | None  # None: the study is in the memory of the sweeper's process
    number: int


def trial_link(hydra_sweeper: DictConfig) -> TrialLink | None:
    """This job's trial, from the sweeper's settings in its Hydra config; None when the sweeper gave none."""
    number = hydra_sweeper.get("trial")
    if number is None:
        return None
    return TrialLink(str(hydra_sweeper.study_name), hydra_sweeper.get("storage"), int(number))


def build_pruner(hydra_sweeper: DictConfig, cfg: DictConfig):
    """The study's pruner as the sweeper built it: its settings may name the run's keys (${train.steps})."""
    from hydra.utils import instantiate

    raw = OmegaConf.to_container(hydra_sweeper.pruner, resolve=False)
    root = OmegaConf.create({**OmegaConf.to_container(cfg, resolve=False), "_pruner": raw})
    return instantiate(root._pruner)


class StudyTrial(Hook):
    """After each validation: the accuracy to the trial (at its step), and the pruner's verdict; a pruned run
    stops after this step, which is saved (the checkpoint hook comes after this one). The sweeper refuses a
    pruner where its trials cannot reach the study (in its memory, trials in other processes): they then
    report only their result."""

    def __init__(self, link: TrialLink, pruner, validation: Validation, ranks: Ranks):
        self.link, self.pruner, self.validation, self.ranks = link, pruner, validation, ranks
        self.study = self.trial_id = None
        self.run_dir: Path | None = None

    def start(self, context):
        self.run_dir = context.run_dir
        if not self.ranks.main:
            return
        self.study = open_study(self.link, self.pruner)
        if self.study is None:
            log.info(
                "study %s is in another process's memory: this trial reports its result only", self.link.study_name
            )
            return
        storage = self.study._storage
        try:
            self.trial_id = storage.get_trial_id_from_study_id_trial_number(self.study._study_id, self.link.number)
        except KeyError:
            raise MetalearnError(
                f"study {self.link.study_name} has no trial {self.link.number}: hydra.sweeper.trial is set by the "
                f"study's sweeper for each of its jobs, not by hand."
            ) from None
        storage.set_trial_system_attr(self.trial_id, RUN_ATTR, str(self.run_dir))
        self._record("running")

    def after_step(self, state: LoopState, result, items, seconds):
        last = self.validation.last
        if last is None or last["step"] != state.step:
            return  # no validation at this step
        prune = False
        if self.ranks.main and self.study is not None and math.isfinite(last["loss"]):
            storage = self.study._storage
            storage.set_trial_intermediate_value(self.trial_id, state.step, last["accuracy"])
            prune = bool(self.pruner.prune(self.study, storage.get_trial(self.trial_id)))
        if self.ranks.active:
            prune = bool(self.ranks.broadcast(prune))
        if prune and state.step < state.steps:
            state.final = state.pruned = True  # the checkpoint hook saves this step
            log.info(
                "pruned by the study's %s at step %d (val accuracy %.2f%%): validated and saved",
                type(self.pruner).__name__,
                state.step,
                100 * last["accuracy"],
            )
            self._record("pruned", state.step)

    def _record(self, state: str, step: int | None = None) -> None:
        if self.ranks.main:
            record = {"study": self.link.study_name, "storage": self.link.storage, "trial": self.link.number}
            atomic_text(self.run_dir / TRIAL_FILE, json.dumps({**record, "state": state, "step": step}) + "\n")


def open_study(link: TrialLink, pruner):
    """The trial's study: through its storage, or the sweeper's own in this process; None when out of reach."""
    import optuna

    if link.storage is None:  # in the sweeper's memory: out of reach of a trial in another process (no pruning)
        return IN_PROCESS.get(link.study_name)
    return optuna.load_study(study_name=link.study_name, storage=link.storage, pruner=pruner)
