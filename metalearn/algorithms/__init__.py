"""Algorithms by name; each implements metalearn.algorithms.base.Algorithm.

A builder gets the composed config, the device, the number of meta-train
classes (the head size of the classifier baselines) and the fast paths the
device takes, and returns the algorithm with its model on the device.
"""

import torch
from omegaconf import DictConfig, OmegaConf

from metalearn.algorithms.base import Algorithm
from metalearn.algorithms.batching import cpu_workers, resolve_vectorize
from metalearn.algorithms.finetune import Distill, Finetune
from metalearn.algorithms.maml import MAML
from metalearn.algorithms.protonet import ProtoNet
from metalearn.algorithms.reptile import Reptile
from metalearn.config import AdaptedParams, InnerLoss, InnerOptimizer
from metalearn.device import FastPaths, resolve_fast_paths
from metalearn.errors import MetalearnError
from metalearn.models import CHANNELS_LAST, NCHW, build_model


def _model(cfg: DictConfig, device: torch.device, fast: FastPaths, num_classes: int) -> torch.nn.Module:
    """The backbone on the device (an algorithm that vmaps its meta-batch switches it to the vmap layout)."""
    layout = CHANNELS_LAST if fast.channels_last else NCHW
    return build_model(cfg.model, num_classes, amp=fast.amp, layout=layout).to(device)


def _head_ways_only(cfg: DictConfig, verb: str) -> None:
    """An algorithm with a data.ways-sized head trains on tasks of that many ways."""
    if cfg.algo.train_ways not in (None, cfg.data.ways):
        raise MetalearnError(
            f"algo={cfg.algo.name} {verb} a {cfg.data.ways}-way head, so it trains on "
            f"{cfg.data.ways}-way tasks: leave algo.train_ways unset."
        )


def _maml(cfg: DictConfig, device: torch.device, train_classes: int, fast: FastPaths) -> Algorithm:
    a = cfg.algo
    _head_ways_only(cfg, "adapts")
    vectorize = resolve_vectorize(a.vectorize, device)
    return MAML(
        _model(cfg, device, fast, cfg.data.ways),
        inner_lr=a.inner_lr,
        inner_steps=a.inner_steps,
        inner_steps_eval=a.inner_steps_eval,
        outer_lr=a.outer_lr,
        first_order=a.first_order,
        vectorize=vectorize,
        head_only=AdaptedParams(a.adapt) is AdaptedParams.head,
        learn_inner_lr=a.learn_inner_lr,
        inner_lr_init=tuple(a.inner_lr_init),
        workers=cpu_workers(device),
        sum_over_shots=InnerLoss(a.inner_loss) is InnerLoss.sum_over_shots,
    )


def _reptile(cfg: DictConfig, device: torch.device, train_classes: int, fast: FastPaths) -> Algorithm:
    a = cfg.algo
    _head_ways_only(cfg, "fine-tunes")
    vectorize = resolve_vectorize(a.vectorize, device)
    return Reptile(
        _model(cfg, device, fast, cfg.data.ways),
        inner_lr=a.inner_lr,
        inner_steps=a.inner_steps,
        inner_batch=a.inner_batch,
        inner_optimizer=InnerOptimizer(a.inner_optimizer).value,
        inner_steps_eval=a.inner_steps_eval,
        inner_batch_eval=a.inner_batch_eval,
        outer_lr=a.outer_lr,
        outer_lr_final=a.outer_lr_final,
        anneal_steps=a.anneal_steps,
        train_steps=cfg.train.steps,
        vectorize=vectorize,
    )


def _protonet(cfg: DictConfig, device: torch.device, train_classes: int, fast: FastPaths) -> Algorithm:
    a = cfg.algo
    vectorize = resolve_vectorize(a.vectorize, device)
    return ProtoNet(
        _model(cfg, device, fast, 0),
        outer_lr=a.outer_lr,
        lr_decay=a.lr_decay,
        lr_decay_every=a.lr_decay_every,
        vectorize=vectorize,
    )


def _finetune_args(a: DictConfig) -> dict:
    return dict(
        outer_lr=a.outer_lr,
        batch_size=a.batch_size,
        head_lr=a.head_lr,
        head_momentum=a.head_momentum,
        head_dampening=a.head_dampening,
        head_weight_decay=a.head_weight_decay,
        head_steps=a.head_steps,
    )


def _finetune(cfg: DictConfig, device: torch.device, train_classes: int, fast: FastPaths) -> Algorithm:
    return Finetune(_model(cfg, device, fast, train_classes), **_finetune_args(cfg.algo))


def _distill(cfg: DictConfig, device: torch.device, train_classes: int, fast: FastPaths) -> Algorithm:
    a = cfg.algo
    if OmegaConf.is_missing(a, "teacher"):
        raise MetalearnError(
            "algo=distill learns from a finished run: add algo.teacher=<folder of a finetune or "
            "distill run trained on the same data and split>."
        )
    return Distill(
        _model(cfg, device, fast, train_classes),
        teacher=a.teacher,
        temperature=a.temperature,
        distill_weight=a.distill_weight,
        fast=fast,
        **_finetune_args(a),
    )


ALGORITHMS = {
    "maml": _maml,
    "fomaml": _maml,
    "anil": _maml,
    "metasgd": _maml,
    "reptile": _reptile,
    "protonet": _protonet,
    "finetune": _finetune,
    "distill": _distill,
}


def build_algorithm(cfg: DictConfig, device: torch.device, train_classes: int) -> Algorithm:
    """The algorithm cfg.algo names, its model built from cfg.model and placed on `device`.

    The model computes on the fast paths device.amp / device.channels_last
    resolve to on this device (algo.fast_paths says which and why).
    """
    if cfg.algo.name not in ALGORITHMS:
        raise MetalearnError(f"algo={cfg.algo.name} is not a known algorithm; choose one of: {', '.join(ALGORITHMS)}.")
    fast = resolve_fast_paths(cfg.device, device)
    algo = ALGORITHMS[cfg.algo.name](cfg, device, train_classes, fast)
    algo.fast_paths = fast
    return algo


__all__ = ["Algorithm", "build_algorithm"]
