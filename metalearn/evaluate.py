"""Episodic evaluation: mean accuracy +- 95% confidence interval over N episodes.

`metalearn eval` and validation during training share `run_episodes`.
Episode i of a seed is one fixed task (see metalearn.data.sampler), so two
checkpoints, two algorithms, any batch size and any device are scored on
exactly the same tasks; `episode_digest` in each record fingerprints them.
"""

import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import metalearn
from metalearn import distributed
from metalearn.algorithms import Algorithm, build_algorithm, run_dtype
from metalearn.confidence import ci95
from metalearn.config.schema import EnsembleMean
from metalearn.config.validate import validate
from metalearn.data import EpisodeSampler, load_split
from metalearn.data.transforms import preprocess_of
from metalearn.device import cpu_isa, cpu_model, resolve_device
from metalearn.distributed import SINGLE, Ranks
from metalearn.errors import MetalearnError
from metalearn.export.format import is_export, load_export, record_folder
from metalearn.storage.atomic import file_sha256, json_line
from metalearn.storage.checkpoint import (
    checkpoint_name,
    checkpoint_path,
    kept_score,
    load_algo_state,
    load_checkpoint,
    ranked_checkpoints,
    top_count,
    weights_only,
)
from metalearn.storage.run_folder import quoted, replay_run_overrides

log = logging.getLogger(__name__)

CPU_BATCH = 50  # episodes scored at once on a CPU: tasks run one by one there, this only bounds memory


@dataclass
class EpisodeResult:
    accuracy: float  # fraction in [0, 1]
    ci95: float  # half-width of the 95% interval, same unit
    loss: float
    episodes: int
    episode_digest: str = ""  # sha256 of the scored episodes' image ids
    batch_size: int = 0  # episodes scored at once (the last size tried)
    diverged_episodes: int = 0  # episodes with a query whose logits are not all finite: those queries count as wrong


def auto_batch_size(requested: int | None, episodes: int, device: torch.device) -> int:
    """eval.batch_size, or by default all episodes at once on a GPU (halved on out-of-memory), 50 on a CPU."""
    if requested is not None:
        return min(requested, episodes)
    return min(episodes, episodes if torch.device(device).type == "cuda" else CPU_BATCH)


def score_episodes(
    algos: Sequence[Algorithm],
    sampler: EpisodeSampler,
    episodes: int,
    batch_size: int | None,
    desc: str,
    ranks: Ranks = SINGLE,
    ensemble: EnsembleMean = EnsembleMean.probabilities,
) -> list[EpisodeResult]:
    """Each algorithm's result on episodes 0..episodes-1; with several, the ensemble's last.

    The ensemble averages the members' class probabilities per query, its
    log-probabilities serving as logits for accuracy and loss, or with
    `ensemble=logits` their logits (see with_ensemble). A query whose
    logits are not all finite (a diverged adaptation) counts as wrong, for
    the ensemble too when one member's are; its episode counts as diverged
    (`diverged_episodes`), and its loss stays non-finite. `batch_size`
    episodes are scored at a time (None: auto_batch_size); it changes neither
    the episodes nor the result. On several processes each scores its part of
    every batch and the per-episode figures are gathered, so the interval is
    over all episodes.
    """
    size = auto_batch_size(batch_size, episodes, sampler.device)
    tallies = [Tally() for _ in range(len(algos) + (len(algos) > 1))]
    digest = hashlib.sha256()
    with tqdm(total=episodes, desc=desc, unit="ep", leave=False, dynamic_ncols=True, disable=not ranks.main) as bar:
        done = 0
        while done < episodes:
            count = min(size, episodes - done)
            ids = sampler.episode_ids(done, count)
            mine = ids[ranks.part(count)]  # all of them in one process
            batch = sampler.gather(mine)
            try:
                all_logits = [algo.predict(batch).float() for algo in algos] if len(mine) else []
            except torch.cuda.OutOfMemoryError:
                size = smaller_batch(count, bar)
                del batch
                torch.cuda.empty_cache()
                continue
            digest.update(ids.numpy().tobytes())
            outputs = with_ensemble(all_logits, ensemble)
            for i, tally in enumerate(tallies):
                tally.add(outputs[i] if outputs else None, batch.query_labels, len(mine), count, ranks)
            done += count
            bar.update(count)
    return [tally.result(episodes, digest.hexdigest(), size) for tally in tallies]


