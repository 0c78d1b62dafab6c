"""The training loop: episodes -> algorithm step -> hooks (metrics, validation, checkpoints).

It knows nothing about any one algorithm, dataset or logger. Everything that
decides the next step (weights, optimizer, sampler RNG, step, and each
hook's state: best score, metric window) goes into last.pt, so a run stopped
at any point and resumed ends exactly as one that ran straight through (on
CPU).
"""

import logging
import os
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from metalearn import distributed
from metalearn.algorithms import Algorithm, build_algorithm, run_dtype
from metalearn.config.schema import TaskConfig
from metalearn.config.validate import validate
from metalearn.data import EpisodeSampler, TaskKeys, build_dataset
from metalearn.data.transforms import preprocess_of
from metalearn.device import cores, resolve_device, share_cores
from metalearn.distributed import Ranks
from metalearn.errors import MetalearnError
from metalearn.hooks import (
    Checkpoints,
    ConfiguredHooks,
    DivergenceGuard,
    Hook,
    LoopContext,
    LoopState,
    TrainMetrics,
    Validation,
)
from metalearn.loggers import MetricWriter, build_writers
from metalearn.storage.checkpoint import checkpoint_path, load_algo_state, load_checkpoint, save_checkpoint
from metalearn.storage.run_folder import (
    finishes_existing_run,
    record_resume,
    refuse_existing_run,
    remove_stale_temporaries,
)
from metalearn.study_trial import StudyTrial, build_pruner, trial_link

log = logging.getLogger(__name__)


