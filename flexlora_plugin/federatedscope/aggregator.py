"""The FS aggregator of :class:`~flexlora_plugin.federatedscope.worker.FlexLoRAServer`.

A thin :class:`federatedscope.core.aggregators.Aggregator` around the core's
:func:`~flexlora_plugin.core.aggregate`: it holds the current
:class:`~flexlora_plugin.core.GlobalUpdate` and saves / restores it with the core's server-state
checkpoint (safetensors + JSON, nothing unpickled), which FS calls through ``save_model`` for
``federate.save_to``. There is no aggregator registry in FS: this class ships inside our server,
which swaps it for the stock one.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from typing import Any

from federatedscope.core.aggregators import Aggregator
from torch import Tensor

from ..core import FlexLoRAConfig, FlexLoRAError, GlobalUpdate, aggregate, load_server_state, save_server_state

__all__ = ["FlexLoRAAggregator"]

logger = logging.getLogger(f"federatedscope.{__name__}")  # under FS's logger: its handlers and level apply


class FlexLoRAAggregator(Aggregator):
    """Heterogeneous-rank LoRA aggregation (FlexLoRA, or the HetLoRA baseline) for FS.

    Reference: Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous
    Tasks and Client Resources", NeurIPS 2024 (arXiv:2402.11505). The math lives in
    :mod:`flexlora_plugin.core`; see ``docs/api.md``.

    Parameters
    ----------
    settings : FlexLoRAConfig
        The core settings (``aggregate_kwargs()``).
    max_rank : int
        The largest rank any client is assigned (FlexLoRA's dense-path triplet count;
        HetLoRA's padded rank unless ``settings.hetlora_max_rank`` is set).
    initial : GlobalUpdate
        What round 0 broadcasts.
    """

    def __init__(self, settings: FlexLoRAConfig, *, max_rank: int, initial: GlobalUpdate) -> None:
        super().__init__()
        self.settings = settings
        self.max_rank = max_rank
        self.update = initial

    def aggregate(self, agg_info: Mapping[str, Any]) -> GlobalUpdate:
        """Aggregate one round and keep the result as the current global update.

        Parameters
        ----------
        agg_info : Mapping
            ``states`` {client id: adapter state dict}, ``weights`` {client id: sample count},
            ``expected_ranks`` {client id: assigned rank map}.

        Returns
        -------
        GlobalUpdate
            Clients with a wrong rank, shape or NaN/Inf are in ``.excluded`` (not raised).

        Raises
        ------
        NonFiniteUpdateError
            When every client was excluded (the previous update is kept).
        """
        states: Mapping[Hashable, Mapping[str, Tensor]] = agg_info["states"]
        kwargs = self.settings.aggregate_kwargs(client_max_rank=self.max_rank)
        self.update = aggregate(
            states, agg_info["weights"], expected_ranks=agg_info["expected_ranks"], on_invalid="exclude", **kwargs
        )
        return self.update

    def save_model(self, path: str, cur_round: int = -1) -> None:
        """FS hook for ``federate.save_to``: write the core server state (round = FS ``state``)."""
        save_server_state(
            path, self.update, round=int(cur_round), seed=self.settings.seed, max_rank=self.max_rank,
            extra={"method": self.settings.method, "profile": self.settings.profile},
        )  # fmt: skip
        logger.info("FlexLoRA server state (round %d, method %s) saved to %s", cur_round, self.settings.method, path)

    def load_model(self, path: str) -> int:
        """Restore the global update from a core server state; return its round.

        Raises
        ------
        FlexLoRAError
            Not a server state, an empty one, or one written by another method.
        """
        state = load_server_state(path)
        if state.update is None:
            raise FlexLoRAError(f"{path} holds no global update (saved before the first aggregation)")
        if state.update.method != self.settings.method:
            raise FlexLoRAError(f"{path} was written by method {state.update.method!r}, this run uses {self.settings.method!r}")
        if state.seed != self.settings.seed:
            logger.warning(
                "server state %s was written with flexlora.seed=%d, this run uses %d", path, state.seed, self.settings.seed
            )
        self.update = state.update
        return state.round