def smaller_batch(count: int, bar: tqdm) -> int:
    """After running out of GPU memory on `count` episodes at once: half as many (one is an error)."""
    if count == 1:
        raise MetalearnError(
            "one evaluation episode does not fit in GPU memory: evaluate with fewer "
            "task.queries, or on the CPU (device=cpu)."
        ) from None
    size = count // 2
    bar.write(f"out of GPU memory scoring {count} episodes at once: trying {size} (eval.batch_size)")
    return size


def with_ensemble(
    all_logits: list[torch.Tensor], mean: EnsembleMean = EnsembleMean.probabilities
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, finite per query) of each member, and of the ensemble after them when there are several: the log
    of the members' mean class probabilities, or (mean=logits) the mean of their logits."""
    finite = [torch.isfinite(x).all(dim=-1) for x in all_logits]  # per query
    if len(all_logits) > 1:
        if EnsembleMean(mean) is EnsembleMean.logits:
            combined = torch.stack(all_logits).mean(dim=0)
        else:
            combined = torch.stack([x.softmax(dim=-1) for x in all_logits]).mean(dim=0).log()
        all_logits = [*all_logits, combined]
        # not the ensemble's own log-probabilities: log(0) is -inf for a confident, healthy ensemble
        finite.append(torch.stack(finite).all(dim=0))
    return list(zip(all_logits, finite, strict=True))


@dataclass
class Tally:
    """One scored output's per-episode figures so far, gathered from every process."""

    losses: list[torch.Tensor] = field(default_factory=list)
    accuracies: list[torch.Tensor] = field(default_factory=list)
    diverged: list[torch.Tensor] = field(default_factory=list)

    def add(self, output, labels: torch.Tensor, mine: int, count: int, ranks: Ranks) -> None:
        """This process's `mine` of a batch of `count` episodes; `output` (logits, finite) is None when it has none."""
        loss, accuracy = torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        failed = torch.zeros(0, dtype=torch.float64)
        if output is not None:
            logits, finite = output
            flat = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
            loss = flat.view(mine, -1).double().mean(dim=1).cpu()
            # the argmax of NaN logits is class 0: right for 1/ways of the queries by chance alone
            correct = (logits.argmax(dim=-1) == labels) & finite
            accuracy = correct.double().mean(dim=1).cpu()
            failed = (~finite).any(dim=1).double().cpu()
        self.losses.append(ranks.gather(loss, count))
        self.accuracies.append(ranks.gather(accuracy, count))
        self.diverged.append(ranks.gather(failed, count))

    def result(self, episodes: int, digest: str, batch_size: int) -> EpisodeResult:
        accuracy = torch.cat(self.accuracies).double()
        spread = accuracy.std().item() if episodes > 1 else 0.0
        return EpisodeResult(
            accuracy=accuracy.mean().item(),
            ci95=ci95(spread, episodes),
            loss=torch.cat(self.losses).double().mean().item(),
            episodes=episodes,
            episode_digest=digest,
            batch_size=batch_size,
            diverged_episodes=int(torch.cat(self.diverged).sum().item()),
        )


def run_episodes(
    algo: Algorithm, sampler: EpisodeSampler, episodes: int, batch_size: int, desc: str, ranks: Ranks = SINGLE
) -> EpisodeResult:
    return score_episodes([algo], sampler, episodes, batch_size, desc, ranks)[0]


def scored_file(cfg: DictConfig) -> str:
    """What was scored: `best.pt` / `last.pt` of a run, or the name of an exported file."""
    return Path(cfg.run).name if is_export(cfg.run) else f"{checkpoint_name(cfg)}.pt"


@dataclass
class Member:
    """One evaluated checkpoint: its algorithm with the checkpoint's weights, and what identifies the checkpoint."""

    algo: Algorithm
    step: int
    sha256: str
    file: str = ""  # what was scored: best.pt, last.pt, next_best/step-<step>.pt or an exported file's name
    val_accuracy: float | None = None  # checkpoint=topN: the validation accuracy it was kept for


def _member(cfg: DictConfig, ckpt: dict, path: Path, file: str, device: torch.device, image_shape) -> Member:
    algo = build_algorithm(cfg, device, ckpt.get("train_classes", 0), image_shape)
    load_algo_state(algo, weights_only(ckpt["algo"]), path)  # no optimizer: scoring never builds one
    return Member(algo, ckpt["step"], file_sha256(path), file)


