"""How far float32, bf16 (and TF32 on a GPU) move each algorithm's update and predictions from float64's.

For each algorithm (conf/algo) and each inner-step count its presets use
(conf/experiment/*.yaml, plus the algorithm YAML's own default), one config
is measured: the cheapest preset with that count (fewest training ways x
shots; the algorithm YAML alone where no preset has it). Every precision
starts from the float64 model's weights (and learned inner rates), cast, and
computes on the same batches (torch seeded per batch) and test episodes:

  float32     device.amp=false (on a GPU with TF32 off: plain float32 products)
  bf16        device.amp=true: bf16 autocast; "native" where the hardware
              computes bf16 (metalearn.device.native_bf16), else "emulated"
  tf32        on CUDA only: float32 with TF32 matmuls and convolutions

The update compared: the meta-gradient (`meta_gradients`) for the MAML
family and MAML++ (Meta-SGD's and MAML++'s learned rates included, named
inner_lr.<weight>); Reptile's mean adapted weights minus the weights; for
protonet, finetune and distill the gradient `meta_train_step` hands its
optimizer (whose step is disabled, so the weights never move). distill's
teacher is an untrained finetune network (seed 1) unless --checkpoint names a
distill run, whose own teacher is then read.

The columns (the update's, each the mean over --batches batches):

  task        the training batch: ways x shots episodes (--queries queries
              each where the algorithm reads them), or finetune's images
  cosine      of the whole update (all tensors as one vector) to float64's
  rel.err     ||g - g64|| / ||g64||
  worst       the smallest per-tensor cosine and that tensor; tensors whose
              float64 update is zero up to rounding (norm below 1e-6 of the
              largest tensor's, e.g. a conv bias right before BatchNorm) skipped
  norm ratio  ||g|| / ||g64||
  floor       the cosine of float64's own update at the weights rounded to
              bf16 and back, to the exact one: how much the update moves
              when the weights move by bf16's rounding (about 4e-3 relative)
              and nothing else changes. Read the bf16 row against it: a bf16
              cosine near the floor is what any perturbation of that size
              does at this point (second-order MAML with several inner steps
              is that sensitive, its ReLU and max-pool switches flip), not
              an error of the bf16 arithmetic. A floor near 1 with a low bf16
              cosine is the arithmetic's own loss.
  same        the share of test queries (--test-tasks episodes of the test
              split, the config's ways and shots, --queries queries) whose
              predicted class after adaptation (`predict`) equals float64's
  acc, acc64  that precision's and float64's accuracy on them

Reading it: the cosine counts every tensor, so Reptile's float32 row can
stand below the worst tensor's cosine: its inner Adam turns the rounding noise
of a conv bias whose float64 update is zero (BatchNorm follows it) into
full-size steps. On a CPU each precision computes in the config's layout
(channels-last by default, as the runner does); torch's channels-last float32
BatchNorm there is less accurate than its NCHW one (its error grows with a
channel's mean over its spread), which shows in the float32 rows of first-order
MAML and Reptile with several inner steps and in MAML's test-time predictions:
`--overrides device.channels_last=false` compares NCHW. From the initial
weights the MAML presets' test-time adaptation (10 steps at the code's
summed-loss rate) carries bf16's rounding so far that many predictions change;
--checkpoint gives a trained run's figure.

    python scripts/bench.py fidelity                           # every algorithm, real Omniglot
    python scripts/bench.py fidelity --algos maml reptile --batches 1
    python scripts/bench.py fidelity --checkpoint runs/maml/omniglot-5w1s/<time>  # a trained run's weights
    python scripts/bench.py fidelity --device cuda --json fidelity.json
    python scripts/bench.py fidelity --algos fomaml --overrides device.channels_last=false

Without Omniglot under --data-root the tasks are random images. Rows print
as they finish. --checkpoint measures that run's config alone (its algorithm,
inner steps and data, with --data-root as data.root), from its best.pt (else
last.pt) weights.
"""

import argparse
import contextlib
import functools
import importlib.resources
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from metalearn.algorithms import SavedRun, build_algorithm
from metalearn.config.compose import compose
from metalearn.data import ClassSplit, EpisodeSampler, load_split
from metalearn.data.transforms import preprocess_of
from metalearn.device import native_bf16
from metalearn.errors import MetalearnError
from metalearn.models import build_model
from metalearn.storage.checkpoint import checkpoint_path, load_checkpoint, weights_only
from metalearn.storage.run_folder import saved_overrides

