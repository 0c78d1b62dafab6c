"""learn2learn as its examples write it, on its own conv4 holding metalearn's initial weights.

learn2learn is optional (`bash scripts/install_learn2learn.sh`): it is imported where it is used.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from metalearn.config.compose import compose
from metalearn.data.cache import cache_dir
from metalearn.models import build_model

from .common import IMAGE_SHAPE


def make_model(ways: int, dtype=torch.float32) -> torch.nn.Module:
    """The runner's conv4 (models.build_model) for Omniglot images, with the seed-0 initial weights."""
    torch.manual_seed(0)
    return build_model(compose().model, ways, IMAGE_SHAPE).to(dtype)


def learn2learn_model(ways: int, dtype=torch.float32) -> torch.nn.Module:
    """learn2learn's own conv4 (conv, BatchNorm, ReLU, max-pool blocks) holding metalearn's initial weights.

    ways=0 gives the embedding network (ProtoNet).
    """
    from learn2learn.vision.models import ConvBase

    layers = [ConvBase(hidden=64, channels=1, max_pool=True, layers=4), torch.nn.Flatten()]
    if ways:
        layers.append(torch.nn.Linear(64, ways))
    model = torch.nn.Sequential(*layers).to(dtype)
    ours = make_model(ways, dtype=dtype).state_dict()
    with torch.no_grad():
        for theirs, mine in zip(learn2learn_names(ways), ours, strict=False):
            model.get_parameter(theirs).copy_(ours[mine])
    return model


def learn2learn_names(ways: int):
    """learn2learn's parameter names in the order of metalearn's."""
    body = [f"0.{i}.{part}.{kind}" for i in range(4) for part in ("conv", "normalize") for kind in ("weight", "bias")]
    return body + (["2.weight", "2.bias"] if ways else [])


class Learn2LearnLoop:
    """One backward() per task, gradients averaged over the meta-batch, then the optimizer's step."""

    def __init__(self, module: torch.nn.Module):
        self.optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
        self.params = list(module.parameters())

    def accumulate(self, tasks) -> None:
        self.optimizer.zero_grad()
        count = 0
        for task in tasks:
            self.task_backward(*task)
            count += 1
        for p in self.params:
            p.grad.data.mul_(1.0 / count)

    def train_on(self, tasks) -> None:
        self.accumulate(tasks)
        self.optimizer.step()

    def meta_train_step(self, episodes) -> None:
        self.train_on(zip(*episodes, strict=False))


class Learn2LearnMAML(Learn2LearnLoop):
    """learn2learn's MAML Omniglot example: clone() and adapt() per task."""

    def __init__(self, ways, inner_lr: float, inner_steps: int, first_order: bool, dtype=torch.float32):
        import learn2learn as l2l

        self.maml = l2l.algorithms.MAML(learn2learn_model(ways, dtype), lr=inner_lr, first_order=first_order)
        super().__init__(self.maml)
        self.inner_steps = inner_steps

    def task_backward(self, sx, sy, qx, qy):
        learner = self.maml.clone()
        for _ in range(self.inner_steps):
            learner.adapt(F.cross_entropy(learner(sx), sy))
        F.cross_entropy(learner(qx), qy).backward()

    def gradients(self, episodes):
        """The meta-gradient by metalearn's parameter names."""
        self.accumulate(zip(*episodes, strict=False))
        params = dict(self.maml.module.named_parameters())
        ours = [name for name, _ in make_model(2).named_parameters()]
        return {mine: params[theirs].grad for mine, theirs in zip(ours, learn2learn_names(2), strict=False)}


class Learn2LearnProtoNet(Learn2LearnLoop):
    """learn2learn's ProtoNet example: embed, class-mean prototypes, negative squared distances."""

    def __init__(self):
        self.model = learn2learn_model(0)
        super().__init__(self.model)

    def task_backward(self, sx, sy, qx, qy):
        ways = int(sy.max()) + 1
        embeddings = self.model(torch.cat([sx, qx]))
        support, query = embeddings[: len(sx)], embeddings[len(sx) :]
        prototypes = torch.stack([support[sy == c].mean(dim=0) for c in range(ways)])
        logits = -((query.unsqueeze(1) - prototypes.unsqueeze(0)) ** 2).sum(dim=2)
        F.cross_entropy(logits, qy).backward()


def learn2learn_tasks(row: dict):
    """learn2learn's Omniglot benchmark tasksets on local files; a function drawing one task.

    torchvision's Omniglot checks the zips' md5 against the original
    download, which our re-encoded copies do not match, so the archives are
    extracted once into the cache and that check is pointed at the folders.
    """
    import zipfile

    import learn2learn as l2l
    import torchvision

    root = cache_dir(None) / "learn2learn-omniglot"
    for part in ("images_background", "images_evaluation"):
        if not (root / "omniglot-py" / part).is_dir():
            with zipfile.ZipFile(Path(row["data_root"]) / "omniglot-py" / f"{part}.zip") as archive:
                archive.extractall(root / "omniglot-py")
    torchvision.datasets.Omniglot._check_integrity = lambda self: (Path(self.root) / self._get_target_folder()).is_dir()
    tasksets = l2l.vision.benchmarks.get_tasksets(
        "omniglot",
        train_ways=row["ways"],
        train_samples=row["shots"] + row["queries"],
        test_ways=row["ways"],
        test_samples=row["shots"] + row["queries"],
        root=str(root),
    )
    per_class = row["shots"] + row["queries"]
    support = (torch.arange(row["ways"] * per_class) % per_class) < row["shots"]

    def draw():
        data, labels = tasksets.train.sample()
        return data[support], labels[support], data[~support], labels[~support]

    return draw
