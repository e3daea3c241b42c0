"""Flower host of FlexLoRA: the :class:`FlexLoRA` strategy and its wire format (:mod:`.records`).

The Flower App itself (ServerApp / ClientApp) lives in ``flower_app/``; the main job is
``python -m flexlora_plugin.flower.run``.
"""

from .strategy import FlexLoRA, rank_label, sample_partitions

__all__ = ["FlexLoRA", "rank_label", "sample_partitions"]
