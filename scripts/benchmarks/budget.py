"""Time to accuracy: MAML 5-way 1-shot on the real Omniglot, the same wall-clock budget for metalearn and learn2learn.

- metalearn: `metalearn train algo=maml data.root=<root> seed=0 train.max_minutes=<budget>`, its defaults
  otherwise, but validating only at the end (`train.val_every=${train.steps}`): a fresh process whose
  budget is all training, as learn2learn's is; the one validation, which the limit triggers, runs after it.
- learn2learn: its MAML example's loop (`l2l.algorithms.MAML`, `clone()` / `adapt()` per task, one
  `backward()` per task, Adam on the averaged gradients) drawing tasks with its own `TaskDataset`
  (NWays, KShots, LoadData, RemapLabels, ConsecutiveLabels) over the same training classes and images,
  until the budget is spent. The example's extra validation batch each iteration is left out, so both
  libraries spend the whole budget on training.
- Each library is scored in the precision it trained in (metalearn's device.amp=auto: bf16 where the CPU
  computes it natively; learn2learn's float32 weights in float32, not under bf16 autocast); each row
  prints it.

Both start from the same initial weights (metalearn's seed-0 conv4, copied into learn2learn's `ConvBase`)
with metalearn's MAML hyperparameters (inner_lr 0.4, 1 inner step, second order, 15 queries per class,
meta-batch 32, Adam 1e-3). Both final models (metalearn's last.pt) are then scored by the same code,
metalearn's evaluation (10 adaptation steps), on the same 600 test episodes (eval.seed 0). The libraries
run one after the other, each on every core.

    python scripts/bench.py budget 20      # 20 minutes per library (about 42 minutes in all)
    python scripts/bench.py budget 1       # a quick look
    python scripts/bench.py budget 20 --overrides algo.inner_lr=0.1   # other hyperparameters, for both
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from metalearn.algorithms import build_algorithm
from metalearn.config.compose import compose
from metalearn.data import EpisodeSampler, build_dataset, load_split
from metalearn.data.transforms import preprocess_of
from metalearn.device import resolve_fast_paths
from metalearn.evaluate import run_episodes
from metalearn.storage.checkpoint import checkpoint_path, load_checkpoint

from .common import add_data_root, cpu_header, write_json
from .learn2learn_examples import Learn2LearnMAML, learn2learn_names

EPISODES = 600


def run_overrides(data_root: str, seed: int, extra=()) -> list:
    """metalearn's MAML with its defaults (`extra`: overrides for both libraries, e.g. algo.inner_lr=0.1)."""
    return ["algo=maml", f"data.root={Path(data_root).resolve()}", f"seed={seed}", *extra]


LEARN2LEARN_PRECISION = "device.amp=false"  # its example trains in float32: scored in float32 too


def precision(cfg) -> str:
    """What a config computes in on this CPU: bf16 (autocast) or float32."""
    return "bf16" if resolve_fast_paths(cfg.device, torch.device("cpu")).amp else "float32"


def budget_overrides(overrides: list, minutes: float, folder: Path) -> list:
    """The run's overrides for a budget of `minutes`: validation only when the limit is reached, after the
    budget (as learn2learn's loop, which never validates), whatever `overrides` say."""
    return [*overrides, f"train.max_minutes={minutes}", "train.val_every=${train.steps}", f"hydra.run.dir={folder}"]


