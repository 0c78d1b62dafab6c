"""`metalearn data info` and `metalearn data preview` on the tiny generated Omniglot."""

import torch
from helpers.data import tiny_data_config
from PIL import Image

from metalearn.data import EpisodeSampler, load_split


def data_args(tiny_data):
    return [
        f"data.root={tiny_data['root']}",
        f"data.split={tiny_data['split']}",
        f"data.cache_dir={tiny_data['cache']}",
    ]


def test_info_lists_each_part_and_the_cache(cli, tiny_data, tmp_path):
    out = cli("data", "info", *data_args(tiny_data), cwd=tmp_path).stdout
    assert "train    12 classes     240 images" in out
    assert "val       8 classes     160 images" in out
    assert "test     16 classes     320 images" in out
    assert "data present: yes" in out and f"cache {tiny_data['cache']}: omniglot-28px" in out
    missing = cli("data", "info", f"data.root={tmp_path}/none", cwd=tmp_path).stdout
    assert "data present: no" in missing and "images_background.zip" in missing


def test_preview_draws_the_sampled_episode(cli, tiny_data, tmp_path):
    out_png = tmp_path / "episode.png"
    out = cli(
        "data",
        "preview",
        *data_args(tiny_data),
        "task.ways=3",
        "task.shots=2",
        "task.queries=4",
        "part=val",
        "seed=3",
        f"out={out_png}",
        cwd=tmp_path,
    ).stdout
    assert str(out_png) in out
    image = Image.open(out_png).convert("L")
    picture = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width).float()
    cols, rows = 2 + 1 + 4, 3
    assert picture.shape == (2 * (rows * 30 + 2), 2 * (cols * 30 + 2))
    picture = picture[::2, ::2]  # undo the 2x zoom
    cfg = tiny_data_config(tiny_data)
    episode = EpisodeSampler(load_split(cfg, "val"), 3, 2, 4, "cpu", seed=3).sample(1)

    def tile(row, col):
        top, left = 2 + row * 30, 2 + col * 30
        return picture[top : top + 28, left : left + 28] / 255

    for row in range(rows):
        assert torch.allclose(tile(row, 0), episode.support[0, 2 * row, 0], atol=1 / 255)
        assert torch.allclose(tile(row, 1), episode.support[0, 2 * row + 1, 0], atol=1 / 255)
        assert torch.allclose(tile(row, 3), episode.query[0, 4 * row, 0], atol=1 / 255)
        assert torch.allclose(tile(row, 6), episode.query[0, 4 * row + 3, 0], atol=1 / 255)


def test_data_needs_an_action(cli, tmp_path):
    result = cli("data", "look", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "info or preview" in result.stderr
