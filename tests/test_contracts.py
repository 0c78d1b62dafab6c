"""Every registered component against its contract: each YAML in conf/algo, conf/data and conf/model.

Nothing here names an algorithm, a dataset or a backbone: a new YAML is
tested as soon as it exists. Algorithms: settings and constructor agree, and
each trains, resumes exactly and evaluates; datasets: the ClassSplit contract
on small files in the real format, and a clear error without them;
backbones: shapes, the head contract, images of any channels and size, and
the same function in every layout.
"""

import inspect
from dataclasses import fields

import pytest
import torch
from helpers.data import REPO, TINY_DATASETS
from helpers.runs import overrides_for, train_resume_eval

from metalearn.algorithms import CLASS_HEAD, EMBEDDING, WAYS_HEAD, Algorithm
from metalearn.algorithms.batching import VectorizedSettings
from metalearn.config.compose import compose
from metalearn.config.settings import component_class
from metalearn.data import build_dataset
from metalearn.errors import MetalearnError
from metalearn.models import LAYOUTS, NCHW, Backbone, build_model, set_layout


def registry(group: str) -> list:
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


ALGOS, DATASETS, MODELS = registry("algo"), registry("data"), registry("model")
# What the runner may pass besides the settings (see Algorithm).
CONTEXT = {"model", "workers", "train_steps", "ranks", "fast_paths"}  # what the builder gives besides settings


def algorithm_class(algo: str) -> type:
    return component_class(compose([f"algo={algo}"]).algo, "algo")


def needs_teacher(algo: str) -> bool:
    return "teacher" in {f.name for f in fields(algorithm_class(algo).Settings)}


@pytest.mark.parametrize("algo", ALGOS)
def test_algorithm_settings_and_constructor_agree(algo):
    cls = algorithm_class(algo)
    assert issubclass(cls, Algorithm) and cls.head in (WAYS_HEAD, EMBEDDING, CLASS_HEAD)
    parameters = inspect.signature(cls).parameters
    settings = {f.name for f in fields(cls.Settings)} - {"_target_", "name"}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        assert settings <= set(parameters), f"settings the constructor does not take: {settings - set(parameters)}"
    named = {inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY}
    required = {n for n, p in parameters.items() if p.default is inspect.Parameter.empty and p.kind in named}
    assert required <= settings | CONTEXT, f"constructor arguments nobody gives: {required - settings - CONTEXT}"
    keys = set(compose([f"algo={algo}"]).algo) - {"_target_"}
    assert keys == settings | {"name"}, "the YAML and the schema list different keys"


@pytest.mark.parametrize("algo", ALGOS)
def test_algorithm_trains_resumes_exactly_and_evaluates(cli, tiny_overrides, tmp_path, algo):
    overrides = overrides_for(algo, tiny_overrides)
    if needs_teacher(algo):  # learns from a finished classifier run of the same data
        teacher = tmp_path / "teacher"
        cli("train", *overrides_for("finetune", tiny_overrides), f"hydra.run.dir={teacher}", cwd=tmp_path)
        overrides.append(f"algo.teacher={teacher}")
    run = train_resume_eval(cli, overrides, tmp_path, algo)
    mismatched = cli("eval", f"run={run}", "model.hidden=4", cwd=tmp_path, check=False)
    assert mismatched.returncode == 1 and "does not fit this configuration" in mismatched.stderr


VECTORIZED = [a for a in ALGOS if issubclass(algorithm_class(a).Settings, VectorizedSettings)]


@pytest.mark.parametrize("amp", ["true", "false"], ids=["bf16", "fp32"])
@pytest.mark.parametrize("algo", VECTORIZED)
def test_vmap_strategy_with_the_default_device_flags(cli, tiny_overrides, tmp_path, algo, amp):
    """What a GPU's defaults pick (vmap, channels_last on by default, bf16 or not) trains, resumes exactly
    and evaluates; on a CPU here."""
    overrides = [*overrides_for(algo, tiny_overrides), "algo.vectorize=vmap", f"device.amp={amp}"]
    assert not any(o.startswith("device.channels_last") for o in overrides)
    run = train_resume_eval(cli, overrides, tmp_path, algo)
    assert "channels_last: true" in (run / ".hydra" / "config.yaml").read_text()
    precision = "bf16 autocast" if amp == "true" else "float32"
    log = (run / "train.log").read_text()
    assert f"on cpu: {precision}, vmap layout (device.amp={amp}" in log
    assert "memory: freed blocks kept for reuse (device.allocator=auto" in log


def data_config(dataset: str, base):
    if dataset not in TINY_DATASETS:
        pytest.fail(f"data={dataset} has no writer of small files in tests/helpers/data.py TINY_DATASETS")
    return compose(TINY_DATASETS[dataset](base)).data


@pytest.mark.parametrize("dataset", DATASETS)
def test_dataset_parts_meet_the_class_split_contract(dataset, tmp_path):
    data = build_dataset(data_config(dataset, tmp_path))
    shapes = set()
    for part in ("train", "val", "test"):
        split = data.load_split(part)
        assert split.images.dtype == torch.uint8 and split.images.dim() == 4, part
        assert split.labels.dtype == torch.int64 and len(split.labels) == len(split.images), part
        assert torch.equal(split.labels.unique(), torch.arange(split.num_classes)), f"{part}: ids 0..C-1"
        assert split.part == part and split.class_counts().min() >= 1
        shapes.add(split.image_shape)
    assert len(shapes) == 1, "every part has images of one shape"


@pytest.mark.parametrize("dataset", DATASETS)
def test_dataset_without_its_files_says_what_is_missing(dataset, tmp_path):
    data = data_config(dataset, tmp_path / "real")
    data.root = str(tmp_path / "empty")
    data.cache_dir = str(tmp_path / "cache")
    with pytest.raises(MetalearnError, match=str(tmp_path / "empty")):
        build_dataset(data).load_split("train")


@pytest.mark.parametrize("image_shape", [(1, 28, 28), (3, 32, 32)], ids=["1x28x28", "3x32x32"])
@pytest.mark.parametrize("model", MODELS)
def test_backbone_meets_the_contract_for_any_image(model, image_shape):
    cfg = compose([f"model={model}"]).model
    torch.manual_seed(0)
    classifier = build_model(cfg, 5, image_shape).double()
    assert isinstance(classifier, Backbone)
    images = torch.rand(4, *image_shape, dtype=torch.float64)
    assert classifier(images).shape == (4, 5)
    assert classifier.features(images).shape == (4, classifier.feature_size)
    assert classifier.head.out_features == 5 and classifier.batch_norm in ("transductive", "inductive", "none")
    embedding = build_model(cfg, 0, image_shape).double()
    assert embedding(images).shape == (4, embedding.feature_size)
    expected = classifier(images)
    for layout in LAYOUTS:
        set_layout(classifier, layout)
        assert torch.allclose(classifier(images), expected, atol=1e-10), layout
    set_layout(classifier, NCHW)
