"""The training loop: episodes -> algorithm step -> hooks (metrics, validation, checkpoints).

It knows nothing about any one algorithm, dataset or logger. Everything that
decides the next step (weights, optimizer, sampler RNG, step, and each
hook's state: best score, metric window) goes into last.pt, so a run stopped
at any point and resumed ends exactly as one that ran straight through (on
CPU).
"""

import logging
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from metalearn import distributed
from metalearn.algorithms import build_algorithm, run_dtype
from metalearn.config.schema import TaskConfig
from metalearn.config.validate import validate
from metalearn.data import EpisodeSampler, TaskKeys, build_dataset
from metalearn.data.transforms import preprocess_of
from metalearn.device import cores, resolve_device, share_cores
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
from metalearn.loggers import build_writers
from metalearn.storage.checkpoint import checkpoint_path, load_algo_state, load_checkpoint, save_checkpoint
from metalearn.storage.run_folder import record_resume, refuse_existing_run, remove_stale_temporaries

log = logging.getLogger(__name__)


class GracefulStop:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step; a second one aborts."""

    def __init__(self):
        self.signum = None

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: saving checkpoints/last.pt after this step", signal.Signals(signum).name)

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def parallel_jobs() -> int:
    """How many runs a parallel launcher (joblib) runs at once; 1 for one run or a sequential sweep."""
    launcher = HydraConfig.get().get("launcher") or {}
    n_jobs = launcher.get("n_jobs") if "joblib" in str(launcher.get("_target_", "")) else None
    if n_jobs is None:
        return 1
    return cores() if n_jobs < 0 else int(n_jobs)  # joblib: -1 means one job per core


def in_optuna_study() -> bool:
    """This run is a trial of an Optuna study (hparams_search=...): its best validation accuracy is the objective."""
    hydra = HydraConfig.get()
    return hydra.mode == RunMode.MULTIRUN and "optuna" in str(hydra.sweeper.get("_target_", "")).lower()


@dataclass
class TrainResult:
    run_dir: Path
    best_val_accuracy: float | None  # None: no validation with a finite loss ran


def train(cfg: DictConfig) -> TrainResult:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    validate(cfg)
    scored = in_optuna_study()
    if scored and cfg.train.val_every > cfg.train.steps:
        raise MetalearnError(
            f"a trial of an Optuna study is scored by its best validation accuracy, but train.val_every="
            f"{cfg.train.val_every} is more than train.steps={cfg.train.steps}, so no validation would run: "
            f"choose train.val_every <= train.steps."
        )
    device = resolve_device(cfg.device.name)
    ranks = distributed.start(device, cfg.device.dist_timeout_s)  # one process: rank 0 of 1
    if not ranks.main:
        distributed.leave_log_to_rank_0()
    if ranks.main:  # rank 0 alone writes the run folder
        if cfg.resume is None:
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
    torch.manual_seed(cfg.seed)
    loop, task = cfg.train, cfg.task

    # Before the data loads: a logger that cannot start (no MLflow server) stops the run in seconds.
    writers = build_writers(cfg.get("loggers"), run_dir) if ranks.main else []
    dataset = build_dataset(cfg.data)
    train_split = dataset.load_split("train")
    algo = build_algorithm(cfg, device, train_split.num_classes, train_split.image_shape)
    algo.ranks = ranks
    ways, shots, queries = TaskConfig.training_shape(task)
    if queries < 1 and algo.needs_queries:
        raise MetalearnError(f"algo={cfg.algo.name} trains on query images: task.train.queries must be at least 1.")
    train_sampler = EpisodeSampler(
        train_split,
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
    val_sampler = EpisodeSampler(
        dataset.load_split("val"),
        task.ways,
        task.shots,
        task.queries,
        device,
        seed=loop.val_seed,
        dtype=run_dtype(cfg),
        preprocess=preprocess_of(cfg.data),
    )
    state = LoopState(step=0, steps=loop.steps)

    def save(which: str) -> None:
        if not ranks.main:
            return
        save_checkpoint(
            checkpoint_path(run_dir, which),
            {
                "step": state.step,
                "algo": algo.state_dict(),
                "sampler": train_sampler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                **{key: value for hook in hooks for key, value in hook.state_dict().items()},
                "train_classes": train_split.num_classes,
                "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            },
        )

    rate_key = f"{algo.throughput_unit}_per_s"
    validation = Validation(
        algo,
        val_sampler,
        writers,
        loop.val_every,
        loop.val_episodes,
        cfg.eval.batch_size,
        save,
        ranks,
        keep=loop.keep_best,
    )
    hooks: list[Hook] = [
        DivergenceGuard(),  # first: a diverged step writes nothing
        TrainMetrics(writers, loop.log_every, rate_key),
        ConfiguredHooks(cfg.get("hooks")),  # e.g. a divergence guard: before validation and checkpoints
        validation,
        Checkpoints(loop.ckpt_every, lambda: save("last")),
    ]

    if cfg.resume is not None:
        ckpt = load_checkpoint(checkpoint_path(run_dir, "last"))
        load_algo_state(algo, ckpt["algo"], checkpoint_path(run_dir, "last"))
        train_sampler.load_state_dict(ckpt["sampler"])
        torch.set_rng_state(ckpt["torch_rng"])
        state.step = ckpt["step"]
        for hook in hooks:
            hook.load_state_dict(ckpt)
        algo.check_resume(loop.steps)
        for writer in writers:
            writer.resume(state.step)
        if ranks.main:
            record_resume(run_dir, list(HydraConfig.get().overrides.task), OmegaConf.to_container(cfg), state.step)
        log.info("resuming %s from step %d", run_dir, state.step)
    else:
        log.info("run folder %s", run_dir)
    log.info("on %s: %s", device, algo.fast_paths.describe(getattr(algo.model, "layout", "")))
    for writer in writers:
        writer.start(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    context = LoopContext(algo=algo, run_dir=run_dir, writers=writers, cfg=cfg, save=save)
    for hook in hooks:
        hook.start(context)

    if state.step >= loop.steps:
        log.info("the run is already at step %d of train.steps=%d: nothing to train", state.step, loop.steps)
    with (
        GracefulStop() as stop,
        logging_redirect_tqdm(),
        tqdm(
            total=loop.steps,
            initial=state.step,
            desc="meta-training",
            unit="step",
            dynamic_ncols=True,
            disable=not ranks.main,
        ) as bar,
    ):
        stopping = timed_out = False  # agreed by every rank at each step, so all stop after the same one
        try:
            while state.step < loop.steps and not stopping:
                tick = time.perf_counter()
                batch = algo.sample(train_sampler, loop.meta_batch_size)  # the whole batch, on every rank
                result = algo.meta_train_step(ranks.split(batch) if ranks.active else batch)
                out_of_time = loop.max_minutes is not None and state.elapsed() >= loop.max_minutes * 60
                result, signalled, out_of_time = ranks.batch_result(result, stop.signum is not None, out_of_time)
                # The time limit ends the run as train.steps would: this step validates and saves.
                state.final = timed_out = out_of_time and not signalled
                stopping = signalled or timed_out
                seconds = time.perf_counter() - tick
                items = len(batch[0])  # tasks, or images for a classifier's batch (all ranks together)
                state.step += 1
                bar.update(1)
                bar.set_postfix(
                    {
                        "loss": f"{result['loss']:.3f}",
                        "acc": f"{result['accuracy']:.3f}",
                        rate_key: f"{items / seconds:.1f}",
                    },
                    refresh=False,
                )
                for hook in hooks:
                    hook.after_step(state, result, items, seconds)
        except RuntimeError as err:
            if not ranks.active or not distributed.lost_peer(err):
                raise
            raise MetalearnError(distributed.lost_rank_message(err, ranks)) from None
        finally:
            for writer in writers:
                writer.close()

    if timed_out:
        log.warning(
            "train.max_minutes=%g reached at step %d of %d: validated and saved (metalearn train resume=%s goes on)",
            loop.max_minutes,
            state.step,
            loop.steps,
            shlex.quote(str(run_dir)),
        )
    elif stopping:
        save("last")
        log.warning("stopped at step %d; checkpoints/last.pt saved", state.step)
        if ranks.main:
            print(
                f"run folder: {shlex.quote(str(run_dir))}\n"
                f"resume with: metalearn train resume={shlex.quote(str(run_dir))}"
            )
        raise SystemExit(128 + (stop.signum or signal.SIGTERM))
    if ranks.main:
        print(f"run folder: {shlex.quote(str(run_dir))}")
    best = validation.best if validation.best >= 0 else None
    if best is None and scored:
        raise MetalearnError(
            "no validation of this trial had a finite loss, so it has no score: the trial counts as failed."
        )
    return TrainResult(run_dir, best)
