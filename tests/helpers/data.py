"""A tiny Omniglot generated on the fly, in the real archives' format, and where the real data lives."""

import gzip
import io
import zipfile
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tiny Omniglot: alphabet -> (archive, number of characters).
TINY_ALPHABETS = {"Alpha": ("images_background", 8), "Beta": ("images_evaluation", 4)}
TINY_SPLIT = {
    # train: 6 characters x 2 rotations = 12 classes; val: 2 x 4 = 8; test: 4 x 4 = 16
    "train": [f"Alpha/character{c:02d}/rot{r:03d}" for c in range(1, 7) for r in (0, 90)],
    "val": [f"Alpha/character{c:02d}/rot{r:03d}" for c in (7, 8) for r in (0, 90, 180, 270)],
    "test": [f"Beta/character{c:02d}/rot{r:03d}" for c in range(1, 5) for r in (0, 90, 180, 270)],
}


def drawing(character_seed: int, drawer: int) -> Image.Image:
    """A 105x105 1-bit image, ink black on white like Omniglot: the character's
    strokes (fixed by its seed), slightly shifted per drawer."""
    g = torch.Generator().manual_seed(character_seed)
    canvas = torch.ones(105, 105, dtype=torch.uint8)
    shift = torch.randint(-3, 4, (2,), generator=torch.Generator().manual_seed(1000 * character_seed + drawer))
    for _ in range(4):
        y, x = (torch.randint(15, 75, (2,), generator=g) + shift).tolist()
        h, w = torch.randint(6, 30, (2,), generator=g).tolist()
        canvas[y : y + h, x : x + w] = 0
    return Image.fromarray(canvas.mul(255).numpy()).convert("1")


def write_tiny_omniglot(root: Path, as_zip: bool = True) -> Path:
    base = root / "omniglot-py"
    base.mkdir(parents=True, exist_ok=True)
    seed, global_id = 0, 0
    files = {}
    for alphabet, (archive, characters) in TINY_ALPHABETS.items():
        for c in range(1, characters + 1):
            seed += 1
            global_id += 1
            for d in range(1, 21):
                buffer = io.BytesIO()
                drawing(seed, d).save(buffer, format="PNG")
                files.setdefault(archive, {})[f"{archive}/{alphabet}/character{c:02d}/{global_id:04d}_{d:02d}.png"] = (
                    buffer.getvalue()
                )
    for archive, members in files.items():
        if as_zip:
            with zipfile.ZipFile(base / f"{archive}.zip", "w") as z:
                for name, data in members.items():
                    z.writestr(name, data)
        else:
            for name, data in members.items():
                path = base / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    return root


