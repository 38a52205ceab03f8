"""Mixture of experts: routers, expert banks, dispatch, execution strategies, router losses and the recorder.

Imports :mod:`pce.layers` only; :mod:`pce.models` builds layers and backbones from these parts.
"""
