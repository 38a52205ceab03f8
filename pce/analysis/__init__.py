"""Interpretability: routing maps, expert specialisation statistics, expert pruning / duplication, run reports.

>>> from pce.analysis import routing_maps, RoutingStats, prune_experts, duplicate_expert
>>> maps = routing_maps(model, images)                      # {layer: LayerMap}: expert / entropy per patch
>>> small = prune_experts(model, {"backbone.stages.2.layers.0": [3]})
>>> div = expert_diversity(model, [images])                 # do the experts differ? (weights and outputs)
>>> table = causal_table(model, [images])                   # does routing matter? (forced expert, shuffled routing)

Everything reads routing through :func:`pce.record_routing`. Expert surgery lives in :mod:`pce.moe.surgery` (the
engine's checkpoint loading replays it); its names are exported here too. Tools: ``tools/visualize_routing.py``,
``tools/analyze_routing.py``, ``tools/analyze_experts.py``, ``tools/prune_experts.py``, ``tools/report.py`` (see
docs/INTERPRETABILITY.md).
"""
from pce.analysis.causal import causal_summary, causal_table, routing_intervention
from pce.analysis.diversity import diversity_summary, expert_diversity
from pce.analysis.labels import box_patch_labels, class_patch_labels, mask_patch_labels, position_labels
from pce.analysis.maps import LayerMap, feature_strides, layer_map, routing_maps
from pce.analysis.stats import RoutingStats, nmi_with_baseline
from pce.moe.surgery import apply_structure, duplicate_expert, pce_layers, prune_experts, structure

__all__ = ["LayerMap", "routing_maps", "layer_map", "feature_strides", "RoutingStats", "nmi_with_baseline",
           "position_labels", "class_patch_labels", "mask_patch_labels", "box_patch_labels", "prune_experts",
           "duplicate_expert", "apply_structure", "structure", "pce_layers", "expert_diversity", "diversity_summary",
           "causal_table", "causal_summary", "routing_intervention"]
