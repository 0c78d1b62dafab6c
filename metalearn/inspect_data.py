"""`metalearn data info` and `metalearn data preview`: see what a dataset holds."""

from pathlib import Path

import torch
from omegaconf import DictConfig
from torchvision.utils import make_grid, save_image

from metalearn.data import EpisodeSampler, load_split
from metalearn.data.cache import cache_dir
from metalearn.errors import MetalearnError

PARTS = ("train", "val", "test")


def info(cfg: DictConfig) -> None:
    data = cfg.data
    print(f"dataset {data.name}, split {data.split}, root {Path(data.root).expanduser().resolve()}")
    problems = {}
    for part in PARTS:
        try:
            split = load_split(data, part)
        except MetalearnError as err:
            problems.setdefault(str(err), []).append(part)
            continue
        counts = split.class_counts()
        print(
            f"  {part:<5} {split.num_classes:>5} classes {len(split.labels):>7} images "
            f"({int(counts.min())}-{int(counts.max())} per class)  {split.name}"
        )
    print(f"data present: {'no' if problems else 'yes'}")
    for message, parts in problems.items():
        print(f"  {', '.join(parts)}: {message}")
    folder = cache_dir(data.cache_dir)
    cached = sorted(folder.glob(f"{data.name}-*.pt"))
    sizes = ", ".join(f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in cached) or "nothing cached yet"
    print(f"cache {folder}: {sizes}")


def preview(cfg: DictConfig) -> Path:
    """One sampled episode as a PNG: a row per class, its support images, a gap, its queries."""
    data, part = cfg.data, cfg.part.value
    sampler = EpisodeSampler(load_split(data, part), data.ways, data.shots, data.queries, "cpu", seed=cfg.seed)
    episode = sampler.sample(1)
    support = episode.support[0].view(data.ways, data.shots, 1, 28, 28)
    query = episode.query[0].view(data.ways, data.queries, 1, 28, 28)
    gap = torch.full((data.ways, 1, 1, 28, 28), 0.5)
    rows = torch.cat([support, gap, query], dim=1)  # [ways, shots + 1 + queries, 1, 28, 28]
    grid = make_grid(rows.flatten(0, 1), nrow=rows.shape[1], padding=2, pad_value=0.25)
    out = Path(cfg.out or f"preview-{data.name}-{part}-{data.ways}w{data.shots}s.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.nn.functional.interpolate(grid[None], scale_factor=2, mode="nearest")[0], out)
    print(
        f"episode preview ({data.name} {part}, {data.ways}-way {data.shots}-shot {data.queries}-query; "
        f"one row per class: support | queries): {out}"
    )
    return out


def run(cfg: DictConfig) -> None:
    (info if cfg.action.value == "info" else preview)(cfg)
