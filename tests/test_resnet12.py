"""model=resnet12: the network computed by hand, DropBlock, and every kind of algorithm on it."""

import pytest
import torch
import torch.nn.functional as F
from helpers.runs import overrides_for, train_resume_eval

from metalearn.config.compose import compose
from metalearn.models import build_model
from metalearn.models.resnet12 import DropBlock

SMALL = ["model=resnet12", "model.channels=[4,6,8,10]"]


def by_hand(model, x):
    """ResNet-12 from its description with the model's weights, in plain torch functions."""

    def bn(t, norm):
        return F.batch_norm(t, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)

    for block in list(model.features)[:4]:
        c1, n1, _, c2, n2, _, c3, n3 = block.body
        out = F.leaky_relu(bn(F.conv2d(x, c1.weight, padding=1), n1), 0.1)
        out = F.leaky_relu(bn(F.conv2d(out, c2.weight, padding=1), n2), 0.1)
        out = bn(F.conv2d(out, c3.weight, padding=1), n3)
        shortcut = bn(F.conv2d(x, block.shortcut[0].weight), block.shortcut[1])
        x = F.max_pool2d(F.leaky_relu(out + shortcut, 0.1), 2)
    return F.linear(x.mean(dim=(2, 3)), model.head.weight, model.head.bias)


@pytest.mark.parametrize("image_shape", [(3, 84, 84), (1, 28, 28)], ids=["3x84x84", "1x28x28"])
def test_resnet12_computes_its_description(image_shape):
    torch.manual_seed(0)
    model = build_model(compose(SMALL).model, 5, image_shape).double()
    x = torch.rand(3, *image_shape, dtype=torch.float64)
    assert model.feature_size == 10 and model.features(x).shape == (3, 10)
    assert torch.allclose(model(x), by_hand(model, x), atol=1e-12)


def test_the_default_resnet12_has_the_papers_widths():
    model = build_model(compose(["model=resnet12"]).model, 5, (3, 84, 84))
    assert [block.shortcut[0].out_channels for block in list(model.features)[:4]] == [64, 160, 320, 640]
    assert sum(p.numel() for p in model.parameters()) == 12_424_320 + 640 * 5 + 5


def test_dropblock_drops_square_blocks_in_training_and_keeps_the_scale():
    torch.manual_seed(0)
    drop = DropBlock(0.1, 3)
    x = torch.ones(64, 8, 10, 10)
    drop.train()
    y = drop(x)
    assert 0.85 < (y > 0).float().mean() < 0.95  # about the rate dropped
    assert y.mean().item() == pytest.approx(1.0, rel=1e-5)  # the kept values scaled up
    zeros = (y[0, 0] == 0).nonzero()
    if len(zeros):  # a dropped centre takes its 3x3 neighbourhood with it
        r, c = zeros[0].tolist()
        assert (y[0, 0, r : r + 3, c : c + 3] == 0).all() or r + 3 > 10 or c + 3 > 10 or (y[0, 0, r, c:] == 0).any()
    drop.eval()
    assert torch.equal(drop(x), x)


@pytest.mark.parametrize("algo, strategy", [("protonet", "loop"), ("maml", "vmap")])
def test_a_model_with_dropblock_trains(cli, tiny_overrides, tmp_path, algo, strategy):
    plain = [o for o in tiny_overrides if not o.startswith("model.")]
    overrides = [*overrides_for(algo, plain), *SMALL, "model.dropblock=0.1", "model.dropblock_size=2"]
    run = tmp_path / "run"
    cli("train", *overrides, f"algo.vectorize={strategy}", "train.steps=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("algo", ["maml", "fomaml", "protonet", "reptile", "finetune"])
def test_every_kind_of_algorithm_trains_resumes_and_evaluates_on_resnet12(cli, tiny_overrides, tmp_path, algo):
    overrides = [*overrides_for(algo, [o for o in tiny_overrides if not o.startswith("model.")]), *SMALL]
    train_resume_eval(cli, overrides, tmp_path, algo)


def test_maml_vmaps_over_resnet12(cli, tiny_overrides, tmp_path):
    overrides = [*overrides_for("maml", [o for o in tiny_overrides if not o.startswith("model.")]), *SMALL]
    train_resume_eval(cli, [*overrides, "algo.vectorize=vmap"], tmp_path, "maml")
