"""Swin Transformer Swin-T/S/B, version 1 (Liu et al., ICCV 2021).

A 4x4 patch partition with a linear embedding (a strided convolution, then LayerNorm) feeds four
stages of Swin blocks; between stages, patch merging concatenates each 2x2 neighbourhood and
projects 4C -> 2C, halving the resolution. A block is pre-norm multi-head self-attention inside
non-overlapping 7x7 windows, with a learned relative position bias (a table indexed by the
relative offset of two tokens, Sec. 3.2), followed by an MLP; every second block cyclically shifts
the map by half a window first and masks attention between tokens that the shift brought together
from distant parts of the image (Fig. 4). Residual branches use stochastic depth, rising linearly
with depth.

The layout and state_dict keys follow torchvision's ``SwinTransformer`` (``features.<i>``), and so
does every numerical detail, including torchvision's handling of maps whose side is not a multiple
of the window: the map is zero-padded at the bottom and right to whole windows (the padded tokens
take part in attention, unmasked) and cropped after; the shift is skipped along a side that fits in
one window; patch merging pads odd sides with zeros.

Features: one level after each stage, ``stage1``..``stage4`` at strides 4/8/16/32, channels-first
(B, C, H, W) maps (views of the channels-last tensors the blocks work on, no copy). The classifier
head owns the final LayerNorm: norm, global average pooling, linear (``head``). There is no
dilation: ``output_stride`` is 32 only.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvtasks.backbone import Backbone, FeatureInfo
from cvtasks.layers import DropPath, transformer_mlp
from cvtasks.registry import register_backbone

__all__ = ["SwinTransformer", "SwinHead", "WindowAttention", "SWIN_VARIANTS"]

_PAPER = "Liu et al., Swin Transformer: Hierarchical Vision Transformer using Shifted Windows, ICCV 2021"

#: Table 7 of the paper (Swin-T/S/B at 224), with torchvision's stochastic depth rates.
SWIN_VARIANTS: dict[str, dict] = {
    "swin_t": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), stochastic_depth_prob=0.2),
    "swin_s": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), stochastic_depth_prob=0.3),
    "swin_b": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), stochastic_depth_prob=0.5),
}


class ToChannelsLast(nn.Module):
    """(B, C, H, W) -> (B, H, W, C): the blocks normalise and project over the last dimension."""

    def forward(self, x: Tensor) -> Tensor:
        """A permuted view, no copy."""
        return x.permute(0, 2, 3, 1)


def _shift_regions(n: int, window: int, shift: int, device: torch.device) -> Tensor:
    """Which of the three bands a cyclic shift creates along one side each position lies in."""
    idx = torch.arange(n, device=device)
    if shift == 0:
        return torch.zeros_like(idx)
    return (idx >= n - window).long() + (idx >= n - shift).long()


def shifted_window_mask(
    size: tuple[int, int], window: int, shift: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Additive attention mask (num_windows, N, N): -100 between tokens from different bands (Fig. 4)."""
    h, w = size
    region = _shift_regions(h, window, shift[0], device)[:, None] * 3 + _shift_regions(w, window, shift[1], device)
    region = region.view(h // window, window, w // window, window).transpose(1, 2).reshape(-1, window * window)
    mask = torch.zeros(region.shape + (window * window,), device=device, dtype=dtype)
    return mask.masked_fill_(region[:, None, :] != region[:, :, None], -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (shifted) windows, with a relative position bias.

    Works on channels-last maps (B, H, W, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        # one learned bias per head for each of the (2M-1)^2 relative offsets in an MxM window (Eq. 4)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
        coords = coords.flatten(1)
        offsets = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # 2, N, N, each in [0, 2M-2]
        self.register_buffer("relative_position_index", (offsets[0] * (2 * window_size - 1) + offsets[1]).flatten())

    def relative_position_bias(self) -> Tensor:
        """The (1, heads, N, N) bias gathered from the table."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) in, (B, H, W, C) out."""
        b, h, w, c = x.shape
        ws = self.window_size
        pad_b, pad_r = -h % ws, -w % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        # a side that fits in one window gains nothing from shifting
        shift = (self.shift_size if ws < hp else 0, self.shift_size if ws < wp else 0)
        shifted = shift[0] > 0 or shift[1] > 0
        if shifted:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))

        nh, nw = hp // ws, wp // ws
        windows = x.view(b, nh, ws, nw, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, ws * ws, c)
        n = ws * ws
        heads = self.num_heads
        qkv = F.linear(windows, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.reshape(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = (q * (c // heads) ** -0.5).matmul(k.transpose(-2, -1))
        attn = attn + self.relative_position_bias()
        if shifted:
            mask = shifted_window_mask((hp, wp), ws, shift, x.device, attn.dtype)
            attn = attn.view(b, nh * nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, heads, n, n)
        attn = F.dropout(attn.softmax(dim=-1), p=self.attention_dropout, training=self.training)
        out = attn.matmul(v).transpose(1, 2).reshape(-1, n, c)
        out = F.dropout(self.proj(out), p=self.dropout, training=self.training)

        out = out.view(b, nh, nw, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if shifted:
            out = torch.roll(out, shifts=shift, dims=(1, 2))
        if pad_b or pad_r:
            out = out[:, :h, :w, :].contiguous()
        return out


class SwinBlock(nn.Module):
    """x + SD(W-MSA(LN(x))), then x + SD(MLP(LN(x))) (paper Eq. 3), on channels-last maps."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        dropout: float,
        attention_dropout: float,
        stochastic_depth_prob: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, shift_size, attention_dropout, dropout)
        self.stochastic_depth = DropPath(stochastic_depth_prob)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = transformer_mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) in, (B, H, W, C) out."""
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        return x + self.stochastic_depth(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (4C), normalise, project to 2C: half the resolution."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) in, (B, ceil(H/2), ceil(W/2), 2C) out."""
        h, w = x.shape[1], x.shape[2]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # the neighbourhood order (top-left, bottom-left, top-right, bottom-right) is the weights'
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinHead(nn.Module):
    """Swin's classifier: the final LayerNorm, global average pooling, a linear layer ``fc``."""

    def __init__(self, feature: str, dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.feature = feature
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: Mapping[str, Tensor]) -> Tensor:
        """Logits from the level ``self.feature`` of the features dict."""
        x = self.norm(feats[self.feature].permute(0, 2, 3, 1))  # back to the blocks' channels-last
        return self.fc(self.dropout(x.mean(dim=(1, 2))))


class SwinTransformer(Backbone):
    """Swin backbone: ``stage1``..``stage4`` at strides 4, 8, 16, 32 (channels-first maps)."""

    first_conv = "features.0.0.weight"
    head_prefixes = ("norm.", "head.")

    def __init__(
        self,
        *,
        embed_dim: int,
        depths: tuple[int, ...],
        num_heads: tuple[int, ...],
        window_size: int = 7,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        stochastic_depth_prob: float = 0.2,
        in_chans: int = 3,
        out_features: Iterable[str] | None = None,
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have one entry per stage")
        names = [f"stage{i + 1}" for i in range(len(depths))]
        wanted = list(out_features) if out_features is not None else names
        bad = [n for n in wanted if n not in names]
        if bad or not wanted:
            raise ValueError(f"SwinTransformer has no feature levels {bad or wanted}; valid names are {names}")
        last_stage = max(names.index(n) for n in wanted)

        layers: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size),
                ToChannelsLast(),
                nn.LayerNorm(embed_dim),
            )
        ]
        total, block_id = sum(depths), 0
        all_info: list[FeatureInfo] = []
        self._level_at: dict[int, str] = {}
        for i in range(last_stage + 1):
            dim, stride = embed_dim * 2**i, patch_size * 2**i
            if i > 0:
                layers.append(PatchMerging(dim // 2))
            blocks = []
            for j in range(depths[i]):
                blocks.append(
                    SwinBlock(
                        dim,
                        num_heads[i],
                        window_size,
                        shift_size=0 if j % 2 == 0 else window_size // 2,
                        mlp_ratio=mlp_ratio,
                        dropout=dropout,
                        attention_dropout=attention_dropout,
                        # linear in the block's index over the whole net, as torchvision does
                        stochastic_depth_prob=stochastic_depth_prob * block_id / max(total - 1, 1),
                    )
                )
                block_id += 1
            layers.append(nn.Sequential(*blocks))
            all_info.append(FeatureInfo(names[i], dim, stride))
            if names[i] in wanted:
                self._level_at[len(layers) - 1] = names[i]
        self.features = nn.Sequential(*layers)
        self.feature_info = [f for f in all_info if f.name in wanted]

        for m in self.modules():
            if isinstance(m, nn.Linear):  # torchvision's init of every linear layer
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """The declared levels, fine to coarse, as (B, C, H, W) maps."""
        out: dict[str, Tensor] = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            name = self._level_at.get(i)
            if name is not None:
                out[name] = x.permute(0, 3, 1, 2)
        return out

    def build_head(self, num_classes: int, dropout: float = 0.0) -> nn.Module:
        """Final LayerNorm, global average pooling and the linear classifier, on the last level."""
        last = self.feature_info[-1]
        return SwinHead(last.name, last.channels, num_classes, dropout=dropout)

    @classmethod
    def remap_state_dict(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """torchvision's ``features.*`` are ours; its ``norm`` and ``head`` go to our head."""
        out: dict[str, Tensor] = {}
        for k, v in state_dict.items():
            if k.startswith("norm."):
                out["head." + k] = v
            elif k.startswith("head."):
                out["head.fc." + k[len("head.") :]] = v
            else:
                out["backbone." + k] = v
        return out


for _name, _cfg in SWIN_VARIANTS.items():
    register_backbone(
        _name,
        family="swin",
        paper=_PAPER,
        reference=f"torchvision:{_name}",
        input_size=224,
        **_cfg,
    )(SwinTransformer)
