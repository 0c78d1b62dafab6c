"""Bad input ends with one clear paragraph and a non-zero exit, never a traceback."""

import io
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch
from helpers.cli import metalearn_in_process as metalearn_cli
from helpers.data import (
    dataset_of,
    mini_class,
    png_declaring,
    write_tiny_cifar100,
    write_tiny_folder,
    write_tiny_miniimagenet,
    write_tiny_mnist,
    write_tiny_omniglot,
    write_tiny_split,
)
from PIL import Image

from metalearn.errors import MetalearnError


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    """One finished tiny run that the eval error tests can damage copies of."""
    base = tmp_path_factory.mktemp("errors")
    run = base / "run"
    metalearn_cli(
        "train",
        f"data.root={tiny_data['root']}",
        f"data.split={tiny_data['split']}",
        f"data.cache_dir={tiny_data['cache']}",
        "task.queries=3",
        "model.hidden=8",
        "train.steps=1",
        "train.meta_batch_size=1",
        "train.val_episodes=2",
        "eval.episodes=10",
        "algo.inner_steps_eval=2",
        "device=cpu",
        f"hydra.run.dir={run}",
        cwd=base,
    )
    return run


def fails(*args, match: str, cwd=None):
    result = metalearn_cli(*args, check=False, cwd=cwd)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert match in result.stderr, result.stderr
    return result


def test_more_ways_than_classes(tiny_overrides, tmp_path):
    fails("train", *tiny_overrides, "task.ways=13", match="choose task.ways <= 12", cwd=tmp_path)


def test_more_shots_and_queries_than_drawings(tiny_overrides, tmp_path):
    fails(
        "train",
        *tiny_overrides,
        "task.shots=5",
        "task.queries=16",
        match="choose task.shots + task.queries <= 20",
        cwd=tmp_path,
    )


def test_missing_dataset(tmp_path):
    fails(
        "train",
        f"data.root={tmp_path}/nothing",
        f"data.cache_dir={tmp_path}/cache",
        match="images_background.zip",
        cwd=tmp_path,
    )


def test_unknown_key_and_wrong_type(tiny_overrides, tmp_path):
    fails("train", *tiny_overrides, "train.stepz=3", match="Key 'stepz' not in", cwd=tmp_path)
    fails("train", *tiny_overrides, "algo.inner_lr=fast", match="algo.inner_lr: Value 'fast'", cwd=tmp_path)
    fails(
        "train",
        *tiny_overrides,
        "algo.vectorize=sometimes",
        match="algo.vectorize: Invalid value 'sometimes'",
        cwd=tmp_path,
    )
    fails("train", *tiny_overrides, "algo=nosuch", match="Could not find 'algo/nosuch'", cwd=tmp_path)


def test_out_of_range_values(tiny_overrides, tmp_path):
    run = tmp_path / "refused"
    fails("train", *tiny_overrides, "task.shots=0", f"hydra.run.dir={run}", match="task.shots must be at least 1")
    assert not run.exists()  # a run refused before it started leaves no folder behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so device=cuda is valid here")
def test_cuda_without_a_gpu(tiny_overrides, tmp_path):
    overrides = [o for o in tiny_overrides if not o.startswith("device")]
    fails("train", *overrides, "device=cuda", match="torch sees none", cwd=tmp_path)


