"""The seeds' adaptive threshold and soft mask for routing weights."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from pce.moe.metrics import entropy


def adaptive_threshold(w: torch.Tensor, lambdas: Sequence[float] = (0.1, 0.1, 0.1),
                       gap_k: int = 4, eps: float = 1e-8) -> torch.Tensor:
    """Per-patch threshold ``theta [..., 1]`` from weights ``w [..., E]``.

    ``theta = l1 * (1 - w_max) + l2 * H(w) / log E + l3 * gap`` with
    ``gap = (w_(1) - mean(w_(2) .. w_(k+1))) / (w_(1) + eps)`` and ``k = min(gap_k, E - 1)``.
    For E = 1 the entropy and gap terms are 0.
    """
    l1, l2, l3 = lambdas
    E = w.shape[-1]
    w_max = w.max(-1, keepdim=True).values
    theta = l1 * (1.0 - w_max)
    if E > 1:
        theta = theta + l2 * entropy(w).unsqueeze(-1) / math.log(E)
        k = min(gap_k, E - 1)
        top = w.topk(k + 1, dim=-1).values
        rest = top[..., 1:].mean(-1, keepdim=True)
        theta = theta + l3 * (top[..., :1] - rest) / (top[..., :1] + eps)
    return theta


def soft_threshold_mask(w: torch.Tensor, theta: torch.Tensor, beta: float) -> torch.Tensor:
    """``w * sigmoid(beta * (w - theta))``."""
    return w * torch.sigmoid(beta * (w - theta))


def hard_threshold_mask(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Exact zeros where ``w < theta``; the largest weight of each patch is always kept."""
    keep = (w >= theta) | (w == w.max(-1, keepdim=True).values)
    return w * keep
