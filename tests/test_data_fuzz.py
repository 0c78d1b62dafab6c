"""Property-based: whatever a dataset's files hold (random bytes, pickles of any structure, any CSV text, any
image bytes, a damaged cache), loading it either works or raises one MetalearnError, never another exception."""

import functools
import io
import pickle
import shutil

import numpy as np
import pytest
import torch
from helpers.data import (
    png_declaring,
    write_tiny_cifar100,
    write_tiny_folder,
    write_tiny_miniimagenet,
    write_tiny_miniimagenet_pickles,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from metalearn.config.compose import compose
from metalearn.data import build_dataset
from metalearn.data.cache import checksum
from metalearn.errors import MetalearnError

FUZZ = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,  # the same examples on every machine: a CI time that does not vary
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure reports its example in seconds, not minutes
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@functools.cache
def composed(name: str, *overrides: str):
    return compose([f"data={name}", *overrides]).data  # composing takes a while: once per dataset


def dataset(name: str, root, cache, *overrides: str, **keys):
    """conf/data/<name>.yaml reading `root`, caching under `cache` (a fresh folder per example), with data.<key>
    set to each of `keys`."""
    data = composed(name, *overrides).copy()
    data.root, data.cache_dir = str(root), str(cache)
    for key, value in keys.items():
        data[key] = value
    return build_dataset(data)


def loads_or_one_error(load):
    """load()'s result, or None when it raised a MetalearnError; any other exception fails the test."""
    return loaded_or_error(load)[0]


def loaded_or_error(load):
    """(load()'s result, None), or (None, the MetalearnError it raised); any other exception fails the test."""
    try:
        return load(), None
    except MetalearnError as err:
        assert str(err).strip(), "an empty message"
        return None, err


# --- pickles ---------------------------------------------------------------------------------------------------
ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.int64, np.float32, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4),
)
KEYS = st.one_of(
    st.sampled_from(["image_data", "class_dict", "n01", "data", "fine_labels", "fine_label_names"]),
    st.sampled_from([b"data", b"fine_labels", b"fine_label_names", b"filenames"]),
    st.text(max_size=4),
    st.integers(-2, 2),
)
LEAVES = st.one_of(
    st.integers(-3, 300), st.text(max_size=6), st.binary(max_size=6), st.none(), st.booleans(), st.floats(), ARRAYS
)
STRUCTURES = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.tuples(children, children), st.dictionaries(KEYS, children, max_size=4)
    ),
    max_leaves=12,
)
ROWS = st.lists(st.integers(-1, 5), max_size=4)
# Close to a real miniImageNet pickle: images of any dtype and shape, rows that may be out of range.
NEAR_MINIIMAGENET = st.fixed_dictionaries(
    {
        "image_data": hnp.arrays(
            dtype=st.sampled_from([np.uint8, np.uint8, np.int16]),
            shape=st.tuples(st.integers(0, 5), st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 3, 3])),
        ),
        "class_dict": st.dictionaries(
            st.one_of(st.text(min_size=1, max_size=4), st.integers()),
            st.one_of(ROWS, ROWS.map(np.array), st.text(max_size=3)),
            max_size=3,
        ),
    }
)


@st.composite
def valid_miniimagenet(draw):
    """A well-formed miniImageNet pickle's content of a random size."""
    images = draw(hnp.arrays(np.uint8, st.tuples(st.integers(1, 5), st.integers(1, 9), st.integers(1, 9), st.just(3))))
    rows = st.lists(st.integers(0, len(images) - 1), min_size=1, max_size=4)
    classes = draw(st.dictionaries(st.text(min_size=1, max_size=4), st.one_of(rows, rows.map(np.array)), min_size=1))
    return {"image_data": images, "class_dict": classes}


# Close to a CIFAR-100 file: rows of any width, labels that may be out of range, names of any kind.
NEAR_CIFAR = st.one_of(
    st.fixed_dictionaries(
        {
            b"data": hnp.arrays(np.uint8, st.tuples(st.integers(0, 3), st.sampled_from([3072, 3072, 100]))),
            b"fine_labels": st.one_of(st.lists(st.integers(-1, 100), max_size=3), STRUCTURES),
        }
    ),
    st.fixed_dictionaries({b"fine_label_names": st.lists(st.one_of(st.binary(max_size=4), st.integers()))}),
)


