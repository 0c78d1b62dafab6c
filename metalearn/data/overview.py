"""What `metalearn data info` and `metalearn data preview` show: a dataset's splits, and one episode as a PNG."""

from pathlib import Path

import torch
from omegaconf import DictConfig
from torchvision.utils import make_grid, save_image

from metalearn.config.settings import settings_of
from metalearn.data import EpisodeSampler, build_dataset
from metalearn.data.cache import cache_dir
from metalearn.errors import MetalearnError

PARTS = ("train", "val", "test")


def info(cfg: DictConfig) -> None:
    data = settings_of(cfg.data, "data")
    split_name = f", split {data.split}" if hasattr(data, "split") else ""
    print(f"dataset {data.name}{split_name}, root {Path(data.root).expanduser().resolve()}")
    dataset = build_dataset(cfg.data)
    problems = {}
    for part in PARTS:
        try:
            split = dataset.load_split(part)
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
    data, task, part = cfg.data, cfg.task, cfg.part.value
    split = build_dataset(data).load_split(part)
    sampler = EpisodeSampler(split, task.ways, task.shots, task.queries, "cpu", seed=cfg.seed)
    episode = sampler.sample(1)
    image = split.image_shape  # (channels, height, width)
    support = episode.support[0].view(task.ways, task.shots, *image)
    query = episode.query[0].view(task.ways, task.queries, *image)
    gap = torch.full((task.ways, 1, *image), 0.5)
    rows = torch.cat([support, gap, query], dim=1)  # [ways, shots + 1 + queries, C, H, W]
    grid = make_grid(rows.flatten(0, 1), nrow=rows.shape[1], padding=2, pad_value=0.25)
    out = Path(cfg.out or f"preview-{data.name}-{part}-{task.ways}w{task.shots}s.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.nn.functional.interpolate(grid[None], scale_factor=2, mode="nearest")[0], out)
    print(
        f"episode preview ({data.name} {part}, {task.ways}-way {task.shots}-shot {task.queries}-query; "
        f"one row per class: support | queries): {out}"
    )
    return out
