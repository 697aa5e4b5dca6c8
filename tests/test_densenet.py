"""DenseNet plugin: parity with torchvision, dense connectivity, memory-efficient mode (the contract: test_backbone_contract)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from cvtasks.backbone import Classifier, create_classifier
from cvtasks.checks import check_parity, count_parameters
from cvtasks.registry import create_backbone, list_backbones
from plugins.densenet import DenseBlock, DenseNet

SLOW = {"densenet161", "densenet201"}
PARAMS = [n if n not in SLOW else pytest.param(n, marks=pytest.mark.slow) for n in list_backbones("densenet*")]


@pytest.mark.parametrize("name", PARAMS)
def test_parity(name: str) -> None:
    assert check_parity(name).startswith("ok")


def test_levels_and_channels() -> None:
    # DenseNet-121: 64 + 6*32 = 256, /2 + 12*32 = 512, /2 + 24*32 = 1024, /2 + 16*32 = 1024
    model = create_backbone("densenet121")
    assert [(f.name, f.channels, f.stride) for f in model.feature_info] == [
        ("block1", 256, 4), ("block2", 512, 8), ("block3", 1024, 16), ("block4", 1024, 32)
    ]
    # the last level is after the final norm and ReLU: non-negative
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 32, 32))
    assert out["block4"].min() >= 0 and out["block3"].min() < 0


def test_dense_block_concatenates_input_and_every_layer() -> None:
    torch.manual_seed(0)
    block = DenseBlock(num_layers=3, in_channels=8, growth_rate=4).eval()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        out = block(x)
        assert out.shape == (2, 8 + 3 * 4, 5, 5)
        torch.testing.assert_close(out[:, :8], x)  # the input passes through untouched
        first = block["denselayer1"]([x])
        torch.testing.assert_close(out[:, 8:12], first)
        # layer 2 sees input and layer 1's maps: its first norm is sized for 12 channels
        assert block["denselayer2"].norm1.num_features == 12


def test_memory_efficient_gives_same_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    plain = DenseNet(block_config=(2, 2), growth_rate=8, num_init_features=16)
    efficient = DenseNet(block_config=(2, 2), growth_rate=8, num_init_features=16, memory_efficient=True)
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for model in (plain, efficient):
        model.train()
        y = model(x)["block2"]
        y.square().mean().backward()
        outs.append((y.detach(), model.stages.stem.conv0.weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_old_checkpoint_keys_load(tmp_path) -> None:
    # torchvision's published files say 'denselayer1.norm.1.weight' (module names once held dots)
    torch.manual_seed(0)
    ref = torchvision.models.densenet121(weights=None).eval()
    sd = {}
    for k, v in ref.state_dict().items():
        for part in ("norm", "relu", "conv"):
            for i in "12":
                k = k.replace(f".{part}{i}.", f".{part}.{i}.")
        sd[k] = v
    assert any(".norm.1." in k for k in sd)
    path = tmp_path / "old.pt"
    torch.save(sd, path)
    ours = create_classifier("densenet121", num_classes=1000, pretrained=str(path)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


def test_out_features_drops_later_stages() -> None:
    full = create_backbone("densenet121")
    part = create_backbone("densenet121", out_features=["block2"])
    assert list(part.stages) == ["stem", "block1", "block2"] and part.feature_names == ["block2"]
    assert count_parameters(part) < count_parameters(full) / 4


def test_output_stride_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="does not dilate"):
        create_backbone("densenet121", output_stride=16)


def test_head_is_pool_and_linear() -> None:
    model = create_classifier("densenet121", num_classes=7)
    assert isinstance(model, Classifier) and model.head.fc.in_features == 1024