def pickled(contents):
    """A pickle of `contents` at any protocol."""
    return st.tuples(contents, st.integers(0, 5)).map(lambda drawn: pickle.dumps(*drawn))


@st.composite
def damaged(draw, pickles):
    """A pickle cut short or with one byte changed."""
    data = draw(pickles)
    at = draw(st.integers(0, len(data) - 1))
    if draw(st.booleans()):
        return data[:at]
    return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]


def pickle_bytes(near):
    """Any bytes, a pickle of any structure, or one close to what the dataset wants: whole or damaged."""
    return st.one_of(st.binary(max_size=200), pickled(STRUCTURES), pickled(near), damaged(pickled(near)))


@FUZZ
@given(content=pickle_bytes(st.one_of(valid_miniimagenet(), NEAR_MINIIMAGENET)))
def test_any_miniimagenet_pickle_loads_or_is_one_error(tmp_path_factory, content):
    base = tmp_path_factory.mktemp("mini")
    (base / "root" / "miniimagenet").mkdir(parents=True)
    (base / "root" / "miniimagenet" / "mini-imagenet-cache-train.pkl").write_bytes(content)
    split = loads_or_one_error(
        lambda: dataset("miniimagenet", base / "root", base / "cache", "data.image_size=8").load_split("train")
    )
    if split is not None:
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 8, 8)
        assert len(split.labels) == len(split.images) and split.class_counts().min() > 0


@pytest.mark.parametrize("protocol", [2, 4, 5])
@settings(FUZZ, max_examples=5)
@given(per_class=st.integers(1, 3), size=st.integers(4, 12))
def test_a_valid_miniimagenet_pickle_loads_whatever_its_protocol(tmp_path_factory, protocol, per_class, size):
    base = tmp_path_factory.mktemp("mini")
    root = write_tiny_miniimagenet_pickles(base / "root", per_class, size)
    path = root / "miniimagenet" / "mini-imagenet-cache-val.pkl"
    content = pickle.loads(path.read_bytes())
    path.write_bytes(pickle.dumps(content, protocol=protocol))
    split = dataset("miniimagenet", root, base / "cache", f"data.image_size={size}").load_split("val")
    first = sorted(content["class_dict"])[0]
    expected = torch.as_tensor(content["image_data"][content["class_dict"][first]]).permute(0, 3, 1, 2)
    assert torch.equal(split.images[split.labels == 0], expected)


@settings(FUZZ, max_examples=10)
@given(content=valid_miniimagenet(), side=st.sampled_from([1, 2]))
def test_a_valid_miniimagenet_pickle_of_any_image_size_loads_at_data_image_size(tmp_path_factory, content, side):
    base = tmp_path_factory.mktemp("mini")
    (base / "root" / "miniimagenet").mkdir(parents=True)
    (base / "root" / "miniimagenet" / "mini-imagenet-cache-test.pkl").write_bytes(pickle.dumps(content))
    size = max(content["image_data"].shape[side], 4)  # one side may be data.image_size already
    split = dataset("miniimagenet", base / "root", base / "cache", image_size=size).load_split("test")
    assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, size, size)
    sizes = [len(content["class_dict"][name]) for name in sorted(content["class_dict"])]
    assert split.class_counts().tolist() == sizes


@pytest.fixture(scope="module")
def cifar_files(tmp_path_factory):
    return write_tiny_cifar100(tmp_path_factory.mktemp("cifar") / "root") / "cifar-100-python"


@FUZZ
@given(name=st.sampled_from(["train", "test", "meta"]), content=pickle_bytes(NEAR_CIFAR))
def test_any_cifar100_file_loads_or_is_one_error(tmp_path_factory, cifar_files, name, content):
    root = tmp_path_factory.mktemp("cifar")
    shutil.copytree(cifar_files, root / "cifar-100-python")
    (root / "cifar-100-python" / name).write_bytes(content)
    loads_or_one_error(lambda: dataset("cifarfs", root, root / "cache").load_split("test"))


