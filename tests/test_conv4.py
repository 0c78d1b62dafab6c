"""Conv4 computes the textbook conv-BatchNorm-ReLU-max-pool network, in either memory format."""

import pytest
import torch
import torch.nn.functional as F

from metalearn.errors import MetalearnError
from metalearn.models import Conv4, in_nchw


def textbook_forward(model: Conv4, x: torch.Tensor) -> torch.Tensor:
    """conv3x3 -> BatchNorm (batch statistics) -> ReLU -> max-pool 2x2, four times, then the head."""
    state = dict(model.named_parameters())
    for i in range(4):
        x = F.conv2d(x, state[f"features.{i}.0.weight"], state[f"features.{i}.0.bias"], padding=1)
        x = F.batch_norm(x, None, None, state[f"features.{i}.1.weight"], state[f"features.{i}.1.bias"], training=True)
        x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), state["head.weight"], state["head.bias"])


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv4_matches_the_textbook_network_and_its_gradients(channels_last):
    torch.manual_seed(0)
    model = Conv4(5, channels_last=channels_last).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(-1, 1)  # negative scales too: max-pool must still come after the ReLU's effect
    x = torch.rand(10, 1, 28, 28, dtype=torch.float64)
    reference = Conv4(5).double()
    reference.load_state_dict(model.state_dict())
    params = list(reference.parameters())
    expected = textbook_forward(reference, x)
    got = model(x)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    got_grads = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    for g, e in zip(got_grads, expected_grads, strict=False):
        assert torch.allclose(g, e, rtol=1e-9, atol=1e-12)


def test_channels_last_reaches_every_layer():
    """The one-channel input is layout-ambiguous; the first convolution's output must be NHWC."""
    model = Conv4(5, channels_last=True)
    seen = []
    for block in model.features[:4]:
        block[1].register_forward_pre_hook(
            lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
    model(torch.rand(4, 1, 28, 28))
    assert seen == [True] * 4


def test_in_nchw_switches_the_layout_for_the_block_only():
    """MAML's twice-differentiated passes run in NCHW: the same outputs, and channels-last again after."""
    torch.manual_seed(0)
    model = Conv4(5, channels_last=True).double()
    seen = []
    model.features[1][1].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    expected = model(x)
    with in_nchw(model):
        inside = model(x)
    after = model(x)
    assert seen == [True, False, True]
    assert torch.allclose(inside, expected, rtol=1e-10, atol=1e-12) and torch.equal(after, expected)


def test_conv4_is_built_for_the_datasets_channels_and_image_size():
    """miniImageNet-shaped input: 3 channels, 84x84 -> a 5x5 map, 25 x hidden features, the same network."""
    torch.manual_seed(0)
    model = Conv4(5, hidden=8, in_channels=3, image_size=84).double()
    x = torch.rand(2, 3, 84, 84, dtype=torch.float64)
    assert model.feature_size == 8 * 5 * 5 and model.features(x).shape == (2, 200)
    assert torch.allclose(model(x), textbook_forward(model, x), atol=1e-12)
    with pytest.raises(MetalearnError, match="16x16 at least"):
        Conv4(5, image_size=15)