class GracefulStop:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step; a second one aborts. In a submitit job
    (SLURM), so does the signal of its time limit or preemption, whose handler (submitit's) then requeues it."""

    def __init__(self):
        self.signum = None
        self.requeue_signal = requeue_signal()

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        why = " (the job's time limit or preemption)" if signum == self.requeue_signal else ""
        log.warning("%s received%s: saving checkpoints/last.pt after this step", signal.Signals(signum).name, why)

    def __enter__(self):
        signals = (signal.SIGINT, signal.SIGTERM, *([self.requeue_signal] if self.requeue_signal else []))
        self._previous = {s: signal.signal(s, self._handle) for s in signals}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def requeue(self):
        """submitit's handler that requeues this job, when its signal stopped the loop; else None."""
        if self.requeue_signal is None or self.signum != self.requeue_signal:
            return None
        return self._previous[self.signum]


def requeue_signal() -> int | None:
    """The signal submitit gives a job before its time limit or on preemption (SIGUSR2 unless set otherwise),
    when this process is such a job, whose handler requeues it; None otherwise."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    signum = getattr(signal, f"SIG{name}", None)
    if signum is None:
        return None
    handler = signal.getsignal(signum)
    return signum if getattr(handler, "__module__", "").startswith("submitit") else None


def parallel_jobs() -> int:
    """How many runs a parallel launcher (joblib) runs at once; 1 for one run or a sequential sweep."""
    launcher = HydraConfig.get().get("launcher") or {}
    n_jobs = launcher.get("n_jobs") if "joblib" in str(launcher.get("_target_", "")) else None
    if n_jobs is None:
        return 1
    return cores() if n_jobs < 0 else int(n_jobs)  # joblib: -1 means one job per core


def in_sweep() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def in_optuna_study() -> bool:
    """This run is a trial of an Optuna study (hparams_search=...): its best validation accuracy is the objective."""
    return in_sweep() and "optuna" in str(HydraConfig.get().sweeper.get("_target_", "")).lower()


@dataclass
class TrainResult:
    run_dir: Path
    best_val_accuracy: float | None  # None: no validation with a finite loss ran
    pruned_at: int | None = None  # the step at which an Optuna study's pruner stopped the run


@dataclass
class Run:
    """What the phases of one training run share (see `train`)."""

    cfg: DictConfig
    run_dir: Path
    ranks: Ranks
    device: torch.device
    writers: list[MetricWriter]
    algo: Algorithm
    sampler: EpisodeSampler  # the training batches
    train_classes: int
    state: LoopState
    validation: Validation | None = None
    hooks: list[Hook] = field(default_factory=list)

    @property
    def rate_key(self) -> str:
        return f"{self.algo.throughput_unit}_per_s"

    def save(self, which: str) -> None:
        """checkpoints/<which>.pt: everything the next step depends on (rank 0 alone writes it)."""
        if not self.ranks.main:
            return
        save_checkpoint(
            checkpoint_path(self.run_dir, which),
            {
                "step": self.state.step,
                "algo": self.algo.state_dict(),
                "sampler": self.sampler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                **{key: value for hook in self.hooks for key, value in hook.state_dict().items()},
                "train_classes": self.train_classes,
                "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
                "overrides": list(HydraConfig.get().overrides.task),  # the run's record, should Hydra rewrite it
            },
        )


@dataclass
class Ending:
    """How the step loop ended: at train.steps, at the time limit, or at a stop signal (of any rank)."""

    timed_out: bool = False
    signalled: bool = False
    signum: int | None = None  # the signal this process got; None when another rank's stopped it
    requeue: object = None  # submitit's handler that requeues the job, when its signal stopped the loop


def train(cfg: DictConfig) -> TrainResult:
    """Set up; resume (resume=<run>); train to train.steps, the time limit or a stop signal; end."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    validate(cfg)
    scored = in_optuna_study()
    if scored:
        check_trial_validates(cfg)
    resuming = cfg.resume is not None or finishes_existing_run(cfg, run_dir, in_sweep())
    run = set_up(cfg, run_dir, resuming)
    if resuming:
        resume(run)
    else:
        log.info("run folder %s", run_dir)
    start(run)
    ending = run_steps(run)
    return end(run, ending, scored)


def check_trial_validates(cfg: DictConfig) -> None:
    if cfg.train.val_every > cfg.train.steps:
        raise MetalearnError(
            f"a trial of an Optuna study is scored by its best validation accuracy, but train.val_every="
            f"{cfg.train.val_every} is more than train.steps={cfg.train.steps}, so no validation would run: "
            f"choose train.val_every <= train.steps."
        )


# --- set-up ---------------------------------------------------------------------------------------


def set_up(cfg: DictConfig, run_dir: Path, resuming: bool = False) -> Run:
    """This process's place and device, the seed, the writers, the data, the algorithm, samplers and hooks."""
    ranks, device = start_process(cfg, run_dir, resuming)
    torch.manual_seed(cfg.seed)
    # Before the data loads: a logger that cannot start (no MLflow server) stops the run in seconds.
    writers = build_writers(cfg.get("loggers"), run_dir) if ranks.main else []
    dataset = build_dataset(cfg.data)
    train_split = dataset.load_split("train")
    algo = build_algorithm(cfg, device, train_split.num_classes, train_split.image_shape, ranks=ranks)
    sampler = training_sampler(cfg, train_split, algo, device)
    val_sampler = validation_sampler(cfg, dataset.load_split("val"), device)
    state = LoopState(step=0, steps=cfg.train.steps)
    run = Run(cfg, run_dir, ranks, device, writers, algo, sampler, train_split.num_classes, state)
    add_hooks(run, val_sampler)
    return run


def start_process(cfg: DictConfig, run_dir: Path, resuming: bool = False) -> tuple[Ranks, torch.device]:
    """This process's rank among the run's and its device and threads; rank 0 readies the run folder."""
    device = resolve_device(cfg.device.name)
    ranks = distributed.start(device, cfg.device.dist_timeout_s)  # one process: rank 0 of 1
    if not ranks.main:
        distributed.leave_log_to_rank_0()
    if ranks.main:  # rank 0 alone writes the run folder
        if not resuming:
            refuse_existing_run(run_dir)
        for stale in remove_stale_temporaries(run_dir):
            log.info("removed %s, a checkpoint left half-written by an earlier process", stale)
    device = ranks.device(device)
    jobs = parallel_jobs()
    if jobs > 1:  # runs side by side would fight over every core: each takes its share
        log.info("%d runs in parallel (hydra.launcher.n_jobs): %d thread(s) each", jobs, share_cores(jobs))
    if ranks.active:
        threads = ranks.share_threads(device)
        log.info("rank %d of %d on %s, %d thread(s)", ranks.rank, ranks.world, device, threads)
    return ranks, device


def training_sampler(cfg: DictConfig, split, algo: Algorithm, device: torch.device) -> EpisodeSampler:
    """The training tasks (task.train.*, else task.*), seeded by `seed`, with train.replay's replays."""
    task, loop = cfg.task, cfg.train
    ways, shots, queries = TaskConfig.training_shape(task)
    if queries < 1 and algo.needs_queries:
        raise MetalearnError(f"algo={cfg.algo.name} trains on query images: task.train.queries must be at least 1.")
    return EpisodeSampler(
        split,
        ways,
        shots,
        queries,
        device,
        seed=cfg.seed,
        replay_fraction=loop.replay.fraction,
        replay_size=loop.replay.size,
        dtype=run_dtype(cfg),
        preprocess=preprocess_of(cfg.data, training=True),
        keys=TaskKeys.of_training(task),
    )


def validation_sampler(cfg: DictConfig, split, device: torch.device) -> EpisodeSampler:
    """The validation episodes: task.*, the same ones at every validation (train.val_seed)."""
    task = cfg.task
    return EpisodeSampler(
        split,
        task.ways,
        task.shots,
        task.queries,
        device,
        seed=cfg.train.val_seed,
        dtype=run_dtype(cfg),
        preprocess=preprocess_of(cfg.data),
    )


def add_hooks(run: Run, val_sampler: EpisodeSampler) -> None:
    """The hooks after each step, in their order: divergence guard, metrics, configured hooks, validation, last.pt."""
    loop = run.cfg.train
    run.validation = Validation(
        run.algo,
        val_sampler,
        run.writers,
        loop.val_every,
        loop.val_episodes,
        run.cfg.eval.batch_size,
        run.save,
        run.ranks,
        keep=loop.keep_best,
    )
    run.hooks = [
        DivergenceGuard(),  # first: a diverged step writes nothing
        TrainMetrics(run.writers, loop.log_every, run.rate_key),
        ConfiguredHooks(run.cfg.get("hooks")),  # e.g. a divergence guard: before validation and checkpoints
        run.validation,
        *study_trial_hooks(run),  # after validation, which it reports; before the checkpoint of a pruned step
        Checkpoints(loop.ckpt_every, lambda: run.save("last")),
    ]


def study_trial_hooks(run: Run) -> list[Hook]:
    """A trial of an Optuna study reports its validations to the study, whose pruner may stop it."""
    if not in_optuna_study():
        return []
    sweeper = HydraConfig.get().sweeper
    link = trial_link(sweeper)
    if link is None:
        return []
    return [StudyTrial(link, build_pruner(sweeper, run.cfg), run.validation, run.ranks)]


# --- resume and start -----------------------------------------------------------------------------


def resume(run: Run) -> None:
    """Everything as last.pt left it: algorithm, sampler, RNG, step, hooks and writers; the resume recorded."""
    path = checkpoint_path(run.run_dir, "last")
    ckpt = load_checkpoint(path)
    load_algo_state(run.algo, ckpt["algo"], path)
    run.sampler.load_state_dict(ckpt["sampler"])
    torch.set_rng_state(ckpt["torch_rng"])
    run.state.step = ckpt["step"]
    for hook in run.hooks:
        hook.load_state_dict(ckpt)
    run.algo.check_resume(run.cfg.train.steps)
    for writer in run.writers:
        writer.resume(run.state.step)
    if run.ranks.main:
        overrides = list(HydraConfig.get().overrides.task)
        record_resume(run.run_dir, overrides, OmegaConf.to_container(run.cfg), run.state.step)
    log.info("resuming %s from step %d", run.run_dir, run.state.step)


def start(run: Run) -> None:
    """Say what the model computes on; start the writers and the hooks."""
    layout = getattr(run.algo.model, "layout", "")
    log.info("on %s: %s", run.device, run.algo.fast_paths.describe(layout))
    for writer in run.writers:
        writer.start(OmegaConf.to_container(run.cfg, resolve=True, enum_to_str=True))
    context = LoopContext(algo=run.algo, run_dir=run.run_dir, writers=run.writers, cfg=run.cfg, save=run.save)
    for hook in run.hooks:
        hook.start(context)


# --- the steps ------------------------------------------------------------------------------------


def run_steps(run: Run) -> Ending:
    """Train to train.steps, or until the time limit or a stop signal; every rank stops after the same step."""
    loop, state = run.cfg.train, run.state
    if state.step >= loop.steps:
        log.info("the run is already at step %d of train.steps=%d: nothing to train", state.step, loop.steps)
    ending = Ending()
    with (
        GracefulStop() as stop,
        logging_redirect_tqdm(),
        tqdm(
            total=loop.steps,
            initial=state.step,
            desc="meta-training",
            unit="step",
            dynamic_ncols=True,
            disable=not run.ranks.main,
        ) as bar,
    ):
        try:
            while state.step < loop.steps and not (ending.signalled or ending.timed_out or state.pruned):
                ending.signalled, ending.timed_out = train_step(run, stop, bar)
        except RuntimeError as err:
            if not run.ranks.active or not distributed.lost_peer(err):
                raise
            raise MetalearnError(distributed.lost_rank_message(err, run.ranks)) from None
        finally:
            for writer in run.writers:
                writer.close()
    ending.signum, ending.requeue = stop.signum, stop.requeue()
    return ending


def train_step(run: Run, stop: GracefulStop, bar: tqdm) -> tuple[bool, bool]:
    """One step and its hooks; (stop signalled, time limit reached), as every rank agreed."""
    loop, state, algo, ranks = run.cfg.train, run.state, run.algo, run.ranks
    tick = time.perf_counter()
    batch = algo.sample(run.sampler, loop.meta_batch_size)  # the whole batch, on every rank
    result = algo.meta_train_step(ranks.split(batch) if ranks.active else batch)
    out_of_time = loop.max_minutes is not None and state.elapsed() >= loop.max_minutes * 60
    result, signalled, out_of_time = ranks.batch_result(result, stop.signum is not None, out_of_time)
    # The time limit ends the run as train.steps would: this step validates and saves.
    state.final = timed_out = out_of_time and not signalled
    seconds = time.perf_counter() - tick
    items = len(batch[0])  # tasks, or images for a classifier's batch (all ranks together)
    state.step += 1
    bar.update(1)
    bar.set_postfix(
        {
            "loss": f"{result['loss']:.3f}",
            "acc": f"{result['accuracy']:.3f}",
            run.rate_key: f"{items / seconds:.1f}",
        },
        refresh=False,
    )
    for hook in run.hooks:
        hook.after_step(state, result, items, seconds)
    return signalled, timed_out


# --- the end --------------------------------------------------------------------------------------


def end(run: Run, ending: Ending, scored: bool) -> TrainResult:
    """Say how the run ended and where it is; its score, the best validation accuracy."""
    folder = shlex.quote(str(run.run_dir))
    if ending.timed_out:
        log.warning(
            "train.max_minutes=%g reached at step %d of %d: validated and saved (metalearn train resume=%s goes on)",
            run.cfg.train.max_minutes,
            run.state.step,
            run.cfg.train.steps,
            folder,
        )
    elif ending.signalled:
        run.save("last")
        log.warning("stopped at step %d; checkpoints/last.pt saved", run.state.step)
        if ending.requeue is not None:  # a submitit job: it requeues itself and resumes from here (existing_run)
            log.warning("requeueing the job: it goes on from step %d in %s", run.state.step, folder)
            ending.requeue(ending.signum, None)  # exits
        if run.ranks.main:
            print(f"run folder: {folder}\nresume with: metalearn train resume={folder}")
        raise SystemExit(128 + (ending.signum or signal.SIGTERM))
    if run.ranks.main:
        print(f"run folder: {folder}")
    best = run.validation.best if run.validation.best >= 0 else None
    if best is None and scored:
        raise MetalearnError(
            "no validation of this trial had a finite loss, so it has no score: the trial counts as failed."
        )
    return TrainResult(run.run_dir, best, run.state.step if run.state.pruned else None)
