"""`python -m cvtasks summary`: the layer table, totals equal to `make backbones`, receptive fields measured by gradients."""

from __future__ import annotations

import subprocess

import pytest
import torch
from torch import nn

from conftest import REPO, run_cli
from cvtasks import create_backbone
from cvtasks.__main__ import main as cvtasks_main
from cvtasks.anatomy import Field, anatomy, anatomy_table, level_fields
from cvtasks.registry import get_backbone_entry
from cvtasks.summary import backbone_table, measure_backbone


def _positive_copy(net: nn.Module) -> nn.Module:
    """The net with every weight a positive constant, BN an identity and max pools averaging, in eval mode.

    Positive weights and inputs keep every path's contribution positive, so no gradient cancels to
    zero; a max pool passes gradient to one pixel of its window, an average pool with the same
    window to all of them, so the set of pixels that reach an output is the receptive field.
    """
    for name, mod in list(net.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(mod, child_name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode))
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.fill_(1.0 / mod.weight[0].numel())
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.zero_()
                mod.running_var.fill_(1.0)
                mod.weight.fill_(1.0)
                mod.bias.zero_()
    return net.eval()


def _gradient_extents(net: nn.Module, size: int) -> dict[str, list[tuple[tuple[int, int], tuple[int, int]]]]:
    """For each level, at its first and last output position: the rows and columns of nonzero input gradient."""
    x = (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) + 0.5).requires_grad_()
    feats = net(x)
    out = {}
    for level, fmap in feats.items():
        h, w = fmap.shape[-2:]
        extents = []
        for i, j in ((0, 0), (h - 1, w - 1)):
            (grad,) = torch.autograd.grad(fmap[0, :, i, j].sum(), x, retain_graph=True)
            seen = grad[0].abs().sum(0) > 0
            rows, cols = seen.any(1).nonzero().flatten(), seen.any(0).nonzero().flatten()
            extents.append(((int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))))
        out[level] = extents
    return out


def _computed_extents(f: Field, n: tuple[int, int], size: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The same extents from the computed field: the interval of each position, clipped to the image."""
    def clip(lo_hi: tuple[int, int]) -> tuple[int, int]:
        return max(lo_hi[0], 0), min(lo_hi[1], size - 1)

    return [tuple(clip(f.axes[a].interval(pos[a])) for a in range(2)) for pos in ((0, 0), (n[0] - 1, n[1] - 1))]


@pytest.mark.parametrize("name,kwargs,size", [
    ("vgg11", {}, 128),                          # plain convolutions and pools
    ("resnet18", {}, 256),                       # residual adds, strided 1x1 shortcuts
    ("resnet18", {"output_stride": 16}, 288),    # dilation in the last stage
    ("googlenet", {}, 224),                      # Inception branches of 1x1, 3x3, 5x5 and a pool, concatenated
])
def test_receptive_field_equals_the_gradient_measurement(name: str, kwargs: dict, size: int, one_thread: None) -> None:
    torch.manual_seed(0)
    net = create_backbone(name, **kwargs).eval()
    computed = level_fields(net, size)
    measured = _gradient_extents(_positive_copy(net), size)
    assert list(measured) == list(computed)
    both_ends = 0
    for level, f in computed.items():
        assert f.kind == "local", (level, f)
        n = f.spatial
        assert _computed_extents(f, n, size) == measured[level], (level, f)
        # both ends of the field inside the image somewhere: its size was measured, not only clipped
        (first_rows, _), (last_rows, _) = measured[level]
        both_ends += first_rows[1] < size - 1 and last_rows[0] > 0
    assert both_ends >= 2, "too small an input: most fields were clipped on both sides"


def test_known_receptive_fields() -> None:
    # Araujo, Norris & Sim, Computing Receptive Fields of Convolutional Neural Networks (Distill, 2019), Table 1
    assert level_fields(create_backbone("vgg16"), 32)["pool5"].size == (212, 212)
    assert list(level_fields(create_backbone("alexnet"), 95).values())[-1].size == (195, 195)
    assert list(level_fields(create_backbone("inception_v3"), 139).values())[-1].size == (1311, 1311)
    fields = level_fields(create_backbone("resnet18"), 64)
    assert [f.size[0] for f in fields.values()] == [7, 43, 99, 211, 435]
    assert [f.stride[0] for f in fields.values()] == [2, 4, 8, 16, 32]
    dilated = level_fields(create_backbone("resnet18", output_stride=16), 64)
    assert dilated["layer4"].stride == (16, 16) and dilated["layer4"].size[0] > fields["layer3"].size[0]


@pytest.mark.parametrize("name,size", [("_tinynet", 64), ("resnet18", 96), ("googlenet", 96), ("vit_b_16", 64)])
def test_totals_are_make_backbones_figures(name: str, size: int, one_thread: None) -> None:
    a = anatomy(name, size)
    measured = measure_backbone(name, size)
    assert a.params == measured["params"] and a.gflops == measured["gflops"]
    assert sum(r.params for r in a.rows) == a.params and 2 * sum(r.macs for r in a.rows) == a.flops
    table = anatomy_table(name, size)
    row = next(line for line in backbone_table(name, size).splitlines() if line.startswith(f"{name} "))
    params, gflops = row.split()[2:4]
    assert f"params (M) {params}   GFLOPs {gflops}" in table


def test_plugin_net_table_layer_by_layer(one_thread: None) -> None:
    # _tinynet (tests/conftest.py) is a plugin author's net: five stride-2 3x3 conv-bn-act stages
    table = anatomy_table("_tinynet", 64)
    conv_rows = [line.split() for line in table.splitlines() if "Conv2d" in line]
    assert [r[2] for r in conv_rows] == ["8x32x32", "8x16x16", "16x8x8", "16x4x4", "32x2x2"]
    assert [r[3] for r in conv_rows] == ["216", "576", "1,152", "2,304", "4,608"]  # F*F*C*K, no bias before BN
    assert [r[4] for r in conv_rows] == [f"{216 * 32 * 32:,}", f"{576 * 16 * 16:,}", f"{1152 * 64:,}", f"{2304 * 16:,}",
                                         f"{4608 * 4:,}"]
    assert [r[5] for r in conv_rows] == ["2", "4", "8", "16", "32"]
    # r_out = r_in + (k - 1) * j_in: 3, 3 + 2*2, 7 + 2*4, 15 + 2*8, 31 + 2*16
    assert [r[6] for r in conv_rows] == ["3", "7", "15", "31", "63"]
    assert "c5" in table.splitlines()[-1] and table.splitlines()[-1].split()[-1] == "63"


def test_summary_command_and_its_errors(workdir, capsys: pytest.CaptureFixture[str]) -> None:
    proc = run_cli(["summary", "lenet5", "--size", "32"], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "params (M) 0.06" in proc.stdout and "receptive field" in proc.stdout
    assert cvtasks_main(["summary", "vgg61"]) == 2
    err = capsys.readouterr().err
    assert "unknown backbone 'vgg61'" in err and "vgg16" in err and "make backbones" in err
    assert cvtasks_main(["summary", "googlenet", "--size", "8"]) == 2
    floor = get_backbone_entry("googlenet").min_input_size  # the backbone's spec says how small
    assert f"at least {floor} px, got --size 8; pass --size {floor} or more" in capsys.readouterr().err


def test_make_summary_names_the_net_and_size() -> None:
    out = subprocess.run(["make", "-n", "summary", "NAME=resnet18", "IMG=96"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    line = next(l for l in out.stdout.splitlines() if "-m cvtasks" in l)
    assert line.rstrip().endswith("-m cvtasks summary resnet18 --size 96"), line
