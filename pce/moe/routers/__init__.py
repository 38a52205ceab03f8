"""Routers: every strategy behind one interface (:class:`pce.moe.routing.Router`), registered by name."""
from pce.registry import ROUTERS
from pce.moe.routing import Router, RoutingResult
from pce.moe.routers.cosine import CosineRouter
from pce.moe.routers.gate import ExpertChoiceRouter, GateRouter
from pce.moe.routers.gap_conv import GapConvRouter
from pce.moe.routers.simple import GumbelRouter, PositionalRouter, SharedRouter, UniformRouter
from pce.moe.routers.threshold import adaptive_threshold, hard_threshold_mask, soft_threshold_mask


def build_router(name: str, in_channels: int, num_experts: int, **kwargs) -> Router:
    """Build a registered router: ``build_router("cosine", in_channels=68, num_experts=4, top_k=1)``."""
    return ROUTERS.get(name)(in_channels=in_channels, num_experts=num_experts, **kwargs)


def parameter_free_routers() -> list:
    """Names of the registered routers without parameters: the valid phase ``router_override`` values."""
    return [n for n in ROUTERS.names() if getattr(ROUTERS.get(n), "parameter_free", False)]


__all__ = [
    "ROUTERS", "Router", "RoutingResult", "build_router", "CosineRouter", "GateRouter", "ExpertChoiceRouter",
    "GapConvRouter", "GumbelRouter", "PositionalRouter", "SharedRouter", "UniformRouter", "parameter_free_routers", "adaptive_threshold", "soft_threshold_mask",
    "hard_threshold_mask",
]