def test_corrupt_checkpoint(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    best = run / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    fails("eval", f"run={run}", match="cannot be read as a checkpoint", cwd=tmp_path)
    # the other checkpoint still works
    assert "test accuracy" in metalearn_cli("eval", f"run={run}", "checkpoint=last", cwd=tmp_path).stdout


def test_checkpoint_that_is_not_ours(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    torch.save({"weights": torch.zeros(3)}, run / "checkpoints" / "best.pt")
    fails("eval", f"run={run}", match="is not a metalearn checkpoint", cwd=tmp_path)


def test_checkpoint_with_code_inside_is_refused(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    torch.save({"format": "metalearn-checkpoint", "payload": shutil.copytree}, run / "checkpoints" / "best.pt")
    fails("eval", f"run={run}", match="cannot be read as a checkpoint", cwd=tmp_path)


def test_mismatched_checkpoint(trained_run, tmp_path):
    fails("eval", f"run={trained_run}", "task.ways=3", match="does not fit this configuration", cwd=tmp_path)


def test_eval_needs_a_run_folder(trained_run, tmp_path):
    fails("eval", match="metalearn eval run=<run folder>", cwd=tmp_path)
    fails("eval", f"run={tmp_path}/nowhere", match="does not exist", cwd=tmp_path)
    fails("eval", f"run={tmp_path}", match="is not a metalearn run folder", cwd=tmp_path)


def test_a_finished_run_folder_is_not_overwritten(trained_run, tiny_overrides, tmp_path):
    kept = [
        trained_run / "checkpoints" / "last.pt",
        trained_run / ".hydra" / "overrides.yaml",
        trained_run / ".hydra" / "config.yaml",
    ]
    before = [path.read_bytes() for path in kept]
    fails("train", *tiny_overrides, f"hydra.run.dir={trained_run}", match="resume=", cwd=tmp_path)
    assert [path.read_bytes() for path in kept] == before


def test_resume_without_a_checkpoint(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "checkpoints")
    fails("train", f"resume={run}", match="No checkpoint at", cwd=tmp_path)


def test_an_impossible_training_task_names_the_key_that_set_it(tiny_overrides, tmp_path):
    # protonet trains on 60-way episodes (task.train.ways): lowering task.ways could not help.
    plain = [o for o in tiny_overrides if not o.startswith("algo.")]
    result = fails("train", *plain, "algo=protonet", "task.ways=2", match="choose task.train.ways <= 12", cwd=tmp_path)
    assert "task.train.ways=60 asks for more classes than the 12 of omniglot/" in result.stderr
    # task.train.shots is null there, so task.shots set the shots; task.train.queries the queries.
    fails(
        "train",
        *plain,
        "algo=protonet",
        "task.train.ways=5",
        "task.train.queries=25",
        match="choose task.shots + task.train.queries <= 20 (e.g. task.train.queries=19)",
        cwd=tmp_path,
    )
    # no query count can help when the shots alone are too many
    result = fails("train", *plain, "task.shots=25", match="choose task.shots + task.queries <= 20.", cwd=tmp_path)
    assert "e.g." not in result.stderr
    # validation episodes are task.ways-way whatever the training ones are
    fails(
        "train",
        *plain,
        "algo=protonet",
        "task.train.ways=5",
        "task.ways=9",
        match="choose task.ways <= 8",
        cwd=tmp_path,
    )


WRONG_MINIIMAGENET_PICKLES = {
    "a list": ([1, 2], "holds a list, not a dict"),
    "no image_data": ({"class_dict": {"n01": [0]}}, "has no 'image_data' entry"),
    "float images": (
        {"image_data": np.zeros((2, 8, 8, 3)), "class_dict": {"n01": [0, 1]}},
        "image_data is a float64 array [2, 8, 8, 3], not a uint8 array [N, H, W, 3]",
    ),
    "grey images": (
        {"image_data": np.zeros((2, 8, 8), np.uint8), "class_dict": {"n01": [0, 1]}},
        "image_data is a uint8 array [2, 8, 8], not a uint8 array [N, H, W, 3]",
    ),
    "rows as a string": (
        {"image_data": np.zeros((2, 8, 8, 3), np.uint8), "class_dict": {"n01": "0,1"}},
        "class_dict['n01'] is a str, not a list of integers",
    ),
    "a row past the images": (
        {"image_data": np.zeros((2, 8, 8, 3), np.uint8), "class_dict": {"n01": [0, 2]}},
        "class_dict['n01'] holds 2, outside 0..1",
    ),
    "a row before the images": (
        {"image_data": np.zeros((2, 8, 8, 3), np.uint8), "class_dict": {"n01": np.array([0, -1])}},
        "class_dict['n01'] holds -1, outside 0..1",
    ),
    "a class without rows": (
        {"image_data": np.zeros((2, 8, 8, 3), np.uint8), "class_dict": {"n01": [0, 1], "n02": []}},
        "class_dict['n02'] lists no rows of image_data",
    ),
    "classes that are not names": (
        {"image_data": np.zeros((2, 8, 8, 3), np.uint8), "class_dict": {1: [0], "n02": [1]}},
        "class_dict has the class name 1, not a string",
    ),
}


@pytest.mark.parametrize("content, problem", WRONG_MINIIMAGENET_PICKLES.values(), ids=WRONG_MINIIMAGENET_PICKLES)
def test_a_miniimagenet_pickle_of_the_wrong_structure_names_the_file_and_the_problem(tmp_path, content, problem):
    base = tmp_path / "root" / "miniimagenet"
    base.mkdir(parents=True)
    (base / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps(content))
    with pytest.raises(MetalearnError) as raised:
        dataset_of("miniimagenet", tmp_path / "root", tmp_path / "cache").load_split("train")
    assert str(raised.value).startswith(f"{base / 'mini-imagenet-cache-train.pkl'} is not a miniImageNet pickle")
    assert problem in str(raised.value)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return write_tiny_cifar100(tmp_path_factory.mktemp("cifar") / "root")


WRONG_CIFAR_FILES = {
    "no data": ("train", lambda c: {k: v for k, v in c.items() if k != b"data"}, "has no 'data' entry"),
    "labels as a dict": ("test", lambda c: {**c, b"fine_labels": {}}, "fine_labels is a dict, not a list of integers"),
    "a label past the classes": ("test", lambda c: {**c, b"fine_labels": [100] * 100}, "holds 100, outside 0..99"),
    "fewer labels than images": ("train", lambda c: {**c, b"fine_labels": [0]}, "200 images but 1 fine_labels"),
    "rows of another width": (
        "train",
        lambda c: {**c, b"data": c[b"data"][:, :100]},
        "data is a uint8 array [200, 100], not a uint8 array [n, 3072]",
    ),
    "names that are numbers": ("meta", lambda c: {b"fine_label_names": [1, 2]}, "fine_label_names is a list, not"),
    "a name twice": ("meta", lambda c: {b"fine_label_names": [b"apple", b"apple"]}, "names a class twice"),
    "a list for meta": ("meta", lambda c: list(c), "holds a list, not a dict"),
}


@pytest.mark.parametrize("name, change, problem", WRONG_CIFAR_FILES.values(), ids=WRONG_CIFAR_FILES)
def test_a_cifar100_file_of_the_wrong_structure_names_the_file_and_the_problem(
    cifar_root, tmp_path, name, change, problem
):
    root = tmp_path / "root"
    shutil.copytree(cifar_root, root)
    path = root / "cifar-100-python" / name
    path.write_bytes(pickle.dumps(change(pickle.loads(path.read_bytes(), encoding="bytes")), protocol=2))
    with pytest.raises(MetalearnError) as raised:
        dataset_of("cifarfs", root, tmp_path / "cache").load_split("train")
    assert str(raised.value).startswith(f"{path} is not a CIFAR-100 python file") and problem in str(raised.value)


@pytest.mark.parametrize("width, height", [(30000, 30000), (10000, 10000)])  # past PIL's error, past its warning
def test_an_image_declaring_too_many_pixels_is_refused_naming_it(tmp_path, width, height):
    root = write_tiny_folder(tmp_path / "root")
    bomb = root / "class03" / "1.png"
    bomb.write_bytes(png_declaring(width, height))
    data = dataset_of("folder", root, tmp_path / "cache", "data.fractions=[0.34,0.33,0.33]")
    with pytest.raises(MetalearnError, match=f"{bomb} is refused: it declares more pixels than are decoded safely"):
        for part in ("train", "val", "test"):
            data.load_split(part)


def test_a_damaged_miniimagenet_image_is_named(tmp_path):
    root = write_tiny_miniimagenet(tmp_path / "root")
    image = root / "miniimagenet" / "images" / f"{mini_class('val', 2)}00000001.jpg"
    image.write_bytes(image.read_bytes()[:200])
    with pytest.raises(MetalearnError, match=f"{image} is not a readable image"):
        dataset_of("miniimagenet", root, tmp_path / "cache").load_split("val")
    image.write_bytes(png_declaring(30000, 30000))
    with pytest.raises(MetalearnError, match=f"{image} is refused"):
        dataset_of("miniimagenet", root, tmp_path / "cache").load_split("val")


@pytest.mark.parametrize("content", [b"not an image\n", png_declaring(40000, 40000)], ids=["text", "bomb"])
def test_a_damaged_omniglot_drawing_is_named(tmp_path, content):
    root = write_tiny_omniglot(tmp_path / "root", as_zip=False)
    drawing = next((root / "omniglot-py" / "images_evaluation" / "Beta" / "character02").glob("*_07.png"))
    drawing.write_bytes(content)
    with pytest.raises(MetalearnError, match=f"{drawing} is (not a readable image|refused)"):
        dataset_of("omniglot", root, tmp_path / "cache", f"data.split={write_tiny_split(tmp_path / 's')}").load_split(
            "test"
        )


def png_with_a_short_header() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (6, 6)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[11] = 9  # the IHDR chunk's length: 9 bytes, not 13
    return bytes(data)


# What PIL raises for these is no OSError.
DAMAGED_HEADERS = {"a short PNG header": png_with_a_short_header(), "a PGM of maxval 0": b"P5 4 4 0\n" + bytes(16)}


@pytest.mark.parametrize("content", DAMAGED_HEADERS.values(), ids=DAMAGED_HEADERS)
def test_an_image_with_a_damaged_header_is_named(tmp_path, content):
    root = write_tiny_folder(tmp_path / "root", classes=3)
    damaged = root / "class01" / "2.jpg"
    damaged.write_bytes(content)
    data = dataset_of("folder", root, tmp_path / "cache")
    with pytest.raises(MetalearnError, match=f"{damaged} is not a readable image"):
        for part in ("train", "val", "test"):
            data.load_split(part)


def test_a_damaged_drawing_inside_an_omniglot_archive_is_named(tmp_path):
    root = write_tiny_omniglot(tmp_path / "root")
    archive = root / "omniglot-py" / "images_background.zip"
    with zipfile.ZipFile(archive) as opened:
        member = opened.getinfo(sorted(n for n in opened.namelist() if n.endswith(".png"))[5])
    data = bytearray(archive.read_bytes())
    data[member.header_offset + 30 + len(member.filename) + member.file_size // 2] ^= 0xFF  # stored, not deflated
    archive.write_bytes(bytes(data))
    name = "/".join(member.filename.split("/")[-3:])
    with pytest.raises(MetalearnError, match=f"{name} in {archive} cannot be read"):
        dataset_of("omniglot", root, tmp_path / "cache", f"data.split={write_tiny_split(tmp_path / 's')}").load_split(
            "train"
        )


BAD_CSVS = {
    "no header": ("n0100000000000001.jpg,n01000000\n", "does not start with the header line filename,label"),
    "a row without a label": ("filename,label\nn0100000000000001.jpg\n", "row 2: 'n0100000000000001.jpg' is not"),
    "an empty label": ("filename,label\nn0100000000000001.jpg, \n", "row 2: 'n0100000000000001.jpg, ' is not"),
    "binary": (b"\xff\xfe\x00\x01garbage", "is not a CSV file of filename,label lines"),
}


@pytest.mark.parametrize("content, problem", BAD_CSVS.values(), ids=BAD_CSVS)
def test_a_malformed_miniimagenet_csv_names_the_file_and_the_problem(tmp_path, content, problem):
    root = write_tiny_miniimagenet(tmp_path / "root")
    csv_file = root / "miniimagenet" / "test.csv"
    csv_file.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(MetalearnError) as raised:
        dataset_of("miniimagenet", root, tmp_path / "cache").load_split("test")
    assert str(raised.value).startswith(str(csv_file)) and problem in str(raised.value)


@pytest.mark.parametrize(
    "line, problem",
    [("Alpha/character01", "not a class Alphabet/characterNN/rotDDD"), ("Alpha/character01/rot045", "rot270)")],
)
def test_a_malformed_omniglot_split_list_names_the_line(tiny_data, tmp_path, line, problem):
    split = write_tiny_split(tmp_path / "split")
    (split / "val.txt").write_text(f"Alpha/character07/rot000\n{line}\n")
    with pytest.raises(MetalearnError) as raised:
        dataset_of("omniglot", tiny_data["root"], tiny_data["cache"], f"data.split={split}").load_split("val")
    assert str(raised.value).startswith(f"{split / 'val.txt'} lists '{line}', ") and problem in str(raised.value)


@pytest.mark.parametrize("name", ["cifar", "folder"])
def test_a_split_list_that_is_not_text_is_named(cifar_root, tmp_path, name):
    lists = tmp_path / "lists"
    lists.mkdir()
    for part in ("train", "val", "test"):
        (lists / f"{part}.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    if name == "cifar":
        data = dataset_of("cifarfs", cifar_root, tmp_path / "cache", f"data.split={lists}")
    else:
        data = dataset_of("folder", write_tiny_folder(tmp_path / "root"), tmp_path / "cache", f"data.split={lists}")
    with pytest.raises(MetalearnError, match=f"{lists / 'train.txt'} is not a text file of class names"):
        data.load_split("train")


# Intact bytes (a valid checksum) of content this version did not write.
WRONG_CACHES = {
    "no images": lambda split: {"labels": split.labels},
    "another image size": lambda split: {"images": split.images[..., :4, :4], "labels": split.labels},
    "an image short": lambda split: {"images": split.images[1:], "labels": split.labels[1:]},
    "float images": lambda split: {"images": split.images.float(), "labels": split.labels},
    "not a dict": lambda split: [split.images, split.labels],
    "negative labels": lambda split: {"images": split.images, "labels": split.labels - 100},
}


@pytest.mark.parametrize("content", WRONG_CACHES.values(), ids=WRONG_CACHES)
def test_a_cache_of_another_structure_is_rebuilt(tmp_path, content):
    from metalearn.data.cache import save_cache

    root = write_tiny_folder(tmp_path / "root")
    first = dataset_of("folder", root, tmp_path / "cache").load_split("train")
    (cached,) = (tmp_path / "cache").glob("folder-*.pt")
    save_cache(cached, content(first))
    again = dataset_of("folder", root, tmp_path / "cache").load_split("train")
    assert again.images.dtype == torch.uint8 and torch.equal(again.images, first.images)
    assert torch.equal(again.labels, first.labels)


def test_an_mnist_cache_of_another_structure_is_rebuilt(tmp_path):
    from metalearn.data.cache import save_cache

    root = write_tiny_mnist(tmp_path / "root")
    first = dataset_of("mnist", root, tmp_path / "cache").load_split("test")
    (cached,) = (tmp_path / "cache").glob("mnist-*.pt")
    save_cache(cached, {"train": 1, "test": 2})  # pools that are not (images, labels) pairs
    again = dataset_of("mnist", root, tmp_path / "cache").load_split("test")
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)


def test_resuming_an_exported_file_says_to_resume_its_run(trained_run, tmp_path):
    exported = tmp_path / "model.safetensors"
    metalearn_cli("export", f"run={trained_run}", f"out={exported}", cwd=tmp_path)
    fails("train", f"resume={exported}", match="resume takes the run folder it was exported from", cwd=tmp_path)