def write_tiny_split(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for part, classes in TINY_SPLIT.items():
        (folder / f"{part}.txt").write_text("\n".join(classes) + "\n")
    return folder


PER_DIGIT = {"train": 25, "t10k": 22}


def write_idx(path: Path, magic: int, tensor: torch.Tensor, compress: bool) -> None:
    header = b"".join(n.to_bytes(4, "big") for n in (magic, *tensor.shape))
    data = header + tensor.to(torch.uint8).numpy().tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def write_tiny_mnist(root: Path, compress: bool = True) -> Path:
    """Images encode (pool, index) in their first pixels so splits can be traced to images."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for pool_id, (prefix, per_digit) in enumerate(PER_DIGIT.items()):
        labels = torch.arange(10).repeat(per_digit)  # interleaved, as in MNIST
        images = torch.zeros(len(labels), 28, 28, dtype=torch.uint8)
        images[:, 0, 0] = pool_id + 1
        images[:, 0, 1] = torch.arange(len(labels)) % 256
        images[:, 0, 2] = torch.arange(len(labels)) // 256
        images[:, 10:18, 10:18] = (labels * 25).to(torch.uint8)[:, None, None]  # a digit-dependent blob
        write_idx(raw / f"{prefix}-images-idx3-ubyte{'.gz' if compress else ''}", 2051, images, compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{'.gz' if compress else ''}", 2049, labels, compress)
    return root


def tiny_omniglot(base: Path) -> list:
    """A tiny Omniglot (12/8/16 classes for train/val/test) and the data.* overrides that select it."""
    root, split = write_tiny_omniglot(base / "root"), write_tiny_split(base / "split")
    return ["data=omniglot", f"data.root={root}", f"data.split={split}", f"data.cache_dir={base / 'cache'}"]


def tiny_mnist(base: Path) -> list:
    """Tiny MNIST files (digits 0-4 train, 5-9 val and test) and the data.* overrides that select them."""
    return ["data=mnist", f"data.root={write_tiny_mnist(base / 'root')}", f"data.cache_dir={base / 'cache'}"]


def write_tiny_folder(root: Path, classes: int = 8, per_class: int = 6) -> Path:
    """Class folders of real image files: PNG and JPEG, grey and RGB, of several sizes (data=folder reads any)."""
    for c in range(classes):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(c)
        for i in range(per_class):
            size = (20 + 4 * (i % 3), 24 + 2 * (c % 4))
            pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy()
            image = Image.fromarray(pixels, "RGB")
            if i % 2:
                image.convert("L").save(folder / f"{i}.png")
            else:
                image.save(folder / f"{i}.jpg", quality=95)
    (root / "notes.txt").write_text("not a class folder\n")
    return root


def write_mnist_folder(shared: Path, root: Path, per_digit: int) -> Path:
    """The first `per_digit` MNIST test images of each digit as PNGs in a folder per digit."""
    from metalearn.data.mnist import load_pools

    images, labels = load_pools(str(shared), str(root.parent / "mnist-cache"), False)["test"]
    for digit in range(10):
        folder = root / f"digit{digit}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, index in enumerate((labels == digit).nonzero().flatten()[:per_digit].tolist()):
            Image.fromarray(images[index].numpy(), "L").save(folder / f"{i:03d}.png")
    return root


def tiny_folder(base: Path) -> list:
    """A tiny image folder (8 classes) and the data.* overrides that select it."""
    return ["data=folder", f"data.root={write_tiny_folder(base / 'root')}", f"data.cache_dir={base / 'cache'}"]


def cifar100_names() -> list:
    """CIFAR-100's fine class names in its label order (alphabetical), from the shipped CIFAR-FS lists."""
    from importlib import resources

    lists = resources.files("metalearn.data") / "splits" / "cifar100" / "cifarfs"
    return sorted(line for part in ("train", "val", "test") for line in (lists / f"{part}.txt").read_text().split())


def class_coloured(labels, generator):
    """CIFAR rows [n, 3072] (channel planes) of a colour per class under noise: a preview shows the classes."""
    import numpy as np

    colours = np.stack([(53 * labels) % 256, (97 * labels + 80) % 256, (151 * labels + 160) % 256], axis=1)
    planes = np.repeat(colours * 0.75, 1024, axis=1) + generator.integers(0, 60, (len(labels), 3072))
    return planes.clip(0, 255).astype(np.uint8)


def write_tiny_cifar100(root: Path, per_class: dict = None) -> Path:
    """cifar-100-python/{train,test,meta} as the CIFAR-100 archive has them (python pickles of numpy
    arrays with bytes keys), with `per_class` random 32x32 images per class in each set."""
    import pickle

    import numpy as np

    per_class = per_class or {"train": 2, "test": 1}
    names = cifar100_names()
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    for name, count in per_class.items():
        fine = [label for label in range(100) for _ in range(count)]
        content = {
            b"filenames": [f"{name}_{i}.png".encode() for i in range(len(fine))],
            b"batch_label": f"{name} batch".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [label // 5 for label in fine],
            b"data": class_coloured(np.array(fine), generator),
        }
        (base / name).write_bytes(pickle.dumps(content, protocol=2))
    meta = {
        b"fine_label_names": [n.encode() for n in names],
        b"coarse_label_names": [f"superclass{i:02d}".encode() for i in range(20)],
    }
    (base / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def tiny_cifarfs(base: Path) -> list:
    return ["data=cifarfs", f"data.root={write_tiny_cifar100(base / 'root')}"]


def tiny_fc100(base: Path) -> list:
    return ["data=fc100", f"data.root={write_tiny_cifar100(base / 'root')}"]


MINI_CLASSES = {"train": 6, "val": 5, "test": 5}


def mini_class(part: str, index: int) -> str:
    """A WordNet-id-like class name, as miniImageNet's labels are (n01532829)."""
    return f"n{ {'train': 1, 'val': 2, 'test': 3}[part]:02d}{index:06d}"


def write_tiny_miniimagenet(root: Path, per_class: int = 3) -> Path:
    """miniimagenet/images/*.jpg (of several sizes) and the Ravi & Larochelle CSVs (filename,label)."""
    base = root / "miniimagenet"
    (base / "images").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for part, classes in MINI_CLASSES.items():
        lines = ["filename,label"]
        for c in range(classes):
            label = mini_class(part, c)
            for i in range(per_class):
                name = f"{label}{i + 1:08d}.jpg"
                size = (90 + 7 * i, 84 + 5 * c)
                # a colour per class under the noise, so a preview shows which images belong together
                colour = torch.tensor([(53 * c) % 256, (97 * c + 80) % 256, (151 * c + 160) % 256])
                noise = torch.randint(0, 60, (size[1], size[0], 3), generator=generator)
                pixels = (colour * 0.75 + noise).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy(), "RGB").save(base / "images" / name, quality=95)
                lines.append(f"{name},{label}")
        (base / f"{part}.csv").write_text("\n".join(lines) + "\n")
    return root


def write_tiny_miniimagenet_pickles(root: Path, per_class: int = 3, size: int = 84) -> Path:
    """miniimagenet/mini-imagenet-cache-<part>.pkl: {"image_data": uint8 [N, size, size, 3], "class_dict"}."""
    import pickle

    base = root / "miniimagenet"
    base.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1)
    for part, classes in MINI_CLASSES.items():
        count = classes * per_class
        data = torch.randint(0, 256, (count, size, size, 3), generator=generator, dtype=torch.uint8).numpy()
        # rows of a class need not be contiguous: interleave them
        class_dict = {mini_class(part, c): list(range(c, count, classes)) for c in range(classes)}
        content = {"image_data": data, "class_dict": class_dict}
        (base / f"mini-imagenet-cache-{part}.pkl").write_bytes(pickle.dumps(content, protocol=4))
    return root


def tiny_miniimagenet(base: Path) -> list:
    root = write_tiny_miniimagenet(base / "root")
    return ["data=miniimagenet", f"data.root={root}", f"data.cache_dir={base / 'cache'}"]


# Per dataset of conf/data: a writer of small files in its exact on-disk format (the contract tests use it).
TINY_DATASETS = {
    "omniglot": tiny_omniglot,
    "mnist": tiny_mnist,
    "folder": tiny_folder,
    "cifarfs": tiny_cifarfs,
    "fc100": tiny_fc100,
    "miniimagenet": tiny_miniimagenet,
}


def tiny_data_config(tiny_data: dict):
    """The composed data.* node of the tiny Omniglot fixture (conftest's tiny_data)."""
    from metalearn.config.compose import compose

    keys = {"root": tiny_data["root"], "split": tiny_data["split"], "cache_dir": tiny_data["cache"]}
    return compose([f"data.{key}={value}" for key, value in keys.items()]).data


def png_declaring(width: int, height: int) -> bytes:
    """A grey PNG whose header declares width x height pixels, followed by almost no pixel data: what a
    decompression bomb or a truncated download looks like to a decoder."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    pixels = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def dataset_of(name: str, root: Path, cache: Path, *overrides):
    """The Dataset of conf/data/<name>.yaml reading `root`, caching under `cache`."""
    from metalearn.config.compose import compose
    from metalearn.data import build_dataset

    data = compose([f"data={name}", f"data.root={root}", f"data.cache_dir={cache}", *overrides]).data
    return build_dataset(data)