from .common import (
    add_data_root,
    cpu_header,
    cpu_name,
    machine_fields,
    task_split,
    write_json,
)

ALGOS = ("maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile", "protonet", "finetune", "distill")
FLOAT64 = ("device.dtype=float64", "device.amp=false")
NEGLIGIBLE = 1e-6  # a tensor whose float64 update is below this share of the largest tensor's: zero, skipped
QUICK_TASKS, QUICK_TEST_TASKS, QUICK_QUERIES = 2, 4, 2
TEACHER_SEED = 1


@dataclass(frozen=True)
class Setting:
    """One measured config: an algorithm at one inner-step count (None: it has no inner steps)."""

    algo: str
    steps: int | None
    task: str  # the training batch: 20w1s (episodes), 16img (finetune's images)
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Precision:
    name: str  # as the table shows it
    overrides: tuple[str, ...]
    tf32: bool = False


# --- what to measure ------------------------------------------------------------------


def experiment_files() -> dict:
    """conf/experiment/*.yaml by preset name."""
    folder = importlib.resources.files("metalearn.conf") / "experiment"
    return {entry.name.removesuffix(".yaml"): entry for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def may_be_one_of(preset, algos: list[str]) -> bool:
    """False where the preset's defaults list picks an algorithm not in `algos` (composing it would be wasted)."""
    defaults = OmegaConf.to_container(OmegaConf.create(preset.read_text())).get("defaults", [])
    picked = [entry["override /algo"] for entry in defaults if isinstance(entry, dict) and "override /algo" in entry]
    return not picked or picked[-1] in algos


@functools.cache
def composed(overrides: tuple[str, ...]):
    """The config of `overrides` (read-only: builds share it)."""
    cfg = compose(list(overrides))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def inner_steps(cfg) -> int | None:
    return OmegaConf.select(cfg, "algo.inner_steps", default=None)


def training_task(cfg) -> tuple[int, int]:
    """The training episodes' (ways, shots)."""
    train = cfg.task.train
    return (train.ways or cfg.task.ways, train.shots or cfg.task.shots)


def setting_of(cfg, overrides: list[str]) -> Setting:
    ways, shots = training_task(cfg)
    images = OmegaConf.select(cfg, "algo.batch_size", default=None)  # finetune, distill: batches of images
    task = f"{ways}w{shots}s" if images is None else f"{images}img"
    return Setting(cfg.algo.name, inner_steps(cfg), task, tuple(overrides))


def preset_settings(algos: list[str], teacher_overrides: list[str], extra: list[str]) -> list[Setting]:
    """Per algorithm and inner-step count of its presets (and its YAML's default): the cheapest config,
    with the `extra` overrides."""
    candidates = {}  # (algo, steps) -> [(cost, is the bare algorithm YAML, Setting)]
    for name, preset in sorted(experiment_files().items()):
        if not may_be_one_of(preset, algos):
            continue
        overrides = [f"experiment={name}", *extra]
        cfg = composed(tuple(overrides))
        if cfg.algo.name in algos:
            ways, shots = training_task(cfg)
            setting = setting_of(cfg, overrides)
            candidates.setdefault((setting.algo, setting.steps), []).append((ways * shots, False, setting))
    for algo in algos:
        overrides = [f"algo={algo}", *(teacher_overrides if algo == "distill" else []), *extra]
        cfg = composed(tuple(overrides))
        ways, shots = training_task(cfg)
        setting = setting_of(cfg, overrides)
        candidates.setdefault((algo, setting.steps), []).append((ways * shots, True, setting))
    order = {algo: i for i, algo in enumerate(algos)}
    keys = sorted(candidates, key=lambda key: (order[key[0]], key[1] or 0))
    return [min(candidates[key], key=lambda c: c[:2])[2] for key in keys]


def precisions(device: torch.device) -> list[Precision]:
    native, _ = native_bf16(device)
    found = [
        Precision("float32", ("device.amp=false",)),
        Precision(f"bf16 {'native' if native else 'emulated'}", ("device.amp=true",)),
    ]
    if device.type == "cuda":
        found.append(Precision("tf32", ("device.amp=false",), tf32=True))
    return found


# --- the data -----------------------------------------------------------------------------


@dataclass
class Shared:
    """What every setting of one invocation shares: the device, the splits, and the weights to start from."""

    device: torch.device
    train: ClassSplit
    test: ClassSplit
    train_classes: int
    state: dict | None = None  # a checkpoint's algorithm state (weights only); None: the initial weights
    teacher: dict | None = None  # an in-memory teacher run's last.pt for distill


def untrained_teacher(classes: int, image_shape) -> dict:
    """What a finished finetune run's last.pt holds as far as distill reads it, for a freshly built network."""
    cfg = compose(["algo=finetune"])
    torch.manual_seed(TEACHER_SEED)
    network = build_model(cfg.model, classes, image_shape)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return {"config": config, "train_classes": classes, "algo": {"model": network.state_dict()}}


def checkpoint_file(run_dir: Path) -> Path:
    best = checkpoint_path(run_dir, "best")
    return best if best.is_file() else checkpoint_path(run_dir, "last")


# --- building and copying weights --------------------------------------------------------


def cast_tensors(value, convert):
    """`value` with each floating tensor, in nested dicts and lists, passed through `convert`."""
    if isinstance(value, torch.Tensor):
        return convert(value) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: cast_tensors(item, convert) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(cast_tensors(item, convert) for item in value)
    return value


def bf16_rounded(state: dict) -> dict:
    """The state with the model's floating tensors rounded to bf16 and back (the learned rates kept)."""
    return {**state, "model": cast_tensors(state["model"], lambda t: t.to(torch.bfloat16).to(t.dtype))}


def build(setting: Setting, extra: tuple[str, ...], shared: Shared, dtype: torch.dtype, state: dict | None):
    """The setting's algorithm with `extra` overrides, in `dtype`, holding `state` (None: its initial weights)."""
    cfg = composed((*setting.overrides, *extra))
    torch.manual_seed(0)
    algo = build_algorithm(cfg, shared.device, shared.train_classes, shared.train.image_shape, dtype=dtype)
    if shared.teacher is not None and hasattr(algo, "teacher_run"):
        payload = shared.teacher
        algo.teacher_run = SavedRun("an untrained finetune network", lambda: payload)
    if state is not None:
        algo.load_state_dict(cast_tensors(state, lambda t: t.to(dtype)))
    return algo, cfg


def samplers(cfg, shared: Shared, dtype: torch.dtype, queries: int, needs_queries: bool):
    """The training sampler (the config's training ways and shots) and the test one, both seed 0."""
    ways, shots = training_task(cfg)
    preprocess = preprocess_of(cfg.data)  # the normalisation, no augmentation: the same images for all
    train = EpisodeSampler(
        shared.train,
        ways,
        shots,
        queries if needs_queries else 0,
        shared.device,
        seed=0,
        dtype=dtype,
        preprocess=preprocess,
    )
    test = EpisodeSampler(
        shared.test,
        cfg.task.ways,
        cfg.task.shots,
        queries,
        shared.device,
        seed=0,
        dtype=dtype,
        preprocess=preprocess,
    )
    return train, test


@contextlib.contextmanager
def tf32(device: torch.device, enabled: bool):
    """TF32 matmuls and convolutions on or off on CUDA (cuDNN's convolutions default to on), as they were after."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# --- the update each algorithm takes -----------------------------------------------------


def step_gradient(algo, batch) -> dict[str, torch.Tensor]:
    """The gradient `meta_train_step` hands its optimizer, caught at the optimizer's step, which does nothing."""
    optimizer = algo.optimizer  # the cached optimizer, built now so that its step can be replaced
    caught = {}

    def catch(self, *args, **kwargs):
        params = algo.model.named_parameters()
        caught.update({name: p.grad.detach().clone() for name, p in params if p.grad is not None})

    optimizer.step = types.MethodType(catch, optimizer)  # a method, as a learning-rate scheduler wraps it
    with warnings.catch_warnings():  # a learning-rate scheduler built before notes the replaced step
        warnings.simplefilter("ignore", UserWarning)
        algo.meta_train_step(batch)
    return caught


def update_direction(algo, batch) -> dict[str, torch.Tensor]:
    """The algorithm's update on `batch` by tensor name, without applying it."""
    if hasattr(algo, "meta_gradients"):  # the MAML family and MAML++
        return algo.meta_gradients(batch)
    if hasattr(algo, "adapted_weights"):  # Reptile: towards the mean adapted weights
        with torch.no_grad():
            adapted, _ = algo.adapted_weights(batch)
            return {name: adapted[name].mean(dim=0) - p for name, p in algo.model.named_parameters()}
    return step_gradient(algo, batch)


def directions(algo, sampler: EpisodeSampler, tasks: int, batches: int, device, use_tf32: bool) -> list[dict]:
    """The update on each of `batches` batches, each drawn after seeding torch with its number."""
    found = []
    with tf32(device, use_tf32):
        for number in range(batches):
            torch.manual_seed(number)
            batch = algo.sample(sampler, tasks)
            found.append({name: g.detach().double() for name, g in update_direction(algo, batch).items()})
    return found


def predictions(algo, episodes, device, use_tf32: bool) -> torch.Tensor:
    with tf32(device, use_tf32):
        return algo.predict(episodes).argmax(dim=-1)


# --- the comparison ------------------------------------------------------------------------


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denominator = (a.norm() * b.norm()).item()
    return (a * b).sum().item() / denominator if denominator > 0 else float("nan")


def compare(update: dict, reference: dict) -> dict:
    """Cosine, relative error and norm ratio of `update` against `reference` over all their tensors, and the
    cosine of each tensor whose reference is not zero up to rounding."""
    names = list(reference)
    g = torch.cat([update[name].flatten() for name in names])
    g64 = torch.cat([reference[name].flatten() for name in names])
    norms = {name: reference[name].norm().item() for name in names}
    largest = max(norms.values())
    return {
        "cosine": cosine(g, g64),
        "rel_err": ((g - g64).norm() / g64.norm()).item(),
        "norm_ratio": (g.norm() / g64.norm()).item(),
        "tensors": {
            name: cosine(update[name].flatten(), reference[name].flatten())
            for name in names
            if norms[name] > NEGLIGIBLE * largest
        },
    }


def mean_comparison(updates: list[dict], references: list[dict]) -> dict:
    """`compare` averaged over the batches; the worst tensor is the one of smallest mean cosine."""
    each = [compare(update, reference) for update, reference in zip(updates, references, strict=True)]
    mean = {key: sum(c[key] for c in each) / len(each) for key in ("cosine", "rel_err", "norm_ratio")}
    per_tensor = {}
    for c in each:
        for name, value in c["tensors"].items():
            per_tensor.setdefault(name, []).append(value)
    worst = min(per_tensor, key=lambda name: sum(per_tensor[name]) / len(per_tensor[name]))
    mean["worst_cosine"] = sum(per_tensor[worst]) / len(per_tensor[worst])
    mean["worst_tensor"] = worst
    return mean


# --- one setting ----------------------------------------------------------------------------


def measure(setting: Setting, shared: Shared, args, report) -> None:
    """Every precision's row of `setting`, each handed to `report` as it finishes."""
    reference, cfg = build(setting, FLOAT64, shared, torch.float64, shared.state)
    state = weights_only(reference.state_dict())
    train64, test64 = samplers(cfg, shared, torch.float64, args.queries, reference.needs_queries)
    exact = directions(reference, train64, args.tasks, args.batches, shared.device, False)
    test_episodes = test64.episodes(0, args.test_tasks)
    predicted64 = predictions(reference, test_episodes, shared.device, False)
    labels = test_episodes.query_labels

    rounded, _ = build(setting, FLOAT64, shared, torch.float64, bf16_rounded(state))
    train_rounded, _ = samplers(cfg, shared, torch.float64, args.queries, rounded.needs_queries)
    floor = mean_comparison(directions(rounded, train_rounded, args.tasks, args.batches, shared.device, False), exact)

    for precision in precisions(shared.device):
        algo, cfg = build(setting, precision.overrides, shared, torch.float32, state)
        train, test = samplers(cfg, shared, torch.float32, args.queries, algo.needs_queries)
        updates = directions(algo, train, args.tasks, args.batches, shared.device, precision.tf32)
        predicted = predictions(algo, test.episodes(0, args.test_tasks), shared.device, precision.tf32)
        report(
            {
                "algo": setting.algo,
                "steps": setting.steps,
                "task": setting.task,
                "config": " ".join(setting.overrides),
                "precision": precision.name,
                **mean_comparison(updates, exact),
                "floor": floor["cosine"],
                "same": (predicted == predicted64).double().mean().item(),
                "accuracy": (predicted == labels).double().mean().item(),
                "accuracy64": (predicted64 == labels).double().mean().item(),
            }
        )


# --- the command ------------------------------------------------------------------------------


HEADER = (
    f"{'algo':<9} {'steps':>5} {'task':<6} {'precision':<14} {'cosine':>10} {'rel.err':>9} "
    f"{'worst tensor (name)':<40} {'norm ratio':>10} {'bf16-w floor':>12} {'same':>7} {'acc':>7} {'acc64':>7}"
)


def table_row(row: dict) -> str:
    steps = "-" if row["steps"] is None else str(row["steps"])
    worst = f"{row['worst_cosine']:.6f} ({row['worst_tensor']})"
    return (
        f"{row['algo']:<9} {steps:>5} {row['task']:<6} {row['precision']:<14} {row['cosine']:>10.7f} "
        f"{row['rel_err']:>9.2e} {worst:<40} {row['norm_ratio']:>10.6f} {row['floor']:>12.7f} "
        f"{100 * row['same']:>6.2f}% {100 * row['accuracy']:>6.2f}% {100 * row['accuracy64']:>6.2f}%"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_root(parser)
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--steps", nargs="+", type=int, help="only these inner-step counts (default: all)")
    parser.add_argument("--tasks", type=int, default=8, help="the meta-batch: tasks per batch")
    parser.add_argument("--queries", type=int, default=15, help="query images per class, training and test")
    parser.add_argument("--batches", type=int, default=2, help="batches each row's figures are the mean of")
    parser.add_argument("--test-tasks", type=int, default=50, help="test episodes of the prediction columns")
    parser.add_argument("--checkpoint", help="a run folder: its weights and config instead of the initial ones")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--overrides", nargs="+", default=[], help="config overrides for every row, e.g. device.channels_last=false"
    )
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"at most {QUICK_TASKS} tasks, {QUICK_QUERIES} queries, {QUICK_TEST_TASKS} test tasks, one batch",
    )


