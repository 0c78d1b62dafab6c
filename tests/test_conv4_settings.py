"""conv4's model.activation and model.init: what each computes, in every layout, and the defaults unchanged."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from metalearn.config.compose import compose
from metalearn.config.validate import validate
from metalearn.errors import MetalearnError
from metalearn.models import LAYOUTS, VMAP, Conv4, build_model, set_layout

ACTIVATIONS = {"relu": F.relu, "leaky_relu": lambda x: F.leaky_relu(x, 0.01)}


def textbook_forward(model: Conv4, x: torch.Tensor, activation: str) -> torch.Tensor:
    """conv3x3 -> BatchNorm (batch statistics) -> activation -> max-pool 2x2, four times, then the head."""
    state = dict(model.named_parameters())
    for i in range(4):
        x = F.conv2d(x, state[f"features.{i}.0.weight"], state[f"features.{i}.0.bias"], padding=1)
        x = F.batch_norm(x, None, None, state[f"features.{i}.1.weight"], state[f"features.{i}.1.bias"], training=True)
        x = F.max_pool2d(ACTIVATIONS[activation](x), 2)
    return F.linear(x.flatten(1), state["head.weight"], state["head.bias"])


def conv4(seed=0, **settings) -> Conv4:
    torch.manual_seed(seed)
    return Conv4(5, hidden=8, **settings).double()


def test_default_settings_build_torchs_plain_network():
    """relu and torch's default initialisation: the same weights, drawn in the same order, as plain torch layers."""
    torch.manual_seed(0)
    plain = []
    for i in range(4):
        plain += [nn.Conv2d(1 if i == 0 else 8, 8, 3, padding=1), nn.BatchNorm2d(8)]
    plain.append(nn.Linear(8, 5))
    expected = [p for layer in plain for p in layer.parameters()]
    torch.manual_seed(0)
    built = build_model(compose(["model.hidden=8"]).model, 5, (1, 28, 28))
    got = list(built.parameters())
    assert len(got) == len(expected) and all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    assert [type(block[3]) for block in built.features[:4]] == [nn.ReLU] * 4


def test_leaky_relu_is_the_activation_in_every_layout():
    model, x = conv4(activation="leaky_relu"), torch.rand(6, 1, 28, 28, dtype=torch.float64)
    expected = textbook_forward(model, x, "leaky_relu")
    # BatchNorm centres each channel: pre-activations below zero are many, and relu would give another output
    assert not torch.allclose(expected, textbook_forward(model, x, "relu"), atol=1e-6)
    for layout in LAYOUTS:
        set_layout(model, layout)
        assert torch.allclose(model(x), expected, rtol=1e-10, atol=1e-12), layout


def test_leaky_relu_under_vmap_and_bf16_autocast():
    """MAML's vmap strategy: per-task gradients through the leaky activation equal a loop's, in float32 and
    under bf16 autocast, where the activation computes in bf16."""
    model = conv4(activation="leaky_relu", init="xavier").float()
    params = {n: p.detach() for n, p in model.named_parameters()}
    tasks, labels = torch.rand(3, 5, 1, 28, 28), torch.arange(5).repeat(3, 1)

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    set_layout(model, VMAP)
    for amp, tolerance in [(False, 1e-5), (True, 1e-2)]:
        model.features.amp = amp
        looped = [grad(loss)(params, x, y) for x, y in zip(tasks, labels, strict=True)]
        scale = max(g.abs().max() for task in looped for g in task.values())
        vmapped = vmap(grad(loss), in_dims=(None, 0, 0))(params, tasks, labels)
        for name, g in vmapped.items():
            expected = torch.stack([task[name] for task in looped])
            assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
            assert (g - expected).abs().max() <= tolerance * scale, (name, amp)


def test_leaky_relu_computes_in_bf16_under_autocast_channels_last():
    model = conv4(activation="leaky_relu", channels_last=True).float()
    model.features.amp = True
    seen = []

    def check(module, args, out):
        x = args[0]
        seen.append(out.dtype == torch.bfloat16 and bool((x < 0).any()) and torch.equal(out, F.leaky_relu(x, 0.01)))

    for block in model.features[:4]:
        block[3].register_forward_hook(check)
    assert model(torch.rand(6, 1, 28, 28)).dtype == torch.float32
    assert seen == [True] * 4


def xavier_bound(weight: torch.Tensor) -> float:
    fan_in, fan_out = weight.shape[1] * weight[0, 0].numel(), weight.shape[0] * weight[0, 0].numel()
    return math.sqrt(6 / (fan_in + fan_out))


def test_xavier_init_gives_xavier_uniform_weights_and_zero_biases():
    model = conv4(init="xavier")
    layers = [block[0] for block in model.features[:4]] + [model.head]
    for layer in layers:
        bound = xavier_bound(layer.weight)
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
        # uniform on [-bound, bound]: standard deviation bound / sqrt(3)
        assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.25)
    norms = [block[1] for block in model.features[:4]]  # BatchNorm's scale 1 and shift 0, as the reference
    assert all(torch.equal(n.weight, torch.ones(8, dtype=n.weight.dtype)) and not n.bias.any() for n in norms)
    # the draws differ from the default's
    assert not torch.equal(model.head.weight, conv4().head.weight)


def test_the_settings_are_checked_and_reach_the_model():
    cfg = compose(["model.activation=leaky_relu", "model.init=xavier"])
    validate(cfg)
    model = build_model(cfg.model, 5, (1, 28, 28))
    assert all(isinstance(block[3], nn.LeakyReLU) and block[3].negative_slope == 0.01 for block in model.features[:4])
    assert not model.head.bias.any()
    for key, value, allowed in [("activation", "gelu", "relu, leaky_relu"), ("init", "kaiming", "default, xavier")]:
        with pytest.raises(MetalearnError, match=rf"model\.{key}: .*'{value}'.*\[{allowed}\]"):
            validate(compose([f"model.{key}={value}"]))


@pytest.mark.parametrize("preset", ["5w1s", "5w5s", "20w1s", "20w5s"])
def test_the_mamlpp_presets_build_the_reference_codes_conv4(preset):
    model = compose([f"experiment=mamlpp_omniglot_{preset}"]).model
    assert (model.activation, model.init) == ("leaky_relu", "xavier")