# --- CSV split files -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mini_images(tmp_path_factory):
    images = write_tiny_miniimagenet(tmp_path_factory.mktemp("mini") / "root") / "miniimagenet" / "images"
    return images, sorted(p.name for p in images.iterdir())


@st.composite
def csv_text(draw, names):
    """Lines of a split file: the header, rows naming real or missing images and labels, or any text."""
    field = st.one_of(st.sampled_from(names), st.text(max_size=12), st.sampled_from(["", " ", "..", "/", "a\0b"]))
    row = st.lists(field, min_size=0, max_size=3).map(",".join)
    lines = draw(st.lists(st.one_of(row, st.just("filename,label"), st.text(max_size=30)), max_size=6))
    if draw(st.booleans()):
        lines = ["filename,label", *lines]
    return "\n".join(lines).encode("utf-8", "surrogatepass")


@FUZZ
@given(data=st.data())
def test_any_miniimagenet_csv_loads_or_is_one_error(tmp_path_factory, mini_images, data):
    images, names = mini_images
    content = data.draw(st.one_of(csv_text(names), st.binary(max_size=100)))
    base = tmp_path_factory.mktemp("csv")
    (base / "root" / "miniimagenet").mkdir(parents=True)
    (base / "root" / "miniimagenet" / "images").symlink_to(images)
    (base / "root" / "miniimagenet" / "test.csv").write_bytes(content)
    loads_or_one_error(
        lambda: dataset("miniimagenet", base / "root", base / "cache", "data.image_size=8").load_split("test")
    )


# --- image files -----------------------------------------------------------------------------------------------
@st.composite
def saved_image(draw):
    """A real image file of a random size, mode and format."""
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "1", "I;16"]))
    form = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP"] if mode in ("L", "RGB") else ["PNG"]))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    image = image.convert(mode) if mode != "I;16" else image.convert("L").convert("I;16")
    buffer = io.BytesIO()
    image.save(buffer, format=form)
    return buffer.getvalue()


HUGE = st.one_of(st.integers(0, 12000), st.sampled_from([30000, 65535, 2**31 - 1]))


@st.composite
def image_bytes(draw):
    """(bytes, whether they are a whole real image) under an image's name: random bytes, a real image (maybe cut
    short), or a PNG declaring any size."""
    kind = draw(st.sampled_from(["random", "image", "truncated", "header", "declared"]))
    if kind == "random":
        return draw(st.binary(max_size=200)), False
    if kind == "declared":
        return png_declaring(draw(HUGE), draw(HUGE)), False
    data = draw(saved_image())
    if kind == "header":  # one byte of the first 40 changed: a size, a chunk length, a magic number
        at = draw(st.integers(0, min(40, len(data)) - 1))
        return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :], False
    return (data, True) if kind == "image" else (data[: draw(st.integers(0, len(data) - 1))], False)


def folder_with(base, content: bytes, name: str):
    """Three class folders of one image each, one of them `content` saved as `name`."""
    for c in range(3):
        (base / "root" / f"c{c}").mkdir(parents=True)
        Image.new("L", (6, 6), 40 * c).save(base / "root" / f"c{c}" / "a.png")
    (base / "root" / "c1" / "a.png").unlink()
    (base / "root" / "c1" / name).write_bytes(content)
    data = dataset("folder", base / "root", base / "cache", "data.image_size=8")
    return lambda: [data.load_split(part) for part in ("train", "val", "test")]


def omniglot_with(base, content: bytes, name: str):
    """Both Omniglot archives extracted, one drawing each, one of them `content`."""
    for archive, alphabet in (("images_background", "A"), ("images_evaluation", "B")):
        folder = base / "root" / "omniglot-py" / archive / alphabet / "character01"
        folder.mkdir(parents=True)
        Image.new("L", (10, 10), 255).save(folder / "0001_01.png")
    (folder / "0001_01.png").write_bytes(content)  # Omniglot reads .png files only
    return lambda: dataset("omniglot", base / "root", base / "cache").load_split("test")


