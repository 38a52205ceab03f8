"""The PCE layer: extract patches -> route -> experts -> weighted sum -> reassemble -> 1x1 conv (+ skip)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from pce.moe.dispatch import DISPATCHERS, dispatch_context
from pce.moe.experts import build_expert_bank
from pce.layers.patches import PatchExtractor, PatchGrid
from pce.layers.pointwise import PointwiseConv
from pce.layers.positional import PositionalEncoding, patch_centers
from pce.moe.routers import build_router
from pce.moe.routing import Router, RoutingResult

EXECUTIONS = ("auto", "reference", "fused", "dense", "sparse", "context", "map")


class PCELayer(nn.Module):
    """One Positional Convolution Experts layer, ``[B, C, H, W] -> [B, C, H, W]``.

    1. fit the patch grid to the map (``padding="fit"``: shrink the patches to tile it when they can, else pad;
       ``"pad"``: zero-pad; ``"error"``: fail, see :mod:`pce.layers.patches`); add positional channels;
    2. extract patches ``[B, P, C + pos, n, n]`` and route them: weights ``[B, P, E]``;
    3. run the experts on the patches (isolated patches, as in the seeds, plus ``halo`` pixels of neighbour
       context when ``halo > 0``), routing-weighted sum, reassemble, crop;
    4. ``out = x + proj_1x1(mixture)``. A patch with all-zero weights (dropped) outputs exactly ``x``.

    ``execution``: ``"auto"`` (sparse dispatch when the router emits exact zeros; otherwise the fused pass on
    CUDA and the per-expert dense loop on CPU, the faster of the two on each as measured by
    ``tools/benchmark.py``), ``"reference"``, ``"fused"``, ``"dense"``, ``"sparse"`` (see :mod:`pce.moe.dispatch`),
    ``"context"``: top-1 routing where every pixel is computed by its patch's expert and each convolution reads
    the neighbouring patches' activations across the border (a halo at no extra FLOPs; with every patch on one
    expert it is exactly that expert on the whole map), or ``"map"``: all experts run on the
    whole map and per-patch weights are broadcast to pixels, so experts see their neighbours (a free halo;
    cost E x one expert). Neither is the seeds' isolated-patch semantics (the default).
    ``norm_stats="layer"`` (context execution only): the experts' batch norms share the statistics of all
    the layer's pixels (per-expert affine), as a dense layer's batch norm would, instead of each expert's own.
    """

    def __init__(self, channels: int, patch_size: int, num_experts: int = 4, router: str = "cosine",
                 router_kwargs: Optional[Dict[str, Any]] = None, top_k: Optional[int] = None,
                 expert: str = "residual", expert_kwargs: Optional[Dict[str, Any]] = None,
                 pos_encoding: str = "coord", num_frequencies: int = 4, experts_see_position: bool = False,
                 halo: int = 0, patch_stride: Optional[int] = None, padding: str = "fit",
                 execution: str = "auto", norm_stats: str = "expert") -> None:
        super().__init__()
        if norm_stats not in ("expert", "layer"):
            raise ValueError(f"norm_stats must be 'expert' or 'layer', got {norm_stats!r}")
        if norm_stats == "layer" and execution != "context":
            raise ValueError("norm_stats='layer' (batch-norm statistics pooled over the layer's experts) needs "
                             "execution='context'")
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        if execution in ("map", "context") and (halo or (patch_stride not in (None, patch_size))):
            raise ValueError(f"execution={execution!r} already gives experts their neighbours: "
                             "use halo=0 and no overlap")
        self.channels, self.patch_size, self.num_experts = channels, patch_size, num_experts
        self.halo, self.execution, self.norm_stats = halo, execution, norm_stats
        self.extractor = PatchExtractor(patch_size, patch_stride, padding)
        self.pos = PositionalEncoding(pos_encoding, num_frequencies)
        routed_channels = channels + self.pos.num_channels
        rkw = dict(router_kwargs or {})
        if top_k is not None:
            rkw["top_k"] = top_k
        self.router_name = router
        self.router: Router = build_router(router, routed_channels, num_experts, **rkw)
        self.experts_see_position = experts_see_position
        expert_in = routed_channels if experts_see_position else channels
        self.experts = build_expert_bank(expert, num_experts, expert_in, channels, **(expert_kwargs or {}))
        self.proj = PointwiseConv(channels, channels, bias=False)
        self._override: Optional[Router] = None

    def extra_repr(self) -> str:
        return f"channels={self.channels}, patch_size={self.patch_size}, E={self.num_experts}, execution={self.execution!r}"

    # -- phases ----------------------------------------------------------------------------------
    def set_router_override(self, name: Optional[str], **kwargs: Any) -> None:
        """Route with a parameter-free router (e.g. ``"uniform"``, ``"positional"``) instead of the learned one,
        e.g. during the stabilisation phase; ``None`` restores the learned router. Not saved in checkpoints.
        The learned router's ``top_k`` carries over unless given, so stabilisation costs what routing costs."""
        if name is None:
            self._override = None
            return
        if getattr(self.router, "top_k", None) is not None:
            # keep the compute budget: uniform picks top_k random experts, positional keeps its top_k
            kwargs.setdefault("top_k", self.router.top_k)
        r = build_router(name, self.router_in_channels, self.num_experts, **kwargs)
        if any(True for _ in r.parameters()):
            raise ValueError(f"router override {name!r} has parameters; use a parameter-free router")
        object.__setattr__(self, "_override", r)

    @property
    def router_in_channels(self) -> int:
        return self.channels + self.pos.num_channels

    @property
    def active_router(self) -> Router:
        if self._override is not None:
            self._override.train(self.training)
            return self._override
        return self.router

    # -- forward -----------------------------------------------------------------------------------
    def choose_execution(self, router: Router, device: torch.device) -> str:
        if self.execution != "auto":
            return self.execution
        if router.is_sparse:
            return "sparse"
        return "fused" if device.type == "cuda" else "dense"

    def forward(self, x: torch.Tensor, return_routing: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, RoutingResult]]:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"PCELayer expects [B, {self.channels}, H, W], got {tuple(x.shape)}")
        B, C, H, W = x.shape
        ext = self.extractor
        grid = ext.grid(H, W)
        xp = ext.pad(x, grid)
        n = grid.patch_size  # the nominal patch_size, or smaller under padding="fit"
        P, Pc = grid.num_patches, self.pos.num_channels
        content, _ = ext.extract(xp, grid)  # [B, P, C, n, n]
        pos_map = self.pos(grid.grid_h, grid.grid_w, n, n, x.device, x.dtype)  # [1, Pc, gh*n, gw*n]
        patches: Optional[torch.Tensor] = None  # content + positional channels, built only when needed

        def with_position() -> torch.Tensor:
            if not Pc:
                return content
            pos_patches = pos_map.reshape(1, Pc, grid.grid_h, n, grid.grid_w, n).permute(0, 2, 4, 1, 3, 5)
            pos_patches = pos_patches.reshape(1, P, Pc, n, n).expand(B, -1, -1, -1, -1)
            return torch.cat([content, pos_patches], dim=2)

        positions = patch_centers(grid.grid_h, grid.grid_w, x.device, x.dtype)
        router = self.active_router
        if getattr(router, "supports_map_projection", False) and not grid.overlapping:
            # project the map, then cut patches of the few projected channels: no C + Pc channel patch copy
            projected = ext.extract(router.project_map(xp, pos_map if Pc else None), grid)[0]
            routing = router.forward_projected(projected, positions)
        else:
            patches = with_position()
            routing = router(patches, positions)
        if self.experts_see_position and patches is None:
            patches = with_position()
        routing.grid = (grid.grid_h, grid.grid_w)
        weights = routing.weights
        mode = self.choose_execution(router, x.device)
        if self.experts_see_position and (mode == "map" or self.halo):
            if grid.overlapping:
                raise ValueError("experts_see_position with halo or execution='map' needs non-overlapping patches")
            src = torch.cat([xp, pos_map.expand(B, -1, -1, -1)], dim=1)
        else:
            src = xp
        if mode == "map":
            wmap = weights.reshape(B, grid.grid_h, grid.grid_w, -1).permute(0, 3, 1, 2)
            wmap = wmap.repeat_interleave(n, dim=2).repeat_interleave(n, dim=3)  # [B, E, Hp, Wp]
            y_all = self.experts.forward_all(src)  # [B, E, C, Hp, Wp]
            mix = torch.einsum("bechw,behw->bchw", y_all, wmap.to(y_all.dtype))[:, :, :H, :W]
        elif mode == "context" and (whole := self._sole_expert_on_map(x, pos_map, weights, grid)) is not None:
            mix = whole
        elif mode == "context":
            tokens = (patches if self.experts_see_position else content).reshape(B * P, -1, n, n)

            def to_windows(rows: torch.Tensor, r: int) -> torch.Tensor:  # [B*P, c, n, n] -> [B*P, c, n+2r, n+2r]
                m = ext.reassemble(rows.reshape(B, P, -1, n, n), grid)
                return ext.extract_windows(m, grid, r).reshape(B * P, -1, n + 2 * r, n + 2 * r)

            out = dispatch_context(self.experts, tokens, weights.reshape(B * P, -1), to_windows, self.norm_stats)
            mix = ext.reassemble(out.reshape(B, P, C, n, n), grid)
        else:
            if self.halo:
                tokens = ext.extract_windows(src, grid, self.halo)
            else:
                tokens = patches if self.experts_see_position else content
            tokens = tokens.reshape(B * P, *tokens.shape[2:])
            out = DISPATCHERS[mode](self.experts, tokens, weights.reshape(B * P, -1))
            if self.halo:
                h = self.halo
                out = out[..., h:h + n, h:h + n]
            mix = ext.reassemble(out.reshape(B, P, C, n, n), grid)
        y = x + self.proj(mix)
        return (y, routing) if return_routing else y

    def _sole_expert_on_map(self, x: torch.Tensor, pos_map: torch.Tensor, weights: torch.Tensor,
                            grid: PatchGrid) -> Optional[torch.Tensor]:
        """Context execution when every patch is routed to one and the same expert (the ``"shared"``
        stabilisation phase): that expert on the whole map ``[B, C, H, W]``, times each patch's weight, which is
        exactly what the stitched per-patch execution computes, without re-tiling the map for every
        convolution. ``None`` when routing is mixed, a patch is dropped, or the grid pads the map."""
        if grid.overlapping or grid.padded_size != (grid.height, grid.width):
            return None  # stitched execution zeroes the padding after every layer; a whole-map pass would not
        B, P, E = weights.shape
        counts = (weights.detach() != 0).sum((0, 1)).tolist()  # a host sync (dispatch makes its own if mixed)
        if sum(counts) != B * P or max(counts) != B * P:
            return None
        e = counts.index(B * P)
        src = torch.cat([x, pos_map.expand(B, -1, -1, -1)], 1) if self.experts_see_position else x
        y = self.experts.forward_one(src, e)  # [B, C, H, W]
        gh, gw, n = grid.grid_h, grid.grid_w, grid.patch_size
        w = weights[..., e].to(y.dtype).reshape(B, 1, gh, 1, gw, 1)
        return (y.reshape(B, -1, gh, n, gw, n) * w).reshape(y.shape)


class DenseLayer(nn.Module):
    """The dense twin of :class:`PCELayer`: one expert of the same type on the whole map, ``x + proj(expert(x))``.
    Same interface (``return_routing`` gives ``None``)."""

    def __init__(self, channels: int, expert: str = "residual", expert_kwargs: Optional[Dict[str, Any]] = None,
                 **_: Any) -> None:
        super().__init__()
        self.channels = channels
        self.experts = build_expert_bank(expert, 1, channels, channels, **(expert_kwargs or {}))
        self.proj = PointwiseConv(channels, channels, bias=False)

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"DenseLayer expects [B, {self.channels}, H, W], got {tuple(x.shape)}")
        y = x + self.proj(self.experts.forward_one(x, 0))
        return (y, None) if return_routing else y
