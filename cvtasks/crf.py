"""Fully connected CRF refinement of segmentation scores by mean-field inference, in torch.

Krähenbühl and Koltun, Efficient Inference in Fully Connected CRFs with Gaussian Edge
Potentials, NeurIPS 2011 (as used by DeepLab v1/v2). The pairwise potential of two pixels is a
Potts compatibility times a mixture of two Gaussian kernels:

    k(i, j) = w_app * exp(-|p_i - p_j|^2 / 2 theta_alpha^2 - |I_i - I_j|^2 / 2 theta_beta^2)   (appearance)
            + w_smooth * exp(-|p_i - p_j|^2 / 2 theta_gamma^2)                                   (smoothness)

Each mean-field step is Q <- softmax(unary + K Q) (Potts: the message to label l is the kernel-
weighted mass of l among the other pixels). The kernel matrix is explicit (N x N for N pixels),
which is exact and fast for small images; larger inputs are downsampled to at most ``max_pixels``
(64 x 64 by default), refined there, and the refined probabilities upsampled back to full size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DenseCRF", "dense_crf"]


@dataclass
class DenseCRF:
    """Mean-field dense CRF settings; call it with (logits, image) to get refined probabilities.

    Positional standard deviations are in pixels of the image given; colour ones in 0..255 units.
    """

    iterations: int = 5
    app_weight: float = 10.0
    theta_alpha: float = 20.0
    theta_beta: float = 13.0
    smooth_weight: float = 3.0
    theta_gamma: float = 3.0
    max_pixels: int = 64 * 64

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"CRF iterations must be at least 1, got {self.iterations}")
        if min(self.theta_alpha, self.theta_beta, self.theta_gamma) <= 0:
            raise ValueError("CRF kernel widths theta_alpha, theta_beta, theta_gamma must be positive")
        if self.max_pixels < 16:
            raise ValueError(f"CRF max_pixels must be at least 16, got {self.max_pixels}")

    def kernel(self, image: Tensor, scale: float = 1.0) -> Tensor:
        """The (B, N, N) pairwise kernel of images (B, 3, h, w) in 0..255; ``scale`` is full-size pixels per pixel."""
        b, _, h, w = image.shape
        ys, xs = torch.meshgrid(
            torch.arange(h, device=image.device, dtype=torch.float32),
            torch.arange(w, device=image.device, dtype=torch.float32),
            indexing="ij",
        )
        pos = torch.stack([ys, xs], dim=-1).view(1, h * w, 2) * scale
        col = image.float().flatten(2).transpose(1, 2)  # (B, N, 3)
        d_pos = torch.cdist(pos, pos).pow_(2)  # (1, N, N)
        k = torch.cdist(col, col).pow_(2).mul_(-0.5 / self.theta_beta**2)  # (B, N, N), in place: N^2 is the cost
        # clamped: exp of very negative numbers takes a slow path on CPUs, and e^-50 is 0 to float32 anyway
        k.add_(d_pos, alpha=-0.5 / self.theta_alpha**2).clamp_(min=-50).exp_().mul_(self.app_weight)
        k.add_(d_pos.mul_(-0.5 / self.theta_gamma**2).clamp_(min=-50).exp_().mul_(self.smooth_weight))
        k.diagonal(dim1=1, dim2=2).zero_()  # no message from a pixel to itself
        return k

    @torch.no_grad()
    def __call__(self, logits: Tensor, image: Tensor) -> Tensor:
        """Refined probabilities (B, C, H, W) from class scores (B, C, H, W) and images (B, 3, H, W) in 0..255."""
        if logits.dim() != 4 or image.dim() != 4 or logits.shape[0] != image.shape[0] or logits.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"dense CRF needs logits (B, C, H, W) and images (B, 3, H, W) of the same size, got "
                f"{tuple(logits.shape)} and {tuple(image.shape)}"
            )
        b, c, h, w = logits.shape
        factor = max(1.0, math.sqrt(h * w / self.max_pixels))
        if factor > 1.0:
            hs, ws = max(1, int(h / factor)), max(1, int(w / factor))
            unary = F.interpolate(logits.float(), size=(hs, ws), mode="bilinear", align_corners=False)
            img = F.interpolate(image.float(), size=(hs, ws), mode="area")
        else:
            hs, ws, unary, img = h, w, logits.float(), image.float()
        unary = torch.log_softmax(unary, dim=1).flatten(2)  # (B, C, N)
        k = self.kernel(img, scale=factor)
        q = unary.softmax(dim=1)
        for _ in range(self.iterations):
            q = (unary + torch.bmm(q, k)).softmax(dim=1)
        q = q.view(b, c, hs, ws)
        if factor > 1.0:
            # the refinement ran on a coarser grid (bounded memory: N^2 kernel entries)
            q = F.interpolate(q, size=(h, w), mode="bilinear", align_corners=False)
        return q


def dense_crf(logits: Tensor, image: Tensor, **settings: float) -> Tensor:
    """Refined probabilities (B, C, H, W) by mean-field dense CRF; ``settings`` are DenseCRF's fields."""
    return DenseCRF(**settings)(logits, image)  # type: ignore[arg-type]