def miniimagenet_with(base, content: bytes, name: str):
    """A test.csv listing two images, one of them `content`."""
    images = base / "root" / "miniimagenet" / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (9, 7)).save(images / "good.jpg")
    (images / name).write_bytes(content)
    (images.parent / "test.csv").write_text(f"filename,label\ngood.jpg,n01\n{name},n02\n")
    return lambda: dataset("miniimagenet", base / "root", base / "cache", "data.image_size=8").load_split("test")


@pytest.mark.parametrize("layout", [folder_with, omniglot_with, miniimagenet_with], ids=["folder", "omniglot", "mini"])
@FUZZ
@given(image=image_bytes(), name=st.sampled_from(["x.png", "x.jpg", "x.gif"]))
def test_any_image_file_loads_or_is_one_error(tmp_path_factory, layout, image, name):
    content, whole = image
    _, error = loaded_or_error(layout(tmp_path_factory.mktemp("images"), content, name))
    if whole:  # a real image is read (Omniglot's one drawing per character is then an incomplete dataset)
        assert error is None or "incomplete" in str(error), error


# --- the cache -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cached_folder(tmp_path_factory):
    """A tiny image folder, its train split, and the bytes and name of the cache file that split left."""
    base = tmp_path_factory.mktemp("cached")
    root = write_tiny_folder(base / "root", classes=4, per_class=3)
    split = dataset("folder", root, base / "cache", "data.image_size=8").load_split("train")
    (cache,) = (base / "cache").glob("folder-*.pt")
    return root, split, cache.name, cache.read_bytes()


TENSORS = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.int64, np.float32]),
    shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6),
).map(torch.from_numpy)


@st.composite
def cache_bytes(draw, good: bytes):
    """A damaged cache: random or cut-short bytes, or intact bytes with a valid checksum of the wrong content."""
    kind = draw(st.sampled_from(["random", "truncated", "content"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "truncated":
        return good[: draw(st.integers(0, len(good) - 1))]
    content = draw(
        st.one_of(
            st.dictionaries(st.sampled_from(["images", "labels", "names"]), TENSORS, max_size=3),
            st.lists(TENSORS, max_size=2),
            st.integers(),
        )
    )
    buffer = io.BytesIO()
    torch.save({"content": content, "sha256": checksum(content)}, buffer)
    return buffer.getvalue()


@FUZZ
@given(data=st.data())
def test_a_damaged_cache_is_rebuilt(tmp_path_factory, cached_folder, data):
    root, split, name, good = cached_folder
    cache = tmp_path_factory.mktemp("cache")
    (cache / name).write_bytes(data.draw(cache_bytes(good)))
    again = dataset("folder", root, cache, "data.image_size=8").load_split("train")
    assert torch.equal(again.images, split.images) and torch.equal(again.labels, split.labels)


# --- the command line ------------------------------------------------------------------------------------------
def test_a_damaged_dataset_file_is_one_error_line(cli, tmp_path):
    base = tmp_path / "root" / "miniimagenet"
    base.mkdir(parents=True)
    # class names that cannot be sorted: a traceback deep in the loader, once
    content = {"image_data": np.zeros((2, 8, 8, 3), np.uint8), "class_dict": {1: [0], "n02": [1]}}
    (base / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps(content))
    data = ["data=miniimagenet", f"data.root={tmp_path / 'root'}", f"data.cache_dir={tmp_path / 'cache'}"]
    result = cli("train", *data, "train.steps=1", "device=cpu", cwd=tmp_path, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("metalearn: error: ")]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert errors == [
        f"metalearn: error: {base / 'mini-imagenet-cache-train.pkl'} is not a miniImageNet pickle (a dict of "
        f"image_data, uint8 [N, 84, 84, 3], and class_dict: class -> row indices): class_dict has the class name 1, "
        f"not a string; replace it with a complete copy."
    ], result.stderr
