"""The one channel by which routing leaves a model: :func:`record_routing`.

>>> import torch, pce
>>> model = pce.build_backbone("pce_tiny")
>>> with pce.record_routing(model) as rec:
...     feats = model(torch.randn(1, 3, 64, 64))
>>> [name for name, _ in rec.records]
['stages.0.layers.0', 'stages.1.layers.0', 'stages.2.layers.0', 'stages.3.layers.0']

Any model that contains PCE layers works the same way (a bare backbone, a classifier, Faster R-CNN, an smp
model, a DDP- or EMA-wrapped one): every routing layer is a :class:`RoutingSource` that hands each forward's
:class:`~pce.moe.routing.RoutingResult` to the recorders attached to it, and to nothing else. No module keeps a
result between calls, so copies and pickles of a model never carry an autograd graph.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Type

from torch import nn

from pce.moe.routing import RoutingResult

__all__ = ["RoutingSource", "RoutingRecorder", "record_routing", "routing_sources", "strip_wrapper_prefix",
           "unwrap_model"]

Sink = Callable[[RoutingResult], None]


class RoutingSource:
    """Mixin of a module that routes: :meth:`emit_routing` passes a result to the attached sinks."""

    def _sinks(self) -> List[Sink]:
        sinks = self.__dict__.get("_routing_sinks")
        if sinks is None:
            sinks = self.__dict__["_routing_sinks"] = []
        return sinks

    def attach_sink(self, sink: Sink) -> None:
        self._sinks().append(sink)

    def detach_sink(self, sink: Sink) -> None:
        sinks = self._sinks()
        if sink in sinks:
            sinks.remove(sink)

    def emit_routing(self, result: RoutingResult) -> None:
        for sink in self.__dict__.get("_routing_sinks") or ():
            sink(result)

    def __getstate__(self):  # a copy made inside a recording block does not report to that recorder
        state = super().__getstate__()  # type: ignore[misc]
        state = dict(state)
        state.pop("_routing_sinks", None)
        return state


def routing_sources(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(module path, module)`` of every routing layer of ``model``, in registration order."""
    for name, module in model.named_modules():
        if isinstance(module, RoutingSource):
            yield name, module


def strip_wrapper_prefix(name: str) -> str:
    """A module path without the wrapper prefixes of DDP / DataParallel (``module.``) and EMA (``module.`` of
    ``AveragedModel``): the path :func:`unwrap_model` gives."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def unwrap_model(model: nn.Module, stop_at: Optional[Type[nn.Module]] = None) -> nn.Module:
    """The module inside DDP / DataParallel / EMA (``AveragedModel``) wrappers: follows ``.module`` while it is
    a module, or until a ``stop_at`` instance is reached."""
    while isinstance(getattr(model, "module", None), nn.Module):
        if stop_at is not None and isinstance(model, stop_at):
            break
        model = model.module
    return model


class RoutingRecorder:
    """Collects ``(layer name, RoutingResult)`` in forward order while attached (see :func:`record_routing`).

    Attributes:
        records: ``[(name, result), ...]`` in the order the layers ran (a layer run twice appears twice).
        detach: store results detached from the graph (statistics, plots) instead of differentiable ones (losses).
    """

    def __init__(self, model: nn.Module, detach: bool = False) -> None:
        self.model, self.detach = model, detach
        self.records: List[Tuple[str, RoutingResult]] = []
        self._attached: List[Tuple[nn.Module, Sink]] = []

    def __enter__(self) -> "RoutingRecorder":
        for name, module in routing_sources(self.model):
            sink = self._sink_for(strip_wrapper_prefix(name))
            module.attach_sink(sink)
            self._attached.append((module, sink))
        return self

    def __exit__(self, *exc) -> None:
        for module, sink in self._attached:
            module.detach_sink(sink)
        self._attached = []

    def _sink_for(self, name: str) -> Sink:
        def sink(result: RoutingResult) -> None:
            self.records.append((name, result.detach() if self.detach else result))
        return sink

    @property
    def results(self) -> List[RoutingResult]:
        """The recorded results in forward order (what :func:`pce.router_loss` takes)."""
        return [r for _, r in self.records]

    @property
    def names(self) -> List[str]:
        return [n for n, _ in self.records]

    def by_layer(self) -> Dict[str, List[RoutingResult]]:
        """Results grouped by layer name (forward order of first appearance)."""
        out: Dict[str, List[RoutingResult]] = {}
        for name, r in self.records:
            out.setdefault(name, []).append(r)
        return out

    def clear(self) -> None:
        self.records = []

    def __len__(self) -> int:
        return len(self.records)


@contextlib.contextmanager
def record_routing(model: nn.Module, detach: bool = False) -> Iterator[RoutingRecorder]:
    """``with record_routing(model) as rec: out = model(x)`` -> ``rec.records`` / ``rec.results``: the routing
    of every PCE layer of every forward run inside the block, named by module path (wrapper prefixes such as
    DDP's ``module.`` removed). ``detach=True`` keeps no autograd graph. Recorders nest."""
    rec = RoutingRecorder(model, detach=detach)
    with rec:
        yield rec

