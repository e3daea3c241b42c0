"""The FS aggregator of :class:`~flexlora_plugin.federatedscope.worker.FlexLoRAServer`.

A thin :class:`federatedscope.core.aggregators.Aggregator` around the core's round protocol
(:class:`~flexlora_plugin.core.federation.Federation`): it aggregates, and saves / restores the
core's server-state checkpoint (safetensors + JSON, nothing unpickled), which FS calls through
``save_model`` for ``federate.save_to``. There is no aggregator registry in FS: this class ships inside our server,
which swaps it for the stock one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from federatedscope.core.aggregators import Aggregator

from ..core import Federation, GlobalUpdate, RoundResult

__all__ = ["FlexLoRAAggregator"]

logger = logging.getLogger(f"federatedscope.{__name__}")  # under FS's logger: its handlers and level apply


class FlexLoRAAggregator(Aggregator):
    """FS's aggregator slot, filled by the core's round protocol (:class:`~flexlora_plugin.core.federation.Federation`).

    Reference: Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous
    Tasks and Client Resources", NeurIPS 2024 (arXiv:2402.11505). The math and every policy
    (exclusions, state checks) live in :mod:`flexlora_plugin.core`; see ``docs/api.md``.

    Parameters
    ----------
    federation : Federation
        The server side of this federation (rank maps assigned).
    """

    def __init__(self, federation: Federation) -> None:
        super().__init__()
        self.federation = federation

    @property
    def update(self) -> GlobalUpdate:
        """What clients are sent now: the global update, or the round-1 start before any round."""
        return self.federation.current

    def aggregate(self, agg_info: Mapping[str, Any]) -> RoundResult:
        """Aggregate one round (``agg_info``: ``replies`` {client id: Reply}, ``failed``, ``round``, ``bytes_sent``).

        A client with a bad weight, a wrong rank or shape, or NaN/Inf is left out with its reason
        (``RoundResult.excluded``); with no usable client the previous global update is kept.
        """
        return self.federation.aggregate(
            agg_info["replies"],
            failed=agg_info.get("failed"),
            round=agg_info.get("round"),
            bytes_sent=int(agg_info.get("bytes_sent", 0)),
        )

    def save_model(self, path: str, cur_round: int = -1) -> None:
        """FS hook for ``federate.save_to``: write the core server state (round = FS ``state``)."""
        cfg = self.federation.config
        self.federation.save(path, round=int(cur_round), extra={"profile": cfg.profile})
        logger.info("FlexLoRA server state (round %d, method %s) saved to %s", cur_round, cfg.method, path)

    def load_model(self, path: str) -> int:
        """Restore the global update from a core server state; return its round.

        Raises
        ------
        FlexLoRAError
            Not a server state, an empty one, or one written by another method or seed (the
            core's checks, the same in every host).
        """
        return self.federation.restore(path)