def quickened(args) -> None:
    if args.quick:
        args.tasks = min(args.tasks, QUICK_TASKS)
        args.queries = min(args.queries, QUICK_QUERIES)
        args.test_tasks = min(args.test_tasks, QUICK_TEST_TASKS)
        args.batches = 1


def processor(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}; host {cpu_name()}; torch {torch.__version__}"
    return cpu_header()


def checkpoint_run(args, device: torch.device) -> tuple[list[Setting], Shared]:
    """--checkpoint: the run's own config (data.root from --data-root), data and weights."""
    run_dir = Path(args.checkpoint)
    overrides = [*saved_overrides(str(run_dir)), f"data.root={args.data_root}", *args.overrides]
    cfg = compose(overrides)
    ckpt = load_checkpoint(checkpoint_file(run_dir))
    shared = Shared(
        device,
        load_split(cfg.data, "train"),
        load_split(cfg.data, "test"),
        ckpt["train_classes"],
        state=weights_only(ckpt["algo"]),
    )
    return [setting_of(cfg, overrides)], shared


def preset_run(args, device: torch.device) -> tuple[list[Setting], Shared]:
    """The presets' settings on Omniglot (or random images), from the initial weights."""
    train = task_split(args.data_root)
    teacher = untrained_teacher(train.num_classes, train.image_shape)
    shared = Shared(device, train, task_split(args.data_root, "test"), train.num_classes, teacher=teacher)
    # distill's config names a teacher folder; the algorithm reads the in-memory one instead (see `build`)
    settings = preset_settings(args.algos, ["algo.teacher=untrained-teacher"], args.overrides)
    return [s for s in settings if args.steps is None or s.steps is None or s.steps in args.steps], shared


