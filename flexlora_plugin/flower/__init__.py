"""Flower host of FlexLoRA: the :class:`FlexLoRA` strategy and its wire format (:mod:`.records`).

The Flower App itself (ServerApp / ClientApp) lives in ``flower_app/``; the main job is
``python -m flexlora_plugin.flower.run``. The strategy is imported on first use, so that
:mod:`.settings` (the run config) loads without flwr.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FlexLoRA", "rank_label", "sample_partitions"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import strategy

        return getattr(strategy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
