"""``model.condconv`` and ``model.convert`` applied to a task's freshly built model (:func:`apply_model_convert`,
the last step of every adapter's ``build_model``), with ``model.pretrained`` of the unconverted model (a dense
twin's checkpoint) loaded first, so the conversions upcycle its trained convolutions."""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

__all__ = ["apply_model_convert"]

logger = logging.getLogger("pce")


def _apply_condconv(model: nn.Module, cfg: Any, log: bool = True) -> nn.Module:
    """``model.condconv`` entries (timm's CondConv2d at the selected convolutions, upcycled), logged (``log``); an
    entry's error names ``model.condconv.<i>``."""
    entries = list(getattr(cfg.model, "condconv", None) or [])
    from pce.engine.errors import PCEError, one_line
    from pce.models.condconv import apply_condconv_entries

    for i, entry in enumerate(entries):
        try:
            names = apply_condconv_entries(model, [entry])[0]
        except (ValueError, TypeError) as e:
            raise PCEError(f"model.condconv.{i}", one_line(e)) from e
        if log:
            logger.info("model.condconv.%d: %d convolution(s) replaced by CondConv (timm CondConv2d, %d experts): "
                        "%s", i, len(names), int(entry.get("num_experts", 4)), ", ".join(names))
    return model


def _convert_entries(model: nn.Module, cfg: Any, example_input: Any = None, log: bool = True) -> nn.Module:
    """``model.convert`` entries of ``cfg`` applied in turn, each report logged (``log``)."""
    from pce.engine.errors import PCEError, one_line
    from pce.engine.validation import convert_call
    from pce.models.convert import convert

    for i, entry in enumerate(list(getattr(cfg.model, "convert", None) or [])):
        targets, kwargs = convert_call(entry)
        try:
            model, report = convert(model, targets, example_input=example_input, **kwargs)
        except (ValueError, TypeError) as e:
            msg = one_line(e)
            where = f"model.convert.{i}" + (".target" if any(msg.startswith(f"{t}:") for t in targets) else "")
            raise PCEError(where, msg) from e
        if log:
            logger.info("model.convert.%d (%s): %d convolution(s) replaced by PCEConv2d\n%s", i, ", ".join(targets),
                        len(report.layers), report)
    return model


def apply_model_convert(model: nn.Module, cfg: Any, example_input: Any = None) -> nn.Module:
    """``model.condconv`` then ``model.convert`` of ``cfg`` applied to the task's freshly built ``model``, entry by
    entry (:func:`pce.convert` with the entry's options, :func:`pce.engine.validation.convert_call`), and returned;
    the last step of every adapter's ``build_model``, so training, evaluation, inference, export, the routing tools
    and the report all build the same converted structure and a converted run's checkpoint loads into it. Each
    entry's report (shapes, parameters, active FLOPs per layer, measured by one eval-mode forward of
    ``example_input``; without one they are left out) is logged. A target that selects no convolution is
    ``pce.convert``'s one-line error under ``model.convert.<i>.target``; another error of an entry names
    ``model.convert.<i>``. Without entries the model is returned untouched (no forward, no random numbers drawn).

    While the trainer builds the model (:func:`pce.engine.weights.pretrained_before_conversion`), a
    ``model.pretrained`` that fits the model before the conversions better than after them (the dense twin's
    checkpoint) is loaded first (:func:`pce.engine.weights.load_before_conversion`): the entries upcycle the
    trained convolutions."""
    condconv = list(getattr(cfg.model, "condconv", None) or [])
    entries = list(getattr(cfg.model, "convert", None) or [])
    if not condconv and not entries:
        return model
    from pce.engine.weights import load_before_conversion

    what = " and ".join(k for k, v in (("model.condconv", condconv), ("model.convert", entries)) if v)
    load_before_conversion(model, lambda m: _convert_entries(_apply_condconv(m, cfg, log=False), cfg, log=False),
                           what)
    return _convert_entries(_apply_condconv(model, cfg), cfg, example_input)
