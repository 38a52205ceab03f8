"""Name -> class/callable registries for datasets and transforms.

Usage::

    @DATASETS.register("mnist")
    class MNIST(Dataset): ...

    ds = build_dataset("mnist", root="/data/mnist", split="test")
"""

from __future__ import annotations

from typing import Any

from pce.registry import Registry


DATASETS = Registry("dataset")
TRANSFORMS = Registry("transform")


def build_dataset(name: str, **kwargs: Any) -> Any:
    """Instantiate the dataset registered as ``name`` with ``kwargs``."""
    return DATASETS.build(name, **kwargs)


def build_transform(name: str, **kwargs: Any) -> Any:
    """Instantiate the transform registered as ``name`` with ``kwargs``."""
    return TRANSFORMS.build(name, **kwargs)
