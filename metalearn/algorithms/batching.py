"""Running one pure per-task function over a meta-batch: one vmap, or a loop.

Both give the same numbers; which is faster depends on the device (on a
2-core CPU the loop is faster and 4-8x leaner, on a GPU one small task leaves
the chip idle and vmap fills it), hence the `vectorize` setting.
"""

import copy
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import torch

from metalearn.errors import MetalearnError
from metalearn.models.batch_stats import sync_buffers

Params = dict[str, torch.Tensor]


class Vectorize(Enum):
    auto = "auto"  # vmap on CUDA, a loop over tasks on CPU
    vmap = "vmap"
    loop = "loop"


@dataclass
class VectorizedSettings:
    """The setting of every algorithm that runs a per-task function over its meta-batch."""

    # auto: a vmap over the meta-batch on CUDA, a loop over tasks on CPU (faster and leaner there: docs/performance.md).
    vectorize: Vectorize = Vectorize.auto


def resolve_vectorize(choice: bool | str | Vectorize, device: torch.device) -> bool:
    """True for vmap: on CUDA under auto; on CPU a loop is faster and leaner. A bool is the choice made."""
    if isinstance(choice, bool):
        return choice
    choice = Vectorize(choice)
    if choice is Vectorize.auto:
        return torch.device(device).type == "cuda"
    return choice is Vectorize.vmap


def loop_only(choice: bool | str | Vectorize, why: str) -> bool:
    """The loop strategy, where vmap cannot do the job: refuses an explicit vmap with `why` and the fix."""
    if choice is True or (not isinstance(choice, bool) and Vectorize(choice) is Vectorize.vmap):
        raise MetalearnError(f"{why}, which the vmap strategy cannot: add algo.vectorize=loop.")
    return False


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def stack(items):
    """Stack a list of equally shaped (nested dict / tuple of) tensors along a new dim 0."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(items)
    if isinstance(first, dict):
        return {key: stack([item[key] for item in items]) for key in first}
    return tuple(stack(list(group)) for group in zip(*items, strict=False))


def over_tasks(task_fn: Callable, vectorize: bool, shared_args: int = 1) -> Callable:
    """`task_fn(*shared, *per_task)` mapped over dim 0 of the per-task arguments, outputs stacked.

    The first `shared_args` arguments (the meta-parameters) are the same for every task.
    """
    if vectorize:

        def vectorized(*args):
            in_dims = (None,) * shared_args + (0,) * (len(args) - shared_args)
            # randomness: each task draws its own (a DropBlock or dropout in the backbone)
            return torch.func.vmap(task_fn, in_dims=in_dims, randomness="different")(*args)

        return vectorized

    def looped(*args):
        shared, batched = args[:shared_args], args[shared_args:]
        return stack([task_fn(*shared, *task) for task in zip(*batched, strict=False)])

    return looped


def cpu_workers(device: torch.device) -> int:
    """Threads for a task loop: one per intra-op thread on a CPU, one on a GPU (the chip runs in parallel)."""
    return torch.get_num_threads() if torch.device(device).type == "cpu" else 1


@contextmanager
def one_thread():
    """torch's intra-op threads set to one (each task thread is one core), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class TaskThreads:
    """Splits a meta-batch's tasks across threads, each running its ops on one core.

    A small task's ops (a 5-image support pass) barely use one core, so on a
    CPU `workers` tasks at once on a core each beat one task at a time on all
    cores. Each worker has its own copy of the model because functional_call
    swaps a module's weights in place: the copies' own weights are never used,
    only their structure and buffers (running statistics), copied in at each map.

    A batch of one task runs on one core too: kernels (bf16 ones more often, float32 ones too) round
    differently on one thread and on several, so a task's score would otherwise depend on how many tasks
    share its batch (eval.batch_size) and on the machine's cores.
    """

    def __init__(self, model: torch.nn.Module, workers: int):
        self.model = model
        self.replicas = [model] if workers <= 1 else [copy.deepcopy(model) for _ in range(workers)]
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None

    @property
    def models(self) -> list[torch.nn.Module]:
        """Every model a map may run on, in the order of the tasks they take."""
        return [self.model, *(r for r in self.replicas if r is not self.model)]

    def map(self, run: Callable, tasks: int) -> list:
        """`run(model, task_slice)` over contiguous slices of range(tasks), one per worker; results in order."""
        workers = min(len(self.replicas), tasks)
        if self.pool is None:
            return [run(self.model, slice(0, tasks))]  # one worker: a vmap, or a machine of one core
        if workers < 2:
            with one_thread():
                return [run(self.model, slice(0, tasks))]
        bounds = [tasks * i // workers for i in range(workers + 1)]
        slices = [slice(bounds[i], bounds[i + 1]) for i in range(workers)]
        for replica in self.replicas:
            replica.train(self.model.training)
        sync_buffers(self.model, self.replicas[:workers])
        with one_thread():
            return list(self.pool.map(run, self.replicas[:workers], slices))

    def over_tasks(self, task_fn: Callable) -> Callable:
        """`task_fn(model, shared, *task)` mapped over dim 0 of the batched arguments, the tasks split
        across the threads (each on its own model copy); outputs stacked in task order.

        Grad mode is per thread: a task_fn that must not record a graph says so itself (torch.no_grad).
        """

        def looped(shared, *batched):
            def run(model, part: slice):
                return [task_fn(model, shared, *task) for task in zip(*(b[part] for b in batched), strict=False)]

            return stack([out for part in self.map(run, len(batched[0])) for out in part])

        return looped


def detached_params(model: torch.nn.Module) -> Params:
    """The model's weights by name, as plain tensors for a functional call."""
    return {name: p.detach() for name, p in model.named_parameters()}


def sub_params(params: Params, prefix: str) -> Params:
    """The entries of a submodule, with its prefix removed (for functional_call on it)."""
    start = len(prefix) + 1
    return {name[start:]: value for name, value in params.items() if name.startswith(prefix + ".")}
