"""Flower host of FlexLoRA: the :class:`FlexLoRA` strategy, its ClientApp side :class:`FlexLoRAClient`.

Add them to any ServerApp / ClientApp (docs/tutorials/flower.md). The wire format is
:mod:`.records`. The project's own Flower App lives in ``flower_app/``; the main job is
``python -m flexlora_plugin.flower.run``. Names are imported on first use, so that
:mod:`.settings` (the run config) loads without flwr.
"""

from __future__ import annotations

from typing import Any

_FROM = {
    "FlexLoRA": "strategy",
    "Nodes": "strategy",
    "RoundRecord": "strategy",
    "rank_label": "strategy",
    "sample_partitions": "strategy",
    "FlexLoRAClient": "client",
    "Received": "client",
    "QUERY_RANK": "records",
}
__all__ = sorted(_FROM)


def __getattr__(name: str) -> Any:
    if name in _FROM:
        import importlib

        return getattr(importlib.import_module(f".{_FROM[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