def train_metalearn(overrides: list, minutes: float, folder: Path) -> int:
    """metalearn's own command for `minutes`; the steps it did."""
    folder = Path(folder).resolve()
    command = [sys.executable, "-m", "metalearn", "train", *budget_overrides(overrides, minutes, folder)]
    # not from a source checkout's folder: `python -m` would import its metalearn, whose conf/ is elsewhere
    done = subprocess.run(command, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise SystemExit(f"metalearn train failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return int(load_checkpoint(checkpoint_path(folder, "last"))["step"])


def initial_weights(cfg) -> dict:
    """The weights `metalearn train` starts from, made in its order: its seed, the training split, the algorithm."""
    torch.manual_seed(cfg.seed)
    split = build_dataset(cfg.data).load_split("train")
    algo = build_algorithm(cfg, torch.device("cpu"), split.num_classes, split.image_shape)
    return {k: v.detach().clone() for k, v in algo.model.state_dict().items()}


def learn2learn_taskset(cfg, split):
    """learn2learn's task sampling over the runner's training classes and images (preprocessed as the
    runner's sampler feeds them)."""
    import learn2learn as l2l
    from learn2learn.data.transforms import ConsecutiveLabels, KShots, LoadData, NWays, RemapLabels

    images = preprocess_of(cfg.data, training=True).normalize(split.images.float().div_(255))
    dataset = torch.utils.data.TensorDataset(images, split.labels)
    by_label = {}
    for index, label in enumerate(split.labels.tolist()):
        by_label.setdefault(label, []).append(index)
    meta = l2l.data.MetaDataset(dataset, labels_to_indices=by_label)
    task = cfg.task
    transforms = [
        NWays(meta, task.ways),
        KShots(meta, task.shots + task.queries),
        LoadData(meta),
        RemapLabels(meta),
        ConsecutiveLabels(meta),
    ]
    return l2l.data.TaskDataset(meta, task_transforms=transforms, num_tasks=-1)


def train_learn2learn(cfg, split, weights: dict, minutes: float) -> tuple:
    """learn2learn's example loop for `minutes` of wall-clock time; its steps and its final weights by
    metalearn's names."""
    task, algo = cfg.task, cfg.algo
    l2l_maml = Learn2LearnMAML(task.ways, algo.inner_lr, algo.inner_steps, algo.first_order)
    names = list(weights)
    module = l2l_maml.maml.module
    with torch.no_grad():
        for theirs, mine in zip(learn2learn_names(task.ways), names, strict=False):
            module.get_parameter(theirs).copy_(weights[mine])
    for group in l2l_maml.optimizer.param_groups:
        group["lr"] = algo.outer_lr
    taskset = learn2learn_taskset(cfg, split)
    per_class = task.shots + task.queries
    support = (torch.arange(task.ways * per_class) % per_class) < task.shots
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < minutes * 60:
        tasks = []
        for _ in range(cfg.train.meta_batch_size):
            data, labels = taskset.sample()
            tasks.append((data[support], labels[support], data[~support], labels[~support]))
        l2l_maml.train_on(tasks)
        steps += 1
    final = dict(weights)
    for theirs, mine in zip(learn2learn_names(task.ways), names, strict=False):
        final[mine] = module.get_parameter(theirs).detach().clone()
    return steps, final


def score(cfg, weights: dict, episodes: int = EPISODES):
    """metalearn's evaluation of these weights on the test episodes of eval.seed (as `metalearn eval`)."""
    test = load_split(cfg.data, "test")
    algo = build_algorithm(cfg, torch.device("cpu"), 0, test.image_shape)
    algo.model.load_state_dict(weights)
    task = cfg.task
    sampler = EpisodeSampler(
        test, task.ways, task.shots, task.queries, "cpu", seed=cfg.eval.seed, preprocess=preprocess_of(cfg.data)
    )
    return run_episodes(algo, sampler, episodes, cfg.eval.batch_size, "scoring")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("minutes", type=float, metavar="MINUTES", help="training time per library")
    add_data_root(parser)
    parser.add_argument("--overrides", nargs="*", default=[], help="of both libraries' MAML, e.g. algo.inner_lr=0.1")
    parser.add_argument("--runs-dir", help="where metalearn's run is written (default: a new temporary folder)")
    parser.add_argument("--json", help="also write the rows to this file")


def run(args) -> None:
    minutes = args.minutes
    overrides = run_overrides(args.data_root, 0, args.overrides)
    cfg = compose(overrides)
    print(cpu_header())
    print(
        f"MAML {cfg.task.ways}-way {cfg.task.shots}-shot, real Omniglot, {minutes:g} minutes of training per library, "
        f"one after the other; scored on the same {EPISODES} test episodes (eval.seed {cfg.eval.seed})"
    )
    if args.overrides:
        print(f"with, for both libraries: {' '.join(args.overrides)}")
    split = load_split(cfg.data, "train")
    weights = initial_weights(cfg)
    folder = Path(args.runs_dir or tempfile.mkdtemp(prefix="metalearn-budget-")) / "metalearn"
    rows = []
    ours = train_metalearn(overrides, minutes, folder)
    ours_weights = load_checkpoint(checkpoint_path(folder, "last"))["algo"]["model"]
    rows.append({"library": "metalearn", "steps": ours, "result": score(cfg, ours_weights)})
    print(f"metalearn: {ours} steps ({folder})", flush=True)
    their_cfg = compose([*overrides, LEARN2LEARN_PRECISION])
    theirs, their_weights = train_learn2learn(cfg, split, weights, minutes)
    rows.append({"library": "learn2learn", "steps": theirs, "result": score(their_cfg, their_weights)})
    rows[0]["precision"], rows[1]["precision"] = precision(cfg), precision(their_cfg)
    print(f"learn2learn: {theirs} steps", flush=True)
    batch = cfg.train.meta_batch_size
    # Each library trained and is scored in its own precision, printed on its row.
    header = f"{'library':<12} {'precision':>9} {'minutes':>7} {'steps':>6} {'tasks':>7} {'test accuracy':>15}"
    print(f"{header} {'steps vs l2l':>12}")
    for row in rows:
        result = row["result"]
        ratio = row["steps"] / max(theirs, 1)
        print(
            f"{row['library']:<12} {row['precision']:>9} {minutes:>7g} {row['steps']:>6} {row['steps'] * batch:>7} "
            f"{100 * result.accuracy:>7.2f} ± {100 * result.ci95:<5.2f} {ratio:>11.2f}x"
        )
    if args.json:
        payload = [
            {"library": r["library"], "precision": r["precision"], "minutes": minutes, "steps": r["steps"]}
            | vars(r["result"])
            for r in rows
        ]
        write_json(args.json, payload)
