"""``PCEConv2d``: a drop-in ``nn.Conv2d`` whose kernel is chosen per patch by a router (issue #21, PCE anywhere).

>>> conv = nn.Conv2d(64, 64, 3, padding=1)
>>> pce_conv = PCEConv2d.from_conv(conv, num_experts=4, top_k=2, grid=3)   # equals conv at conversion
>>> with pce.record_routing(pce_conv) as rec:
...     y = pce_conv(x)                                  # [B, 64, H, W]; rec.results[0].weights [B, 9, 4]

Geometry. Patches are cells of the *output* map (:class:`~pce.layers.cells.CellGrid`): ``grid=(gh, gw)`` (or
``grid=3``) cuts it into a fixed number of cells with borders ``round(i * H_out / gh)`` (sides differ by at most
one pixel: 17 rows in 3 give 6, 5, 6; a side shorter than the grid gets one cell per pixel), ``patch_size=n`` into
``ceil(H_out / n) x ceil(W_out / n)`` cells split the same way. On the output grid, stride and dilation place
patches consistently. The input pixels of a cell (what its experts read and its router sees):

* ``execution="context"`` (default): the cell's receptive field. Each output pixel is computed by its patch's
  experts, the kernel reading neighbouring patches' pixels across borders, so equal experts give exactly the
  original convolution, for any top-k whose weights sum to 1;
* ``execution="isolated"``: the cell's own input pixels, those under the receptive-field centres of its outputs
  (rows ``r_i * s + d (k - 1) // 2 - pad`` onwards), zeros elsewhere (the seed proposal's patches, convolved on
  their own with zero padding; ``padding_mode`` does not apply).

The router reads each cell's input pixels (clipped to the map) average-pooled to ``router_size x router_size``
(:func:`~pce.layers.patched_map.region_view`; the smallest region's side if smaller), so its cost does not grow
with the map; patch centres ``[P, 2]`` are the grid positions. Any registered router works; kept top-k weights are
renormalised to sum to 1 by default, straight-through (``renormalize="straight_through"``: the router still learns
from the task loss under top-1, whose renormalised weight is the constant 1).

Implementations (``dispatch``): ``"dense"`` (context: every routed expert on the whole map, weighted per pixel,
:func:`~pce.moe.dispatch.dispatch_map`, cost (experts used) x the conv; isolated: every expert on every window),
``"sparse"`` (each expert on a batch of its cells' windows, :func:`~pce.moe.dispatch.dispatch_rows`, about
``k`` x the conv plus the halo), ``"auto"`` (sparse when it computes fewer pixels; dense under graph capture,
where shapes must be static). The kernels: :class:`~pce.moe.experts.ConvExperts`, stored as
:class:`~pce.moe.stacked.StackedKernels` (a :class:`~pce.moe.stacked.StackedConv2d`, so surgery, upcycling and
batch-norm folding see them).
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from pce.layers.cells import CellGrid, CellWindows, conv_pads, gather_windows
from pce.layers.fx import check_map, fx_leaf
from pce.layers.patched_map import region_view
from pce.layers.positional import PositionalEncoding
from pce.models.routed import RoutedLayerMixin
from pce.moe.balance import BALANCE_LOSSES
from pce.moe.dispatch import dispatch_dense, dispatch_map, dispatch_rows
from pce.moe.execution import is_capturing
from pce.moe.experts import ConvExperts
from pce.moe.routers import build_router
from pce.moe.routing import Router, RoutingResult

__all__ = ["PCEConv2d", "ConvCells"]

IntPair = Union[int, Tuple[int, int]]


class ConvCells(NamedTuple):
    """The geometry of one forward: output ``cells``, where they read the input (``rows`` / ``cols``), the input
    regions the router pools (``region_rows`` / ``region_cols``: ``[(a, b)]`` per cell) and the side ``pool`` of its
    pooled patches (``router_size``, or the smallest region's side when smaller: regions are never upsampled)."""

    cells: CellGrid
    rows: CellWindows
    cols: CellWindows
    region_rows: Tuple[Tuple[int, int], ...]
    region_cols: Tuple[Tuple[int, int], ...]
    pool: int


class PCEConv2d(RoutedLayerMixin, nn.Module):
    """``nn.Conv2d`` semantics (``[B, C_in, H, W] -> [B, C_out, H_out, W_out]``, same arguments and output shape)
    with ``num_experts`` kernels ``experts.weight [E, C_out, C_in / groups, kh, kw]`` (+ ``experts.bias [E, C_out]``)
    mixed per patch by ``router`` (any registered router; ``router_kwargs`` for it, ``top_k`` and renormalisation
    as in :class:`~pce.models.layer.PCELayer`). See the module docstring for patches, execution and dispatch.
    ``balance``: this layer's load-balancing term (:mod:`pce.moe.balance`), stamped on every result it records, so
    the ``balance`` weight of :func:`pce.router_loss` applies it. A routed layer
    (:class:`~pce.models.routed.RoutedLayerMixin`): router override, keys and upcycling as ``PCELayer``'s."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: Union[str, IntPair] = 0, dilation: IntPair = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", *, num_experts: int = 4, top_k: Optional[int] = 2,
                 router: str = "gap_conv", router_kwargs: Optional[Dict[str, Any]] = None,
                 patch_size: Optional[int] = None, grid: Optional[IntPair] = None, execution: str = "context",
                 dispatch: str = "auto", router_size: int = 8, pos_encoding: str = "none", num_frequencies: int = 4,
                 balance: str = "switch", device: Any = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if execution not in ("context", "isolated"):
            raise ValueError(f"execution must be 'context' or 'isolated', got {execution!r}")
        if dispatch not in ("auto", "dense", "sparse"):
            raise ValueError(f"dispatch must be 'auto', 'dense' or 'sparse', got {dispatch!r}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode must be zeros, reflect, replicate or circular, got {padding_mode!r}")
        if patch_size is not None and grid is not None:
            raise ValueError("give patch_size or grid, not both")
        if balance not in BALANCE_LOSSES:
            raise ValueError(f"balance must be one of {sorted(BALANCE_LOSSES)}, got {balance!r}")
        if (patch_size is not None and patch_size < 1) or router_size < 1:
            raise ValueError(f"patch_size and router_size must be >= 1, got {patch_size}, {router_size}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding, self.padding_mode = padding, padding_mode
        self.pads = conv_pads(padding, self.kernel_size, self.stride, self.dilation)  # (top, bottom, left, right)
        self.patch_size = patch_size
        self.grid = None if patch_size is not None else _pair(3 if grid is None else grid)
        if self.grid is not None and min(self.grid) < 1:
            raise ValueError(f"grid must be >= 1 cells per side, got {grid!r}")
        self.num_experts, self.execution, self.dispatch = num_experts, execution, dispatch
        self.router_size, self.balance = router_size, balance
        self.pos = PositionalEncoding(pos_encoding, num_frequencies)
        rkw = dict(router_kwargs or {})
        rkw.setdefault("renormalize", "straight_through")
        if top_k is not None:
            rkw["top_k"] = top_k
        self.router_name, self.router_kwargs = router, rkw
        self.router: Router = build_router(router, self.router_in_channels, num_experts, **rkw)
        self.experts = ConvExperts(num_experts, in_channels, out_channels, self.kernel_size, self.stride,
                                   self.dilation, groups, bias)
        self.router_override: Optional[Router] = None
        self.to(device=device, dtype=dtype)

    @property
    def router_in_channels(self) -> int:
        return self.in_channels + self.pos.num_channels

    @property
    def top_k(self) -> Optional[int]:
        return getattr(self.router, "top_k", None)

    def extra_repr(self) -> str:
        cells = f"grid={self.grid}" if self.grid is not None else f"patch_size={self.patch_size}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, E={self.num_experts}, "
                f"top_k={self.top_k}, {cells}, execution={self.execution!r}")

    # -- construction from a trained convolution ------------------------------------------------------------
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, num_experts: int = 4, top_k: Optional[int] = 2,
                  grid: Optional[IntPair] = 3, router: str = "gap_conv", noise: float = 0.0,
                  execution: str = "context", *, patch_size: Optional[int] = None,
                  layer_options: Optional[Dict[str, Any]] = None, **router_kwargs: Any) -> "PCEConv2d":
        """Upcycle ``conv``: every expert a copy of its kernel and bias (plus ``noise * std(kernel)`` Gaussian
        noise when ``noise > 0``), on ``conv``'s device, dtype and train/eval mode. With ``noise=0`` the layer
        computes ``conv`` exactly (float tolerance) for any routing whose kept weights sum to 1 (renormalised
        top-k, the default), in context execution. ``patch_size`` replaces ``grid``; ``layer_options`` go to the
        constructor (``dispatch``, ``router_size``, ``pos_encoding``, ``balance``); the rest to the router."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        w = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, num_experts=num_experts,
                    top_k=top_k, router=router, router_kwargs=router_kwargs, execution=execution,
                    patch_size=patch_size, grid=None if patch_size is not None else grid,
                    device=w.device, dtype=w.dtype, **(layer_options or {}))
        layer.experts.load_from(w.detach(), None if conv.bias is None else conv.bias.detach(), noise)
        return layer.train(conv.training)

    # -- geometry -------------------------------------------------------------------------------------------
    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        (top, bottom, left, right), (kh, kw) = self.pads, self.kernel_size
        (sh, sw), (dh, dw) = self.stride, self.dilation
        return ((height + top + bottom - dh * (kh - 1) - 1) // sh + 1,
                (width + left + right - dw * (kw - 1) - 1) // sw + 1)

    def cells(self, height_out: int, width_out: int) -> CellGrid:
        """The patch grid on the output map."""
        if self.grid is not None:
            return CellGrid.split(height_out, width_out, *self.grid)
        return CellGrid.tiles(height_out, width_out, self.patch_size)

    def geometry(self, height: int, width: int) -> "ConvCells":
        """The cells of the output of a ``height x width`` input, where they read the input and the router's view."""
        Ho, Wo = self.output_size(height, width)
        if Ho < 1 or Wo < 1:
            raise ValueError(f"PCEConv2d: input {height}x{width} is smaller than the (dilated) kernel "
                             f"{self.kernel_size}")
        cells = self.cells(Ho, Wo)
        (k0, k1), (s0, s1), (d0, d1) = self.kernel_size, self.stride, self.dilation
        rows = CellWindows.of(cells.rows, height, k0, s0, d0, self.pads[0])
        cols = CellWindows.of(cells.cols, width, k1, s1, d1, self.pads[2])
        ctx = self.execution == "context"
        reg_r, reg_c = (rows.field, cols.field) if ctx else (rows.own, cols.own)
        side = min([min(b, height) - max(a, 0) for a, b in reg_r] + [min(b, width) - max(a, 0) for a, b in reg_c])
        return ConvCells(cells, rows, cols, reg_r, reg_c, max(1, min(self.router_size, side)))

    def _windows(self, xp: torch.Tensor, rows: CellWindows, cols: CellWindows,
                 which: Optional[List[int]] = None) -> torch.Tensor:
        """Cells' input windows of the padded map ``xp``: every cell's ``[B * P, C, span_h, span_w]``, or those of
        tokens ``which`` (``b * P + p``); isolated execution zeroes the pixels outside each cell's own input."""
        win = gather_windows(xp, rows, cols, which)
        if which is None:
            win = win.flatten(0, 1)
        if self.execution == "isolated":
            keep = rows.own_mask(xp.device)[:, None, :, None] & cols.own_mask(xp.device)[None, :, None, :]
            keep = keep.flatten(0, 1).to(win.dtype)  # [P, h, w]
            P = keep.shape[0]
            idx = torch.arange(win.shape[0]) % P if which is None else torch.tensor(which) % P
            win = win * keep[idx.to(keep.device)].unsqueeze(1)
        return win

    # -- forward --------------------------------------------------------------------------------------------
    @fx_leaf
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C_in, H, W]`` -> ``[B, C_out, H_out, W_out]``, ``H_out`` as ``nn.Conv2d``'s. An FX leaf
        (:func:`pce.layers.fx.fx_leaf`): the cells and the routing depend on the map. Under graph capture
        (``torch.export``, ``torch.compile``) the dense implementation runs: static shapes, same outputs."""
        g = self.geometry(*check_map(x, self.in_channels, "PCEConv2d").shape[-2:])
        cells = g.cells
        view = region_view(x, g.region_rows, g.region_cols, g.pool, self.pos)
        router = self.current_router()
        routing = self._stamp(router.route(view), cells)
        out = self._execute(self._pad(x), cells, g.rows, g.cols, routing.weights, router)
        self.emit_routing(routing)
        return out

    def _stamp(self, routing: RoutingResult, cells: CellGrid) -> RoutingResult:
        """The layer's geometry and balancing term on its result: the output grid, its cell borders and size."""
        routing.grid, routing.patch_size = (cells.grid_h, cells.grid_w), cells.square_side
        routing.patch_stride = routing.patch_size
        routing.map_size, routing.cell_rows, routing.cell_cols = (cells.height, cells.width), cells.rows, cells.cols
        routing.balance = self.balance
        return routing

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = self.pads
        if not any(self.pads):
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, (left, right, top, bottom), mode=mode)

    def _execute(self, xp: torch.Tensor, cells: CellGrid, rows: CellWindows, cols: CellWindows,
                 weights: torch.Tensor, router: Router) -> torch.Tensor:
        """Padded input ``xp``, ``weights [B, P, E]`` -> ``[B, C_out, H_out, W_out]``."""
        B, P, E = weights.shape
        mode, used = self._plan(weights, cells, router)
        if mode == "dense" and self.execution == "context":
            return dispatch_map(self.experts, xp, cells.expand(weights), used)
        w = weights.reshape(B * P, E)
        if mode == "dense":
            y = dispatch_dense(self.experts, self._windows(xp, rows, cols), w)
        else:
            y = dispatch_rows(self.experts, lambda which: self._windows(xp, rows, cols, which), w,
                              (self.out_channels, cells.cell_h, cells.cell_w))
        return cells.place(y.reshape(B, P, *y.shape[1:]))

    def _plan(self, weights: torch.Tensor, cells: CellGrid, router: Router) -> Tuple[str, Optional[list]]:
        """The implementation to run and the experts the dense context path needs (``None``: all). Under graph
        capture: dense over all experts (static shapes). ``auto``: sparse when its windows hold fewer output
        pixels than the dense maps of the experts in use (one host synchronisation)."""
        if is_capturing() or torch.jit.is_tracing():  # also fvcore's FLOP-counting trace: no Python autograd
            return "dense", None                      # Function (the sparse windows) can be traced by torch.jit
        if self.dispatch == "sparse" or (self.dispatch == "dense" and self.execution == "isolated"):
            return self.dispatch, None
        if self.dispatch == "auto" and not router.is_sparse:
            return "dense", None
        nz = weights.detach() != 0
        stats = torch.cat([nz.sum().view(1), nz.any(0).any(0)]).tolist()
        pairs, used = stats[0], [e for e, u in enumerate(stats[1:]) if u]
        if self.dispatch == "auto":
            B = weights.shape[0]
            sparse_px = pairs * cells.cell_h * cells.cell_w
            return ("sparse" if sparse_px < len(used) * B * cells.height * cells.width else "dense"), used
        return self.dispatch, used