def _load_member(cfg: DictConfig, device: torch.device, image_shape) -> Member:
    """A run's checkpoint, or a file `metalearn export` wrote, loaded into the algorithm its config builds."""
    path = Path(cfg.run) if is_export(cfg.run) else checkpoint_path(Path(cfg.run), checkpoint_name(cfg))
    ckpt = load_export(path) if is_export(cfg.run) else load_checkpoint(path)
    return _member(cfg, ckpt, path, scored_file(cfg), device, image_shape)


def top_checkpoints(cfg: DictConfig, count: int) -> list[tuple]:
    """checkpoint=topN: the run's N best validation checkpoints, best first, as (file under checkpoints/, payload).

    A run that keeps fewer is an error that says how many it keeps and how to keep more.
    """
    if is_export(cfg.run):
        raise MetalearnError(
            f"{cfg.run} is an exported file, a single checkpoint: checkpoint=top{count} scores the {count} best "
            f"validation checkpoints of a run folder trained with train.keep_best={count}."
        )
    run = Path(cfg.run)
    ranked = ranked_checkpoints(run)
    if len(ranked) >= count:
        return ranked[:count]
    have = len(ranked)
    kept = f"{have} ({', '.join(name for name, _ in ranked)})" if ranked else "none"
    trained_with = cfg.train.keep_best
    if trained_with < count:
        how = (
            f"it was trained with train.keep_best={trained_with}. Train a run with train.keep_best={count} "
            f"(or more) to keep its {count} best, e.g. metalearn train ... train.keep_best={count}"
        )
    else:
        how = (
            f"it was trained with train.keep_best={trained_with} but validated with a finite loss only {have} "
            f"time(s) so far (one checkpoint per validation, every train.val_every steps). Train it longer: "
            f"metalearn train resume={quoted(str(run))} train.steps=<more>"
        )
    fewer = f", or score fewer: checkpoint=top{have}" if have else ""
    raise MetalearnError(
        f"checkpoint=top{count} is the ensemble of a run's {count} best validation checkpoints, but {run} keeps "
        f"{kept}: {how}{fewer}."
    )


