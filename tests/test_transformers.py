"""Vision Transformer and Swin Transformer: contract checks, parity with torchvision, input sizes.

The registered nets are large (ViT-B/16 86M parameters, ViT-L/16 304M), so the fast tests compare
our modules with torchvision's at tiny widths (same classes, same code paths: every layer type,
the padding and the shifted-window masks) and check parity on swin_t; the parity of the big
registered variants is marked slow. The contract of every variant is in test_backbone_contract.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import swin_transformer as tv_swin
from torchvision.models import vision_transformer as tv_vit

from cvtasks.backbone import Classifier
from cvtasks.checks import check_parity, count_parameters
from cvtasks.registry import create_backbone, get_backbone_entry, list_backbones
from plugins.swin import SwinTransformer, WindowAttention
from plugins.vit import VisionTransformer, resize_pos_embedding

TINY_VIT = dict(patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
TINY_SWIN = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))

NAMES = sorted(n for n in list_backbones() if get_backbone_entry(n).family in ("vit", "swin"))
FAST = {"swin_t"}


def _marked(names: list[str], fast: set[str]) -> list:
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


def _save(state: dict, tmp_path: Path, name: str = "weights.pt") -> str:
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def test_all_variants_registered() -> None:
    for name in NAMES:
        entry = get_backbone_entry(name)
        assert entry.reference == f"torchvision:{name}" and entry.min_input_size == 32


@pytest.mark.parametrize("name", _marked(NAMES, FAST))
def test_parity_registered(name: str) -> None:
    # torchvision's ViT asserts its input is image_size (224); Swin takes any size
    size = getattr(get_backbone_entry(name).builder, "parity_size", None)
    assert check_parity(name, size=size).startswith("ok")


# ---------------------------------------------------------------- ViT


def _tiny_vit_pair(image_size: int, tmp_path: Path) -> tuple[nn.Module, Classifier]:
    """torchvision's ViT at a tiny width (random head: torchvision zero-inits it) and ours, loaded."""
    torch.manual_seed(0)
    ref = tv_vit.VisionTransformer(image_size=image_size, num_classes=5, **TINY_VIT).eval()
    nn.init.normal_(ref.heads.head.weight)
    nn.init.normal_(ref.heads.head.bias)
    backbone = VisionTransformer(image_size=image_size, **TINY_VIT)
    ours = Classifier(backbone, backbone.build_head(5))
    ours.load_pretrained(_save(ref.state_dict(), tmp_path))
    return ref, ours.eval()


@pytest.mark.parametrize("size", [32, 64])
def test_vit_matches_torchvision(size: int, tmp_path: Path) -> None:
    ref, ours = _tiny_vit_pair(size, tmp_path)
    assert count_parameters(ref) == count_parameters(ours)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        # the tokens level is torchvision's encoder output without the class token, as a map
        seq = ref.encoder(torch.cat([ref.class_token.expand(2, -1, -1), ref._process_input(x)], dim=1))
        tokens = ours.backbone(x)["tokens"]
    g = size // 16
    assert tokens.shape == (2, 32, g, g)
    torch.testing.assert_close(tokens.flatten(2).transpose(1, 2), seq[:, 1:], rtol=1e-5, atol=1e-5)


def test_vit_training_step_matches_torchvision(tmp_path: Path) -> None:
    ref, ours = _tiny_vit_pair(32, tmp_path)
    ref.train(), ours.train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    nn.functional.cross_entropy(ref(x), y).backward()
    nn.functional.cross_entropy(ours(x), y).backward()
    torch.testing.assert_close(ours.backbone.conv_proj.weight.grad, ref.conv_proj.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.head.fc.weight.grad, ref.heads.head.weight.grad, rtol=1e-4, atol=1e-6)


def test_vit_pos_embedding_resize_matches_torchvision() -> None:
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 14 * 14, 8)
    expected = tv_vit.interpolate_embeddings(64, 16, {"encoder.pos_embedding": pos.clone()})["encoder.pos_embedding"]
    resized = resize_pos_embedding(pos, (4, 4))
    torch.testing.assert_close(resized, expected)
    assert torch.equal(resized[:, 0], pos[:, 0])  # the class-token entry is kept


