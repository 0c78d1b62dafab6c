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
from typing import List, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from metalearn.algorithms import Algorithm, build_algorithm
from metalearn.checkpoint import checkpoint_path, load_checkpoint
from metalearn.config import validate
from metalearn.data import EpisodeSampler, load_split
from metalearn.device import resolve_device
from metalearn.errors import MetalearnError

log = logging.getLogger(__name__)


@dataclass
class EpisodeResult:
    accuracy: float  # fraction in [0, 1]
    ci95: float  # half-width of the 95% interval, same unit
    loss: float
    episodes: int


def score_episodes(algos: Sequence[Algorithm], sampler: EpisodeSampler, episodes: int, batch_size: int,
                   desc: str) -> List[EpisodeResult]:
    """Each algorithm's result on the same episodes; with several, the ensemble's last.

    The ensemble averages the members' class probabilities per query; its
    log-probabilities serve as logits for accuracy and loss.
    """
    scored = len(algos) + (len(algos) > 1)
    accuracies, losses = [[] for _ in range(scored)], [[] for _ in range(scored)]
    with tqdm(total=episodes, desc=desc, unit="ep", leave=False, dynamic_ncols=True) as bar:
        done = 0
        while done < episodes:
            count = min(batch_size, episodes - done)
            batch = sampler.sample(count)
            all_logits = [algo.predict(batch).float() for algo in algos]
            if len(algos) > 1:
                all_logits.append(torch.stack([x.softmax(dim=-1) for x in all_logits]).mean(dim=0).log())
            labels = batch.query_labels
            for i, logits in enumerate(all_logits):
                loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(count, -1)
                losses[i].append(loss.mean(dim=1).cpu())
                accuracies[i].append((logits.argmax(dim=-1) == labels).float().mean(dim=1).cpu())
            done += count
            bar.update(count)
    results = []
    for i in range(scored):
        accuracy = torch.cat(accuracies[i]).double()
        spread = accuracy.std().item() if episodes > 1 else 0.0
        results.append(EpisodeResult(accuracy=accuracy.mean().item(), ci95=1.96 * spread / math.sqrt(episodes),
                                     loss=torch.cat(losses[i]).mean().item(), episodes=episodes))
    return results


def run_episodes(algo: Algorithm, sampler: EpisodeSampler, episodes: int, batch_size: int,
                 desc: str) -> EpisodeResult:
    return score_episodes([algo], sampler, episodes, batch_size, desc)[0]


def _checkpoint_name(cfg: DictConfig) -> str:
    return cfg.checkpoint.value if hasattr(cfg.checkpoint, "value") else str(cfg.checkpoint)


def _load_member(cfg: DictConfig, device: torch.device):
    """The algorithm of one run with its checkpoint's weights, and the checkpoint's step."""
    ckpt = load_checkpoint(checkpoint_path(Path(cfg.run), _checkpoint_name(cfg)))
    algo = build_algorithm(cfg, device, ckpt.get("train_classes", 0))
    algo.load_state_dict(ckpt["algo"])
    return algo, ckpt["step"]


def _describe(result: EpisodeResult, data: DictConfig, what: str) -> str:
    return (f"test accuracy {100 * result.accuracy:.2f}% ± {100 * result.ci95:.2f} "
            f"({result.episodes} episodes, {data.name} {data.ways}-way {data.shots}-shot, {what})")


def _record(result: EpisodeResult, cfg: DictConfig, step: int) -> dict:
    data = cfg.data
    return {
        **asdict(result),
        "dataset": data.name,
        "split": data.split,
        "ways": data.ways,
        "shots": data.shots,
        "queries": data.queries,
        "checkpoint": f"{_checkpoint_name(cfg)}.pt",
        "step": step,
        "algo": cfg.algo.name,
        "inner_steps_eval": cfg.algo.get("inner_steps_eval"),
        "seed": cfg.eval.seed,
        "time": datetime.now().isoformat(timespec="seconds"),
    }


def _append(run_dir: Path, record: dict) -> None:
    with open(run_dir / "evals.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


# What every ensemble member must share: the tasks they are scored on.
TASK_KEYS = ("name", "split", "ways", "shots", "queries")


def member_configs(cfg: DictConfig) -> List[DictConfig]:
    """One composed config per run of `run=[a,b,...]`: each run's saved overrides, then this command's."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from metalearn.cli import quoted, replay_run_overrides

    given = [o for o in HydraConfig.get().overrides.task if not o.split("=", 1)[0].lstrip("+~") in ("run", "resume")]
    configs = [compose("eval", overrides=replay_run_overrides(str(r), given, drop=("run", "resume"))
                       + [f"run={quoted(str(r))}"]) for r in cfg.run]
    first = configs[0]
    for other in configs[1:]:
        differing = [k for k in TASK_KEYS if other.data[k] != first.data[k]]
        if differing:
            raise MetalearnError(
                f"ensemble members must be scored on the same tasks, but {other.run} and {first.run} differ in "
                f"{', '.join(f'data.{k} ({other.data[k]} vs {first.data[k]})' for k in differing)}: "
                f"override them on the command line (e.g. data.ways=5) or ensemble runs of one setting.")
    return configs


def evaluate(cfg: DictConfig) -> List[EpisodeResult]:
    """Score one run's checkpoint, or an ensemble of runs, on test-split episodes.

    Prints one line per run (and one for the ensemble) and appends each run's
    result to its own evals.jsonl; an ensemble's result is recorded with
    every member.
    """
    runs = list(cfg.run) if OmegaConf.is_list(cfg.run) else [cfg.run]
    if not runs:
        raise MetalearnError("run=[] names no run folder: give one folder, or several as run=[a,b,c].")
    configs = member_configs(cfg) if len(runs) > 1 else [cfg]
    for member in configs:
        validate(member)
    lead = configs[0]
    device = resolve_device(lead.device.name)
    data = lead.data
    sampler = EpisodeSampler(load_split(data, "test"), data.ways, data.shots, data.queries, device,
                             seed=lead.eval.seed)
    members = [_load_member(member, device) for member in configs]
    results = score_episodes([algo for algo, _ in members], sampler, lead.eval.episodes,
                             lead.train.meta_batch_size, "evaluating")
    records = [_record(result, member, step) for result, member, (_, step) in zip(results, configs, members)]
    for result, member in zip(results, configs):
        line = _describe(result, data, f"{_checkpoint_name(member)}.pt")
        print(line if len(configs) == 1 else f"{member.run}: {line}")
    if len(configs) > 1:
        ensemble = results[-1]
        print(f"ensemble of {len(configs)}: {_describe(ensemble, data, 'mean class probabilities')}")
        shared = {"members": [str(member.run) for member in configs], **asdict(ensemble)}
        for record in records:
            record["ensemble"] = shared
    for record, member in zip(records, configs):
        _append(Path(member.run), record)
        log.info("%s: %s", member.run, json.dumps(record))
    return results
