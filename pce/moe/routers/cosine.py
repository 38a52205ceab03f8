"""Cosine-similarity router with K-Means-initialised, EMA-updated keys (seeds 000/001, option B of 004)."""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pce.registry import ROUTERS
from pce.moe.routing import Router, RoutingResult

if TYPE_CHECKING:  # pragma: no cover
    from pce.layers.patched_map import PatchedMap
from pce.layers.pointwise import PointwiseConv
from pce.layers.spp import SpatialPyramidPooling
from pce.moe.routers.threshold import adaptive_threshold, hard_threshold_mask, soft_threshold_mask


@ROUTERS.register("cosine")
class CosineRouter(Router):
    """Routes by cosine similarity between SPP patch embeddings and per-expert keys.

    Pipeline: 1x1 projection ``C -> proj_channels`` -> SPP(levels) -> embedding ``e [B, P, D]`` ->
    ``s = cos(e, K) / temperature`` -> softmax -> adaptive-threshold mask (soft, or hard with exact zeros).

    Keys ``K [E, D]`` start as random unit vectors (a fresh model works without data), can be initialised by
    K-Means on real patch embeddings (:meth:`init_keys`), are updated by EMA in training while they are
    outside the graph, and join the graph after :meth:`set_keys_trainable(True)`.
    EMA (seed eq. 13, on L2-normalised embeddings, keys renormalised after each step):
    ``k_i <- a k_i + (1 - a) sum_j w_ij e_j / sum_j w_ij`` for experts with ``sum_j w_ij > 0``.
    """

    uses_keys = True

    def __init__(self, in_channels: int, num_experts: int, proj_channels: int = 8,
                 spp_levels: Sequence[int] = (1, 2, 4), spp_mode: str = "avg", temperature: float = 0.1,
                 threshold: bool = True, lambdas: Sequence[float] = (0.1, 0.1, 0.1), beta: float = 20.0,
                 gap_k: int = 4, hard_threshold: bool = False, ema_decay: float = 0.99, ema_update: bool = True,
                 keys_trainable: bool = False, top_k: Optional[int] = None, renormalize: bool = False,
                 capacity_factor: Optional[float] = None) -> None:
        super().__init__(num_experts, top_k=top_k, renormalize=renormalize, capacity_factor=capacity_factor)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        self.in_channels = in_channels
        self.proj = PointwiseConv(in_channels, proj_channels)
        self.spp = SpatialPyramidPooling(spp_levels, spp_mode)
        self.embed_dim = self.spp.output_dim(proj_channels)
        self.temperature = temperature
        self.threshold = threshold
        self.lambdas = tuple(lambdas)
        self.beta = beta
        self.gap_k = gap_k
        self.hard_threshold = hard_threshold
        self.ema_decay = ema_decay
        self.ema_update = ema_update
        self.keys = nn.Parameter(F.normalize(torch.randn(num_experts, self.embed_dim), dim=-1),
                                 requires_grad=keys_trainable)
        self._collected: Optional[List[torch.Tensor]] = None

    @property
    def is_sparse(self) -> bool:
        return super().is_sparse or (self.threshold and self.hard_threshold)

    @property
    def keys_trainable(self) -> bool:
        return self.keys.requires_grad

    def set_keys_trainable(self, flag: bool) -> None:
        """Phase switch: ``True`` puts the keys in the graph (and stops EMA updates)."""
        self.keys.requires_grad_(bool(flag))
        if not flag:
            self.keys.grad = None

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """``[B, P, C, n, n] -> [B, P, D]`` SPP embeddings of the projected patches."""
        B, P, C, n, m = patches.shape
        if C != self.in_channels:
            raise ValueError(f"cosine router expects {self.in_channels} patch channels, got {C}")
        e = self.spp(self.proj(patches.reshape(B * P, C, n, m)))
        return e.reshape(B, P, -1)

    def similarity_logits(self, emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(emb, dim=-1) @ F.normalize(self.keys, dim=-1).t() / self.temperature

    def mask(self, probs: torch.Tensor) -> torch.Tensor:
        if not self.threshold:
            return probs
        theta = adaptive_threshold(probs, self.lambdas, self.gap_k)
        if self.hard_threshold:
            return hard_threshold_mask(probs, theta)
        return soft_threshold_mask(probs, theta, self.beta)

    def route_weights(self, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Mixing weights from the similarity scores (subclasses change the sampling)."""
        return self.mask(probs)

    # -- routing from a projected map (the fast path of route(): no concatenated positional copy of the map) --
    def route(self, view: "PatchedMap") -> RoutingResult:
        """Project the map, then cut patches of the few projected channels (equal to routing the patches with
        positional channels, without building them); overlapping grids take the generic path."""
        if view.grid.overlapping:
            return super().route(view)
        projected = self.project_map(view.padded, view.pos_map if view.pos_channels else None)
        return self.forward_projected(view.extractor.extract(projected, view.grid)[0])

    def project_map(self, x: torch.Tensor, pos_map: Optional[torch.Tensor]) -> torch.Tensor:
        """The 1x1 projection of ``cat([x, pos])`` computed without the concatenation:
        ``W_x x + (W_pos pos + b)``, ``x [B, C, H, W]`` and ``pos_map [1, Pc, H, W]`` -> ``[B, proj_channels, H, W]``.
        Exactly :meth:`embed`'s projection, so the patches of this map give the same embeddings."""
        C = x.shape[1]
        if C + (pos_map.shape[1] if pos_map is not None else 0) != self.in_channels:
            raise ValueError(f"cosine router expects {self.in_channels} channels (content + positional), "
                             f"got {C} + {0 if pos_map is None else pos_map.shape[1]}")
        w = self.proj.weight  # [O, C + Pc, 1, 1]
        y = F.conv2d(x, w[:, :C])
        if pos_map is not None and pos_map.shape[1]:
            return y + F.conv2d(pos_map, w[:, C:], self.proj.bias)
        return y + self.proj.bias.view(1, -1, 1, 1) if self.proj.bias is not None else y

    def forward_projected(self, projected: torch.Tensor, positions: Optional[torch.Tensor] = None) -> RoutingResult:
        """Route from projected patches ``[B, P, proj_channels, n, n]`` (patches of :meth:`project_map`; the
        positional channels are in them, so the patch centres ``positions`` are not read)."""
        B, P = projected.shape[:2]
        emb = self.spp(projected.reshape(B * P, *projected.shape[2:])).reshape(B, P, -1)
        return self.route_embeddings(emb)

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> RoutingResult:
        return self.route_embeddings(self.embed(patches))

    def route_embeddings(self, emb: torch.Tensor) -> RoutingResult:
        """Scores, weights, EMA step and K-Means collection from embeddings ``[B, P, D]``."""
        if self._collected is not None:
            self._collected.append(emb.detach().reshape(-1, emb.shape[-1]).float().cpu())
        logits = self.similarity_logits(emb)
        probs = logits.softmax(-1)
        result = self.finalize(self.route_weights(logits, probs), probs, logits)
        if self.training and self.ema_update and not self.keys_trainable:
            self.ema_step(emb.detach(), result.weights.detach())
        return result

    @torch.no_grad()
    def ema_step(self, emb: torch.Tensor, weights: torch.Tensor) -> None:
        """One EMA update of the keys from embeddings ``[B, P, D]`` and weights ``[B, P, E]``."""
        e = F.normalize(emb.reshape(-1, emb.shape[-1]).float(), dim=-1)
        w = weights.reshape(-1, weights.shape[-1]).float()
        mass = w.sum(0)  # [E]
        target = (w.t() @ e) / mass.clamp_min(1e-12).unsqueeze(1)
        live = mass > 0
        new = self.ema_decay * self.keys.float() + (1 - self.ema_decay) * target
        new = F.normalize(new, dim=-1)
        self.keys.data[live] = new[live].to(self.keys.dtype)

    # -- K-Means initialisation -------------------------------------------------------------------
    def start_collecting(self) -> None:
        self._collected = []

    def stop_collecting(self) -> torch.Tensor:
        data = torch.cat(self._collected) if self._collected else torch.empty(0, self.embed_dim)
        self._collected = None
        return data

    @torch.no_grad()
    def init_keys(self, embeddings: torch.Tensor, seed: int = 0, max_samples: int = 20000) -> torch.Tensor:
        """K-Means (scikit-learn) on ``embeddings [N, D]``; keys = L2-normalised centroids. Returns the keys.

        Embeddings are L2-normalised first (the router compares directions). Raises if N < E.
        """
        from sklearn.cluster import KMeans

        E = self.num_experts
        x = F.normalize(embeddings.float(), dim=-1).cpu().numpy().astype(np.float64)
        if x.shape[0] < E:
            raise ValueError(f"K-Means needs at least num_experts={E} embeddings, got {x.shape[0]}")
        rng = np.random.default_rng(seed)
        if x.shape[0] > max_samples:
            x = x[rng.choice(x.shape[0], max_samples, replace=False)]
        uniq = np.unique(x.round(6), axis=0)
        if uniq.shape[0] < E:  # degenerate data: jitter so every key is distinct
            x = x + 1e-3 * rng.standard_normal(x.shape)
        km = KMeans(n_clusters=E, n_init=4, random_state=seed).fit(x)
        keys = F.normalize(torch.as_tensor(km.cluster_centers_, dtype=torch.float32), dim=-1)
        self.keys.data.copy_(keys.to(self.keys.device, self.keys.dtype))
        return self.keys.detach().clone()
