"""Episodic evaluation: mean accuracy +- 95% confidence interval over N episodes.

`metalearn eval` and validation during training share `run_episodes`; episodes
come from a sampler reseeded with a fixed seed, so two checkpoints are scored
on exactly the same tasks.
"""

import json
import logging
import math
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from metalearn.algorithms import Algorithm, build_algorithm
from metalearn.checkpoint import checkpoint_path, load_checkpoint
from metalearn.config import validate
from metalearn.data import EpisodeSampler, load_split
from metalearn.device import resolve_device

log = logging.getLogger(__name__)


@dataclass
class EpisodeResult:
    accuracy: float  # fraction in [0, 1]
    ci95: float  # half-width of the 95% interval, same unit
    loss: float
    episodes: int


def run_episodes(algo: Algorithm, sampler: EpisodeSampler, episodes: int, batch_size: int,
                 desc: str) -> EpisodeResult:
    accuracies, losses = [], []
    with tqdm(total=episodes, desc=desc, unit="ep", leave=False, dynamic_ncols=True) as bar:
        done = 0
        while done < episodes:
            count = min(batch_size, episodes - done)
            batch = sampler.sample(count)
            logits = algo.predict(batch).float()
            labels = batch.query_labels
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(count, -1)
            losses.append(loss.mean(dim=1).cpu())
            accuracies.append((logits.argmax(dim=-1) == labels).float().mean(dim=1).cpu())
            done += count
            bar.update(count)
    accuracy = torch.cat(accuracies).double()
    spread = accuracy.std().item() if episodes > 1 else 0.0
    return EpisodeResult(
        accuracy=accuracy.mean().item(),
        ci95=1.96 * spread / math.sqrt(episodes),
        loss=torch.cat(losses).mean().item(),
        episodes=episodes,
    )


def evaluate(cfg: DictConfig) -> EpisodeResult:
    """Score a run's checkpoint on test-split episodes; print and append to evals.jsonl."""
    validate(cfg)
    run_dir = Path(cfg.run)
    which = cfg.checkpoint.value if hasattr(cfg.checkpoint, "value") else str(cfg.checkpoint)
    ckpt = load_checkpoint(checkpoint_path(run_dir, which))
    device = resolve_device(cfg.device.name)
    data = cfg.data
    sampler = EpisodeSampler(load_split(data, "test"), data.ways, data.shots, data.queries, device,
                             seed=cfg.eval.seed)
    algo = build_algorithm(cfg, device, ckpt.get("train_classes", 0))
    algo.load_state_dict(ckpt["algo"])
    result = run_episodes(algo, sampler, cfg.eval.episodes, cfg.train.meta_batch_size, "evaluating")
    line = (f"test accuracy {100 * result.accuracy:.2f}% ± {100 * result.ci95:.2f} "
            f"({result.episodes} episodes, {data.name} {data.ways}-way {data.shots}-shot, {which}.pt)")
    print(line)
    record = {
        **asdict(result),
        "dataset": data.name,
        "split": data.split,
        "ways": data.ways,
        "shots": data.shots,
        "queries": data.queries,
        "checkpoint": f"{which}.pt",
        "step": ckpt["step"],
        "algo": cfg.algo.name,
        "inner_steps_eval": cfg.algo.inner_steps_eval,
        "seed": cfg.eval.seed,
        "time": datetime.now().isoformat(timespec="seconds"),
    }
    with open(run_dir / "evals.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    log.info("%s: %s", line, json.dumps(record))
    return result
