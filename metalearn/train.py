"""The training loop: episodes -> algorithm step -> metrics, validation, checkpoints.

It knows nothing about any one algorithm. Everything that decides the next
step (weights, optimizer, sampler RNG, step, best score, the metric window)
goes into last.pt, so a run stopped at any point and resumed ends exactly as
one that ran straight through (on CPU).
"""

import logging
import signal
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from metalearn.algorithms import build_algorithm
from metalearn.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from metalearn.config import training_episode_shape, validate
from metalearn.errors import MetalearnError
from metalearn.data import EpisodeSampler, load_split
from metalearn.device import resolve_device
from metalearn.evaluate import run_episodes
from metalearn.metrics import MetricsLog
from metalearn.runs import refuse_existing_run

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


def _new_window() -> dict:
    return {"loss": 0.0, "accuracy": 0.0, "steps": 0, "items": 0, "seconds": 0.0}


def train(cfg: DictConfig) -> Path:
    validate(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    last_path = checkpoint_path(run_dir, "last")
    if cfg.resume is None:
        refuse_existing_run(run_dir)
    device = resolve_device(cfg.device.name)
    torch.manual_seed(cfg.seed)
    data, loop = cfg.data, cfg.train

    train_split = load_split(data, "train")
    algo = build_algorithm(cfg, device, train_split.num_classes)
    ways, shots, queries = training_episode_shape(cfg)
    if queries < 1 and algo.needs_queries:
        raise MetalearnError(f"algo={cfg.algo.name} trains on query images: algo.train_queries must be at least 1.")
    train_sampler = EpisodeSampler(
        train_split,
        ways,
        shots,
        queries,
        device,
        seed=cfg.seed,
        replay_fraction=data.replay.fraction,
        replay_size=data.replay.size,
    )
    val_sampler = EpisodeSampler(
        load_split(data, "val"), data.ways, data.shots, data.queries, device, seed=loop.val_seed
    )
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    step, best_val, window = 0, -1.0, _new_window()

    if cfg.resume is not None:
        ckpt = load_checkpoint(last_path)
        algo.load_state_dict(ckpt["algo"])
        train_sampler.load_state_dict(ckpt["sampler"])
        torch.set_rng_state(ckpt["torch_rng"])
        step, best_val, window = ckpt["step"], ckpt["best_val_accuracy"], ckpt["window"]
        algo.check_resume(loop.steps)
        metrics.truncate_after(step)
        log.info("resuming %s from step %d", run_dir, step)
    else:
        log.info("run folder %s", run_dir)
    log.info("on %s: %s", device, algo.fast_paths.describe(getattr(algo.model, "layout", "")))

    def save(which: str) -> None:
        save_checkpoint(
            checkpoint_path(run_dir, which),
            {
                "step": step,
                "algo": algo.state_dict(),
                "sampler": train_sampler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "best_val_accuracy": best_val,
                "window": dict(window),
                "train_classes": train_split.num_classes,
                "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            },
        )

    rate_key = f"{algo.throughput_unit}_per_s"
    started = time.perf_counter()
    if step >= loop.steps:
        log.info("the run is already at step %d of train.steps=%d: nothing to train", step, loop.steps)
    with (
        GracefulStop() as stop,
        logging_redirect_tqdm(),
        tqdm(total=loop.steps, initial=step, desc="meta-training", unit="step", dynamic_ncols=True) as bar,
    ):
        while step < loop.steps and stop.signum is None:
            tick = time.perf_counter()
            batch = algo.sample(train_sampler, loop.meta_batch_size)
            result = algo.meta_train_step(batch)
            seconds = time.perf_counter() - tick
            items = len(batch[0])  # tasks, or images for a classifier's batch
            step += 1
            window["loss"] += result["loss"]
            window["accuracy"] += result["accuracy"]
            window["steps"] += 1
            window["items"] += items
            window["seconds"] += seconds
            bar.update(1)
            bar.set_postfix(
                {
                    "loss": f"{result['loss']:.3f}",
                    "acc": f"{result['accuracy']:.3f}",
                    rate_key: f"{items / seconds:.1f}",
                },
                refresh=False,
            )

            if step % loop.log_every == 0 or step == loop.steps:
                metrics.write(
                    step=step,
                    split="train",
                    loss=window["loss"] / window["steps"],
                    accuracy=window["accuracy"] / window["steps"],
                    **{rate_key: window["items"] / max(window["seconds"], 1e-9)},
                    time=time.perf_counter() - started,
                )
                window = _new_window()
            if step % loop.val_every == 0 or step == loop.steps:
                val = run_episodes(algo, val_sampler, loop.val_episodes, cfg.eval.batch_size, "validating")
                metrics.write(
                    step=step,
                    split="val",
                    loss=val.loss,
                    accuracy=val.accuracy,
                    ci95=val.ci95,
                    episodes=val.episodes,
                    time=time.perf_counter() - started,
                )
                log.info("step %d: val accuracy %.2f%% ± %.2f", step, 100 * val.accuracy, 100 * val.ci95)
                if val.accuracy > best_val:
                    best_val = val.accuracy
                    save("best")
            if step % loop.ckpt_every == 0 or step == loop.steps:
                save("last")

    if stop.signum is not None:
        save("last")
        log.warning("stopped at step %d; checkpoints/last.pt saved", step)
        print(f"run folder: {run_dir}\nresume with: metalearn train resume={run_dir}")
        raise SystemExit(128 + stop.signum)
    print(f"run folder: {run_dir}")
    return run_dir
