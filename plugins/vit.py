"""Vision Transformer ViT-B/16 and ViT-L/16 (Dosovitskiy et al., ICLR 2021).

The image is cut into 16x16 patches by a strided convolution, a learned class token is prepended,
a learned position embedding is added, and a stack of pre-norm encoder blocks (multi-head
self-attention, then an MLP with GELU, each inside a residual) ends in a LayerNorm. The layout and
the state_dict keys follow torchvision's ``VisionTransformer`` (``conv_proj``, ``class_token``,
``encoder.pos_embedding``, ``encoder.layers.encoder_layer_<i>``, ``encoder.ln``), so a torchvision
file loads with only the classifier renamed (``heads.head`` -> our head's ``fc``).

Feature contract: ViT has a single scale. ``forward`` returns one level, ``tokens``: the patch
tokens after the final LayerNorm, laid out as a (B, C, H/16, W/16) map at stride 16 (a
channels-last view, no copy). Detection builds a simple pyramid from it (Li et al., ViTDet, 2022).
The classifier reads the class token instead (``forward_head_features``). There is no dilation:
``output_stride`` can only be the patch size.

Input size: the position embedding is a parameter sized for ``image_size`` (default 224, the
paper's); an input of any other size is accepted and the embedding is resized on the fly, bicubic
on the patch grid with the class-token entry kept (the recipe the paper uses for fine-tuning at a
higher resolution, Sec. 3.2), so small-image training and tests can use 32x32 or 64x64 inputs and
detection can feed any size. Sides that are not a multiple of the patch size lose their last
partial patch, as the strided patch convolution does. A state_dict made for another grid (a
224 file loaded into a model built with ``image_size=64``) is resized the same way on load.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from dataclasses import replace
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvtasks.backbone import Backbone, BackboneSpec, FeatureInfo
from cvtasks.layers import transformer_mlp
from cvtasks.registry import register_backbone

__all__ = ["VisionTransformer", "ClassTokenHead", "resize_pos_embedding", "VIT_VARIANTS"]

_PAPER = (
    "Dosovitskiy et al., An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale, ICLR 2021"
)

#: Table 1 of the paper (ViT-Base and ViT-Large), with 16x16 patches.
VIT_VARIANTS: dict[str, dict[str, int]] = {
    "vit_b_16": dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
    "vit_l_16": dict(patch_size=16, num_layers=24, num_heads=16, hidden_dim=1024, mlp_dim=4096),
}

# the paper's LayerNorm epsilon (torchvision and the JAX original use 1e-6)
_LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def resize_pos_embedding(pos: Tensor, grid: tuple[int, int]) -> Tensor:
    """Resize a (1, 1 + n*n, C) position embedding to ``grid`` patches, bicubic, class entry kept.

    ``align_corners=True`` as in torchvision's ``interpolate_embeddings``, so a model resized here
    matches one resized by torchvision.
    """
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    n = math.isqrt(patch_pos.shape[1])
    if n * n != patch_pos.shape[1]:
        raise ValueError(
            f"position embedding with {patch_pos.shape[1]} patch entries is not a square grid; "
            f"cannot resize it to {grid[0]}x{grid[1]} patches"
        )
    if (n, n) == tuple(grid):
        return pos
    dim = patch_pos.shape[-1]
    patch_pos = patch_pos.reshape(1, n, n, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=True)
    patch_pos = patch_pos.flatten(2).transpose(1, 2)
    return torch.cat([cls_pos, patch_pos], dim=1)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)) (paper Eq. 2-3)."""

    def __init__(self, hidden_dim: int, num_heads: int, mlp_dim: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.ln_1 = _LayerNorm(hidden_dim)
        self.self_attention = nn.MultiheadAttention(
            hidden_dim, num_heads, dropout=attention_dropout, batch_first=True
        )
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = _LayerNorm(hidden_dim)
        self.mlp = transformer_mlp(hidden_dim, mlp_dim, dropout)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):  # torchvision's init of the MLP
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, C) tokens in, (B, L, C) out."""
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + self.dropout(y)
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """Position embedding, the stack of encoder blocks and the final LayerNorm."""

    def __init__(
        self,
        seq_length: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout: float,
        attention_dropout: float,
    ) -> None:
        super().__init__()
        # BERT's initialisation of learned position embeddings, as the paper's code does
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(
            OrderedDict(
                (f"encoder_layer_{i}", EncoderBlock(hidden_dim, num_heads, mlp_dim, dropout, attention_dropout))
                for i in range(num_layers)
            )
        )
        self.ln = _LayerNorm(hidden_dim)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """Encode a (B, 1 + gh*gw, C) token sequence laid out on a ``grid`` of patches."""
        pos = self.pos_embedding
        if pos.shape[1] != x.shape[1] or math.isqrt(pos.shape[1] - 1) != grid[0]:
            pos = resize_pos_embedding(pos, grid)
        return self.ln(self.layers(self.dropout(x + pos)))


class ClassTokenHead(nn.Module):
    """The ViT classifier: a linear layer on the class token (torchvision's ``heads.head``)."""

    def __init__(self, hidden_dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(hidden_dim, num_classes)
        # zero-initialised, as torchvision does (the paper's fine-tuning recipe, Sec. 3.1)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, class_token: Tensor) -> Tensor:
        """Logits from the (B, C) class token."""
        return self.fc(self.dropout(class_token))


class VisionTransformer(Backbone):
    """ViT backbone: one level, ``tokens`` (patch tokens as a map at stride ``patch_size``)."""

    first_conv = "conv_proj.weight"
    head_prefixes = ("heads.",)
    reference_kwargs = {"image_size": 224}
    #: the input size at which check_parity must compare us with torchvision (which asserts it)
    parity_size = 224

    def __init__(
        self,
        *,
        patch_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        image_size: int = 224,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        in_chans: int = 3,
        out_features: Iterable[str] | None = None,
        output_stride: int | None = None,
    ) -> None:
        super().__init__()
        if image_size < patch_size or image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} must be a positive multiple of the patch size {patch_size} "
                f"(e.g. {max(patch_size, image_size // patch_size * patch_size)})"
            )
        wanted = list(out_features) if out_features is not None else ["tokens"]
        if wanted != ["tokens"]:
            raise ValueError(f"ViT has a single feature level 'tokens'; out_features={wanted} is not valid")
        self.patch_size = patch_size
        self.image_size = image_size
        self.hidden_dim = hidden_dim
        self.output_stride = patch_size
        self.feature_info = [FeatureInfo("tokens", hidden_dim, patch_size)]

        self.conv_proj = nn.Conv2d(in_chans, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        grid = image_size // patch_size
        self.encoder = Encoder(grid * grid + 1, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout)

        fan_in = in_chans * patch_size * patch_size  # LeCun normal init of the patch embedding
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)

    def forward_tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """The encoded sequence (B, 1 + gh*gw, C), class token first, and its patch grid (gh, gw)."""
        if x.shape[-1] < self.patch_size or x.shape[-2] < self.patch_size:
            raise ValueError(
                f"{type(self).__name__} needs inputs of at least {self.patch_size}x{self.patch_size} "
                f"pixels (one patch); got {tuple(x.shape[-2:])}"
            )
        x = self.conv_proj(x)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.encoder(x, grid), grid

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """{"tokens": (B, C, H/16, W/16)}: the patch tokens after the final LayerNorm, as a map."""
        tokens, (gh, gw) = self.forward_tokens(x)
        patches = tokens[:, 1:].unflatten(1, (gh, gw)).permute(0, 3, 1, 2)
        return {"tokens": patches}

    def forward_head_features(self, x: Tensor) -> Tensor:
        """The class token after the final LayerNorm (what the ViT classifier reads)."""
        return self.forward_tokens(x)[0][:, 0]

    def build_head(self, num_classes: int, dropout: float = 0.0) -> nn.Module:
        """The linear classifier on the class token."""
        return ClassTokenHead(self.hidden_dim, num_classes, dropout=dropout)

    @classmethod
    def spec_for(cls, **kwargs: Any) -> BackboneSpec:
        """One level at the patch size's stride, which nothing dilates."""
        patch = kwargs.get("patch_size")
        return replace(cls.spec, supported_output_strides=(int(patch),)) if patch else cls.spec

    @classmethod
    def remap_state_dict(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """torchvision's keys are ours, except the classifier ``heads.head`` -> ``head.fc``."""
        out: dict[str, Tensor] = {}
        for k, v in state_dict.items():
            if k.startswith("heads.head."):
                out["head.fc." + k[len("heads.head.") :]] = v
            elif k.startswith("heads."):
                raise ValueError(
                    f"state_dict key {k!r}: ViT classifiers with a pre-logits layer (representation_size) "
                    f"are not supported; load the backbone only, without the 'heads.*' keys"
                )
            else:
                out["backbone." + k] = v
        return out

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Resize a position embedding made for another image size to this model's grid (our keys)."""
        key = "encoder.pos_embedding"
        own = self.encoder.pos_embedding
        if key in state_dict and state_dict[key].shape != own.shape:
            grid = math.isqrt(own.shape[1] - 1)
            state_dict = {**state_dict, key: resize_pos_embedding(state_dict[key], (grid, grid))}
        return state_dict


for _name, _cfg in VIT_VARIANTS.items():
    register_backbone(
        _name,
        family="vit",
        paper=_PAPER,
        reference=f"torchvision:{_name}",
        input_size=224,
        **_cfg,
    )(VisionTransformer)
