"""data.mean / data.std / data.augment: normalisation of every batch, crop and flip of pretraining batches."""

import pytest
import torch
import torch.nn.functional as F
from helpers.data import tiny_data_config
from helpers.runs import overrides_for, train_resume_eval

from metalearn.config.compose import compose
from metalearn.data import EpisodeSampler, build_dataset, load_split
from metalearn.data.transforms import Preprocess
from metalearn.errors import MetalearnError


def test_normalisation_subtracts_the_mean_and_divides_by_the_std_per_channel():
    x = torch.rand(2, 4, 3, 5, 5, dtype=torch.float64)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    got = Preprocess(mean=mean, std=std).normalize(x)
    for c in range(3):
        assert torch.allclose(got[..., c, :, :], (x[..., c, :, :] - mean[c]) / std[c])


def test_crop_and_flip_are_those_of_a_loop_over_images():
    x = torch.rand(6, 3, 7, 7, dtype=torch.float64)
    got = Preprocess(crop_padding=2).augment(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    dy, dx = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    for i in range(6):
        crop = F.pad(x[i], (2, 2, 2, 2))[:, dy[i] : dy[i] + 7, dx[i] : dx[i] + 7]
        assert torch.equal(got[i], crop.flip(-1) if flip[i] else crop)
    assert flip.any() and not flip.all()  # both cases were checked


def test_episodes_and_pretraining_batches_are_preprocessed(tiny_data):
    split = load_split(tiny_data_config(tiny_data), "train")
    plain = EpisodeSampler(split, 5, 1, 3, "cpu", seed=1)
    normalised = EpisodeSampler(split, 5, 1, 3, "cpu", seed=1, preprocess=Preprocess(mean=[0.5], std=[0.25]))
    assert torch.allclose(normalised.sample(2).query, (plain.sample(2).query - 0.5) / 0.25)
    plain = EpisodeSampler(split, 5, 1, 3, "cpu", seed=1)
    cropped = EpisodeSampler(split, 5, 1, 3, "cpu", seed=1, preprocess=Preprocess(crop_padding=4))
    batch, reference = cropped.sample_images(8), plain.sample_images(8)
    assert torch.equal(batch.labels, reference.labels) and not torch.equal(batch.images, reference.images)
    assert torch.equal(cropped.sample(1).support, plain.sample(1).support)  # episodes are never augmented


def test_statistics_that_do_not_fit_the_images_are_refused(tiny_data):
    split = load_split(tiny_data_config(tiny_data), "train")
    with pytest.raises(MetalearnError, match="data.mean has 3 values, but the images of .* have 1 channel"):
        EpisodeSampler(split, 5, 1, 3, "cpu", seed=1, preprocess=Preprocess(mean=[0.5] * 3, std=[0.2] * 3))
    with pytest.raises(MetalearnError, match="data.mean and data.std go together"):
        build_dataset(compose(["data.mean=[0.5]"]).data)


def test_pretraining_with_augmentation_resumes_exactly(cli, tiny_overrides, tmp_path):
    overrides = [*overrides_for("finetune", tiny_overrides), "data.augment=true", "data.mean=[0.1]", "data.std=[0.3]"]
    run = train_resume_eval(cli, overrides, tmp_path, "finetune")
    assert "augment: true" in (run / ".hydra" / "config.yaml").read_text()  # recorded with the run