def run(args) -> None:
    quickened(args)
    device = torch.device(args.device)
    print(processor(device), flush=True)
    try:
        settings, shared = checkpoint_run(args, device) if args.checkpoint else preset_run(args, device)
    except MetalearnError as err:  # not a run folder, no checkpoint, its data missing: say which
        raise SystemExit(f"bench.py fidelity: {err}") from None
    print(
        f"tasks from {shared.train.name}, test episodes from {shared.test.name}; meta-batch {args.tasks}, "
        f"{args.queries} queries, mean of {args.batches} batch(es), {args.test_tasks} test tasks; "
        f"bf16: {native_bf16(device)[1]}"
    )
    print(HEADER, flush=True)
    rows = []

    def report(row: dict) -> None:
        rows.append({**row, **machine_fields(), "device": str(device), "torch": torch.__version__})
        print(table_row(row), flush=True)

    for setting in settings:
        try:
            measure(setting, shared, args, report)
        except MetalearnError as err:
            steps = "-" if setting.steps is None else setting.steps
            print(f"{setting.algo:<9} {steps:>5} {setting.task:<6} skipped: {err}", flush=True)
            rows.append({"algo": setting.algo, "steps": setting.steps, "skipped": str(err)})
    if args.json:
        write_json(args.json, rows)