def hardware(device: torch.device) -> str:
    """The processor that computed a result, named so figures from different machines are not mixed up."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({cpu_isa()})"


def _describe(result: EpisodeResult, cfg: DictConfig, what: str) -> str:
    return (
        f"test accuracy {100 * result.accuracy:.2f}% ± {100 * result.ci95:.2f} "
        f"({result.episodes} episodes, {cfg.data.name} {cfg.task.ways}-way {cfg.task.shots}-shot, {what})"
        f"{diverged_note(result)}"
    )


def diverged_note(result: EpisodeResult) -> str:
    """What follows a score some of whose episodes diverged; nothing when none did."""
    if not result.diverged_episodes:
        return ""
    return (
        f" — {result.diverged_episodes} of {result.episodes} episodes diverged (non-finite predictions), "
        f"counted as wrong"
    )


def warn_diverged(results: Sequence[EpisodeResult], names: Sequence[str], part: str) -> None:
    """A warning per result with diverged episodes (zip: a name per result, the ensemble's last)."""
    for result, name in zip(results, names, strict=False):
        if result.diverged_episodes:
            log.warning(
                "%s: %d of %d %s episodes diverged: their predictions are not finite (NaN or infinite logits), "
                "so their queries count as wrong. The adaptation to a task blew up: a smaller algo.inner_lr or "
                "fewer inner steps usually avoids it.",
                name,
                result.diverged_episodes,
                result.episodes,
                part,
            )


def _record(result: EpisodeResult, cfg: DictConfig, member: Member, device: torch.device) -> dict:
    """Everything that makes the result reproducible: the tasks, the model's settings, the checkpoint, the machine."""
    data, task = cfg.data, cfg.task
    return {
        **asdict(result),
        "dataset": data.name,
        "split": data.get("split"),
        "part": "test",
        "ways": task.ways,
        "shots": task.shots,
        "queries": task.queries,
        "seed": cfg.eval.seed,
        "algo": cfg.algo.name,
        "inner_steps_eval": cfg.algo.get("inner_steps_eval"),
        "batch_norm": getattr(member.algo.model, "batch_norm", "none"),
        "checkpoint": member.file,
        "step": member.step,
        "checkpoint_sha256": member.sha256,
        "metalearn": metalearn.__version__,
        "torch": torch.__version__,
        "device": str(device),
        "hardware": hardware(device),
        "time": datetime.now().isoformat(timespec="seconds"),
    }


def _append(run_dir: Path, record: dict) -> None:
    """Add the result to the run's evals.jsonl; a run folder that cannot be written keeps the printed result only."""
    try:
        with open(run_dir / "evals.jsonl", "a") as handle:
            handle.write(json_line(record))
    except OSError as err:
        print(
            f"metalearn: note: the result above could not be saved in {run_dir / 'evals.jsonl'} "
            f"({err.strerror or err}); it is printed only.",
            file=sys.stderr,
        )


# What every ensemble member must share: the tasks they are scored on.
TASK_KEYS = ("data.name", "data.split", "task.ways", "task.shots", "task.queries")


def member_configs(cfg: DictConfig) -> list[DictConfig]:
    """One composed config per run of `run=[a,b,...]`: each run's saved overrides, then this command's."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    given = [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].lstrip("+~") not in ("run", "resume")]
    configs = [
        compose(
            "eval", overrides=replay_run_overrides(str(r), given, drop=("run", "resume")) + [f"run={quoted(str(r))}"]
        )
        for r in cfg.run
    ]
    first = configs[0]
    for other in configs[1:]:
        values = {k: (OmegaConf.select(other, k), OmegaConf.select(first, k)) for k in TASK_KEYS}
        differing = [k for k, (mine, theirs) in values.items() if mine != theirs]
        if differing:
            raise MetalearnError(
                f"ensemble members must be scored on the same tasks, but {other.run} and {first.run} differ in "
                f"{', '.join(f'{k} ({values[k][0]} vs {values[k][1]})' for k in differing)}: "
                f"override them on the command line (e.g. task.ways=5) or ensemble runs of one setting."
            )
    return configs


def evaluate(cfg: DictConfig) -> list[EpisodeResult]:
    """Score one run's checkpoint, an ensemble of runs, or the ensemble of a run's best checkpoints, on
    test-split episodes.

    Prints one line per member (and one for the ensemble). An ensemble of runs appends each run's result
    to its own evals.jsonl, recorded with the ensemble's; checkpoint=topN appends one record, the
    ensemble's, which lists its members (file, step, validation and test accuracy). What an ensemble averages
    (eval.ensemble) is recorded as `averaged`.
    """
    configs, top = _evaluated_configs(cfg)
    mean = ensemble_mean(configs)
    lead = configs[0]
    chosen = top_checkpoints(lead, top) if top is not None else None  # before any data is read: a clear error
    device = resolve_device(lead.device.name)
    ranks = distributed.start(device, lead.device.dist_timeout_s)  # under torchrun: each scores its part of every batch
    device = ranks.device(device)
    ranks.share_threads(device)
    test_split = load_split(lead.data, "test")
    sampler = EpisodeSampler(
        test_split,
        lead.task.ways,
        lead.task.shots,
        lead.task.queries,
        device,
        seed=lead.eval.seed,
        dtype=run_dtype(lead),
        preprocess=preprocess_of(lead.data),
    )
    if chosen is not None:
        members = _top_members(lead, chosen, device, test_split.image_shape)
        del chosen  # the weights are in the members now
    else:
        members = [_load_member(member, device, test_split.image_shape) for member in configs]
    results = score_episodes(
        [m.algo for m in members], sampler, lead.eval.episodes, lead.eval.batch_size, "evaluating", ranks, mean
    )
    if not ranks.main:
        return results  # rank 0 prints and records the result, the same on every rank
    solo = top is not None or len(configs) == 1
    names = [member.file for member in members] if solo else [str(config.run) for config in configs]
    warn_diverged(results, [*names, "the ensemble"], "test")
    if top is not None:
        _record_top(results, lead, members, device, mean)
    else:
        _record_runs(results, configs, members, device, mean)
    return results


# How an ensemble's line names what it averaged.
AVERAGED = {EnsembleMean.probabilities: "mean class probabilities", EnsembleMean.logits: "mean logits"}


def ensemble_mean(configs: list[DictConfig]) -> EnsembleMean:
    """eval.ensemble, as the scored runs' configs have it (each run's own, then this command's overrides)."""
    means = {str(config.run): EnsembleMean(config.eval.ensemble) for config in configs}
    if len(set(means.values())) > 1:
        listed = ", ".join(f"{run} (eval.ensemble={mean.value})" for run, mean in means.items())
        raise MetalearnError(
            f"the runs of this ensemble are set to average different things: {listed}. Choose one for all "
            f"of them on the command line: eval.ensemble=probabilities or eval.ensemble=logits."
        )
    return next(iter(means.values()))


def _evaluated_configs(cfg: DictConfig) -> tuple[list[DictConfig], int | None]:
    """The config of each run scored (run=[a,b,...]: one per run), checked; N of checkpoint=topN (else None)."""
    runs = list(cfg.run) if OmegaConf.is_list(cfg.run) else [cfg.run]
    if not runs:
        raise MetalearnError("run=[] names no run folder: give one folder, or several as run=[a,b,c].")
    top = top_count(checkpoint_name(cfg))
    if top is not None and len(runs) > 1:
        raise MetalearnError(
            f"checkpoint=top{top} is the ensemble of one run's {top} best checkpoints: evaluate one run with it, "
            f"or ensemble runs with checkpoint=best or checkpoint=last."
        )
    configs = member_configs(cfg) if len(runs) > 1 else [cfg]
    for member in configs:
        validate(member)
    return configs, top


def _top_members(cfg: DictConfig, chosen: list[tuple], device: torch.device, image_shape) -> list[Member]:
    """checkpoint=topN: a member per kept checkpoint, with the validation accuracy it was kept for."""
    folder = checkpoint_path(Path(cfg.run), "best").parent
    members = [_member(cfg, payload, folder / name, name, device, image_shape) for name, payload in chosen]
    for member, (_, payload) in zip(members, chosen, strict=False):
        member.val_accuracy = kept_score(payload)
    return members


def _record_runs(
    results: list[EpisodeResult],
    configs: list[DictConfig],
    members: list[Member],
    device: torch.device,
    mean: EnsembleMean,
) -> None:
    """One run, or an ensemble of runs: each member's line (and the ensemble's), and a record in each run."""
    lead = configs[0]
    records = [
        _record(result, cfg_, member, device) for result, cfg_, member in zip(results, configs, members, strict=False)
    ]
    for result, config, member in zip(results, configs, members, strict=False):
        line = _describe(result, lead, member.file)
        print(line if len(configs) == 1 else f"{config.run}: {line}")
    if len(configs) > 1:
        ensemble = results[-1]
        print(f"ensemble of {len(configs)}: {_describe(ensemble, lead, AVERAGED[mean])}")
        shared = {"members": [str(member.run) for member in configs], "averaged": mean.value, **asdict(ensemble)}
        for record in records:
            record["ensemble"] = shared
    for record, member in zip(records, configs, strict=False):
        _append(record_folder(member.run), record)
        log.info("%s: %s", member.run, json.dumps(record))


def _record_top(
    results: list[EpisodeResult], cfg: DictConfig, members: list[Member], device: torch.device, mean: EnsembleMean
) -> None:
    """checkpoint=topN: each member's line, the ensemble's, and one record of the ensemble with its members."""
    for result, member in zip(results, members, strict=False):
        print(_describe(result, cfg, member.file))
    ensemble = results[-1]  # with one member (top1), that member
    if len(members) > 1:
        what = _describe(ensemble, cfg, AVERAGED[mean])
        print(f"ensemble of the {len(members)} best checkpoints: {what}")
    record = _record(ensemble, cfg, members[0], device)
    record.update(
        {
            "checkpoint": f"top{len(members)}",
            "step": None,  # one per member
            "checkpoint_sha256": None,
            **({"averaged": mean.value} if len(members) > 1 else {}),  # top1 is its one member
            "members": [
                {
                    "checkpoint": member.file,
                    "step": member.step,
                    "checkpoint_sha256": member.sha256,
                    "val_accuracy": member.val_accuracy,
                    "accuracy": result.accuracy,
                    "ci95": result.ci95,
                    "loss": result.loss,
                }
                for member, result in zip(members, results, strict=False)
            ],
        }
    )
    _append(record_folder(cfg.run), record)
    log.info("%s: %s", cfg.run, json.dumps(record))
