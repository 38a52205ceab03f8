"""Test helper: run a module inside :func:`pce.record_routing` and return its output with the routing."""
from typing import Any, List, Tuple

from torch import nn

import pce


def run_routed(module: nn.Module, *args: Any, **kwargs: Any) -> Tuple[Any, List[pce.RoutingResult]]:
    """``(module(*args, **kwargs), [RoutingResult of every PCE layer, forward order])``."""
    with pce.record_routing(module) as rec:
        out = module(*args, **kwargs)
    return out, rec.results
