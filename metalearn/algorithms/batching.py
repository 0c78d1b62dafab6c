"""Running one pure per-task function over a meta-batch: one vmap, or a loop.

Both give the same numbers; which is faster depends on the device (on a
2-core CPU the loop is faster and 4-8x leaner, on a GPU one small task leaves
the chip idle and vmap fills it), hence the `vectorize` setting.
"""

from typing import Callable, Dict

import torch

from metalearn.config import Vectorize

Params = Dict[str, torch.Tensor]


def resolve_vectorize(choice, device: torch.device) -> bool:
    """True for vmap: on CUDA under auto; on CPU a loop is faster and leaner."""
    choice = Vectorize(choice) if not isinstance(choice, Vectorize) else choice
    if choice is Vectorize.auto:
        return torch.device(device).type == "cuda"
    return choice is Vectorize.vmap


def stack(items):
    """Stack a list of equally shaped (nested dict / tuple of) tensors along a new dim 0."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(items)
    if isinstance(first, dict):
        return {key: stack([item[key] for item in items]) for key in first}
    return tuple(stack(list(group)) for group in zip(*items))


def over_tasks(task_fn: Callable, vectorize: bool, shared_args: int = 1) -> Callable:
    """`task_fn(*shared, *per_task)` mapped over dim 0 of the per-task arguments, outputs stacked.

    The first `shared_args` arguments (the meta-parameters) are the same for every task.
    """
    if vectorize:
        def vectorized(*args):
            in_dims = (None,) * shared_args + (0,) * (len(args) - shared_args)
            return torch.func.vmap(task_fn, in_dims=in_dims)(*args)

        return vectorized

    def looped(*args):
        shared, batched = args[:shared_args], args[shared_args:]
        return stack([task_fn(*shared, *task) for task in zip(*batched)])

    return looped


def detached_params(model: torch.nn.Module) -> Params:
    """The model's weights by name, as plain tensors for a functional call."""
    return {name: p.detach() for name, p in model.named_parameters()}


def sub_params(params: Params, prefix: str) -> Params:
    """The entries of a submodule, with its prefix removed (for functional_call on it)."""
    start = len(prefix) + 1
    return {name[start:]: value for name, value in params.items() if name.startswith(prefix + ".")}