def test_vit_other_input_size_interpolates_on_the_fly(tmp_path: Path) -> None:
    """A 64px model fed 32px equals a 32px model loaded from it (the same bicubic resize)."""
    torch.manual_seed(0)
    big = VisionTransformer(image_size=64, **TINY_VIT).eval()
    small = VisionTransformer(image_size=32, **TINY_VIT)
    small.load_pretrained(_save(big.state_dict(), tmp_path))
    assert small.encoder.pos_embedding.shape == (1, 1 + 2 * 2, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(big(x)["tokens"], small.eval()(x)["tokens"])
        rect = big(torch.randn(1, 3, 48, 80))["tokens"]  # non-square inputs work too
    assert rect.shape == (1, 32, 3, 5)


def test_vit_loads_torchvision_224_file_at_another_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = tv_vit.VisionTransformer(image_size=224, num_classes=5, **TINY_VIT)
    path = _save(ref.state_dict(), tmp_path)
    ours = VisionTransformer(image_size=64, **TINY_VIT)
    ours.load_pretrained(path)
    expected = tv_vit.interpolate_embeddings(64, 16, ref.state_dict())["encoder.pos_embedding"]
    torch.testing.assert_close(ours.encoder.pos_embedding.detach(), expected)
    torch.testing.assert_close(ours.conv_proj.weight.detach(), ref.conv_proj.weight.detach())


def test_vit_in_chans_and_errors() -> None:
    model = VisionTransformer(in_chans=1, image_size=32, **TINY_VIT)
    assert model(torch.randn(1, 1, 32, 32))["tokens"].shape == (1, 32, 2, 2)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        VisionTransformer(image_size=40, **TINY_VIT)
    with pytest.raises(ValueError, match="output_stride=32"):
        VisionTransformer(output_stride=32, **TINY_VIT)
    with pytest.raises(ValueError, match="single feature level 'tokens'"):
        VisionTransformer(out_features=["layer4"], **TINY_VIT)
    with pytest.raises(ValueError, match="at least 16x16"):
        model(torch.randn(1, 1, 8, 8))


def test_vit_head_reads_the_class_token() -> None:
    torch.manual_seed(0)
    backbone = VisionTransformer(image_size=32, **TINY_VIT).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls_token = backbone.forward_head_features(x)
        seq, grid = backbone.forward_tokens(x)
    assert cls_token.shape == (2, 32) and grid == (2, 2)
    torch.testing.assert_close(cls_token, seq[:, 0])
    head = backbone.build_head(7)
    assert head(cls_token).shape == (2, 7)


# ---------------------------------------------------------------- Swin


def _tiny_swin_pair(tmp_path: Path) -> tuple[nn.Module, Classifier]:
    torch.manual_seed(0)
    ref = tv_swin.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=TINY_SWIN["embed_dim"],
        depths=list(TINY_SWIN["depths"]),
        num_heads=list(TINY_SWIN["num_heads"]),
        window_size=[7, 7],
        stochastic_depth_prob=0.5,
        num_classes=5,
    ).eval()
    backbone = SwinTransformer(stochastic_depth_prob=0.5, **TINY_SWIN)
    ours = Classifier(backbone, backbone.build_head(5))
    ours.load_pretrained(_save(ref.state_dict(), tmp_path))
    return ref, ours.eval()


@pytest.mark.parametrize("hw", [(32, 32), (100, 100), (56, 88), (36, 124)])
def test_swin_matches_torchvision(hw: tuple[int, int], tmp_path: Path) -> None:
    """Sizes that need window padding, odd patch merging and a shift skipped along one side."""
    ref, ours = _tiny_swin_pair(tmp_path)
    assert count_parameters(ref) == count_parameters(ours)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        feats = ours.backbone(x)
        y = x
        for i, layer in enumerate(ref.features):
            y = layer(y)
            if i % 2 == 1:
                level = feats[f"stage{i // 2 + 1}"]
                torch.testing.assert_close(level, y.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)
    strides = [f.stride for f in ours.backbone.feature_info]
    assert strides == [4, 8, 16, 32]
    assert [feats[f"stage{i + 1}"].shape[1] for i in range(4)] == [16, 32, 64, 128]


def test_swin_training_step_matches_torchvision(tmp_path: Path) -> None:
    """Stochastic depth draws the same masks in the same order: identical losses and gradients."""
    ref, ours = _tiny_swin_pair(tmp_path)
    ref.train(), ours.train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    loss_ref = nn.functional.cross_entropy(ref(x), y)
    loss_ref.backward()
    torch.manual_seed(1)
    loss = nn.functional.cross_entropy(ours(x), y)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(
        ours.backbone.features[0][0].weight.grad, ref.features[0][0].weight.grad, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        ours.backbone.features[1][1].attn.relative_position_bias_table.grad,
        ref.features[1][1].attn.relative_position_bias_table.grad,
        rtol=1e-4,
        atol=1e-6,
    )


def test_window_attention_index_and_mask_match_torchvision() -> None:
    torch.manual_seed(0)
    ours = WindowAttention(16, num_heads=2, window_size=7, shift_size=3)
    ref = tv_swin.ShiftedWindowAttention(16, [7, 7], [3, 3], num_heads=2)
    assert torch.equal(ours.relative_position_index, ref.relative_position_index)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 21, 35, 16)
    torch.testing.assert_close(ours(x), ref(x))


def test_swin_out_features_truncates_and_errors() -> None:
    full = SwinTransformer(**TINY_SWIN)
    part = SwinTransformer(out_features=["stage2"], **TINY_SWIN)
    assert [f.name for f in part.feature_info] == ["stage2"]
    assert len(part.features) == 4 and count_parameters(part) < count_parameters(full)
    assert list(part(torch.randn(1, 3, 32, 32))) == ["stage2"]
    with pytest.raises(ValueError, match="valid names are"):
        SwinTransformer(out_features=["layer3"], **TINY_SWIN)
    with pytest.raises(ValueError, match="no dilated variant"):
        SwinTransformer(output_stride=16, **TINY_SWIN)


def test_swin_pretrained_file_into_backbone_and_in_chans(tmp_path: Path) -> None:
    """create_backbone(pretrained=torchvision file), with the stem adapted to one input channel."""
    ref, _ = _tiny_swin_pair(tmp_path)
    path = _save(ref.state_dict(), tmp_path, "ref.pt")
    # the registry's swin_t entry, narrowed to the tiny width by overriding its defaults
    ours = create_backbone("swin_t", in_chans=1, out_features=["stage2"], pretrained=path, **TINY_SWIN)
    assert len(ours.features) == 4  # stem, stage1, merging, stage2: nothing after the last level
    torch.testing.assert_close(ours.features[0][0].weight.detach(), ref.features[0][0].weight.sum(1, keepdim=True))
    torch.testing.assert_close(ours.features[3][1].attn.qkv.weight.detach(), ref.features[3][1].attn.qkv.weight)
