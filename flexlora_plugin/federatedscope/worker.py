"""``federate.method: flexlora`` (or any method of ``config.METHODS``): FS server and client with one rank per client.

FS's stock server sends one message with one state dict to every receiver; a FlexLoRA client of
rank ``r_k`` needs its own factors. :class:`FlexLoRAServer` therefore

* draws each client's rank map with the core's ``sample_ranks`` on the model's real module
  shapes (a pure function of ``(flexlora.seed, client id)``, so clients draw the same one);
* aggregates the received factors with the core (:class:`FlexLoRAAggregator`), checking every
  client's rank against its assignment (``expected_ranks``, ``on_invalid="exclude"``: a client
  with a wrong shape, a wrong rank or NaN/Inf is left out of the round, not fatal);
* sends one message per client (``receiver=[cid]``) holding the projection at that client's ranks,
  for training, evaluation and the final ``finish``;
* logs per round the bytes received and sent per client and the share of ‖ΔW‖² each client's
  ranks keep;
* saves the core server state through ``federate.save_to``, resumes from
  ``flexlora.restore_from``, and optionally exports the final update as a peft adapter;
* in distributed mode sends and accepts factors only as safetensors strings
  (:mod:`~flexlora_plugin.federatedscope.wire`): a reply in FS's base64-pickle encoding is
  refused with a reason, never unpickled.

:class:`FlexLoRAClient` builds its LoRA at its ranks (through
:class:`~flexlora_plugin.federatedscope.trainer.FlexLoRATrainer`) once its id is known (at
construction standalone, on ``assign_client_id`` distributed) and uses trainable-only FedProx.

Client weights: FS reports ``sample_size``, the samples trained this round. A client reporting 0
trained nothing (its factors are the projection it received) and is left out of that round with
a warning; if no client is left, the previous global update is kept, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from federatedscope.core.message import Message
from federatedscope.core.workers import Client, Server
from torch import Tensor

from ..core import (
    BaseWeights,
    Federation,
    FlexLoRAError,
    Reply,
    module_infos_of,
    rank_label,
    sample_ranks,
    split_state,
    state_nbytes,
)
from .aggregator import FlexLoRAAggregator
from .config import PluginSettings, check_resume, flush_notes, run_record, settings_from_cfg
from .trainer import FlexLoRATrainer, current_ranks
from .wire import PayloadError, decode_state, encode_state, encoded_nbytes

__all__ = ["FlexLoRAClient", "FlexLoRAServer", "assigned_ranks", "module_shapes", "rank_summary"]

logger = logging.getLogger(f"federatedscope.{__name__}")  # under FS's logger: its handlers and level apply


def _kib(nbytes: int) -> str:
    return f"{nbytes / 1024:.1f} KiB"


def rank_summary(ranks: Mapping[str, int]) -> str:
    """``q_proj=8 v_proj=8``: the core's :func:`rank_label` per module suffix (``lo-hi`` if ranks vary)."""
    return rank_label(ranks, by_module=True)


def module_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """Module name (FS key format) -> ``(d_out, d_in)`` of every LoRA-adapted module of ``model``."""
    return {m: f.shape for m, f in split_state(model.state_dict(), client="local").items()}


def assigned_ranks(settings: PluginSettings, client_id: int, shapes: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """The rank map of FS client ``client_id`` (core ``sample_ranks`` with the config's sampler, resolved on ``shapes``).

    The server's :meth:`Federation.draw_ranks` makes the same draw.
    """
    return sample_ranks(settings.core.sampler(), client_id, settings.core.seed, shapes=shapes)


class FlexLoRAServer(Server):
    """FS server for heterogeneous-rank LoRA, every method of ``config.METHODS`` (``federate.method``)."""

    def __init__(
        self,
        ID: int = -1,
        state: int = 0,
        config: Any = None,
        data: Any = None,
        model: Any = None,
        client_num: int = 5,
        total_round_num: int = 10,
        device: str = "cpu",
        strategy: Any = None,
        unseen_clients_id: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            ID, state, config, data, model, client_num, total_round_num, device, strategy, unseen_clients_id, **kwargs
        )
        if config is None:  # FS builds unconfigured workers to list message handlers
            return
        flush_notes()  # what the config checks said before FS's logger existed
        self.flex = settings_from_cfg(self._cfg)
        self._server_ranks = current_ranks(self.models[0])
        self._base_weights = BaseWeights()  # the server model's W_0, for a cumulative method (flora)
        # the round protocol (core): every client's ranks, round 1's common start, aggregation, state
        self.federation = Federation(
            self.flex.core, module_infos_of(self.models[0].state_dict()), record=run_record(self._cfg)
        )  # the run's settings and package versions go into every server state it saves
        for cid in range(1, self._cfg.federate.client_num + 1):
            self.federation.draw_ranks(cid)
        self.aggregator = FlexLoRAAggregator(self.federation)
        self.aggregators = [self.aggregator]
        self._exported = False
        if self.flex.restore_from:
            check_resume(self._cfg)  # the experiment the state recorded, unless flexlora.resume_override says otherwise
            self.state = self.aggregator.load_model(self.flex.restore_from)
            if self.state >= self.total_round_num:
                raise ValueError(
                    f"flexlora.restore_from {self.flex.restore_from} is at round {self.state}; "
                    "raise federate.total_round_num above it (and name it in flexlora.resume_override)"
                )
            logger.info("FlexLoRA: resumed from %s at round %d", self.flex.restore_from, self.state)
        logger.info(
            "FlexLoRA server: method %s, %d modules, max client rank %d",
            self.flex.core.method,
            len(self.federation.shapes),
            self.federation.max_rank,
        )

    def rank_map(self, client_id: int) -> dict[str, int]:
        """The rank map assigned to ``client_id`` (drawn by the core on first use)."""
        return self.federation.draw_ranks(client_id)

    # -- outgoing ------------------------------------------------------------------------------
    def payload(self, client_id: int) -> dict[str, Tensor]:
        """Return this client's factors: the global update projected at its ranks (a private copy)."""
        self.rank_map(client_id)
        return self.federation.factors_for(client_id)

    def _send_per_client(self, msg_type: str, receivers: Sequence[int], state: int) -> None:
        for cid in receivers:
            factors = self.payload(cid)
            content = encode_state(factors) if self._cfg.federate.mode == "distributed" else factors
            self._check_message_size(cid, content)
            if msg_type == "model_para":
                energy = self.federation.energy_kept(cid)
                logger.info(
                    "FlexLoRA round %d -> client %d: ranks %s, sent %s, energy kept mean %.4f (min %.4f over %d modules)",
                    state,
                    cid,
                    rank_summary(self.rank_map(cid)),
                    _kib(state_nbytes(factors)),
                    sum(energy.values()) / len(energy),
                    min(energy.values()),
                    len(energy),
                )
            self.comm_manager.send(
                Message(
                    msg_type=msg_type, sender=self.ID, receiver=[cid], state=state, timestamp=self.cur_timestamp, content=content
                )
            )

    def _check_message_size(self, cid: int, content: Any) -> None:
        """Refuse, in one line, a distributed payload above gRPC's message limit (e.g. flora's running total)."""
        size = encoded_nbytes(content)  # 0 in standalone mode: nothing goes through gRPC
        if size == 0:
            return
        limit = int(self._cfg.distribute.grpc_max_send_message_length)
        if size > limit:
            raise FlexLoRAError(
                f"the message to client {cid} is {size / 2**20:.1f} MiB, above distribute.grpc_max_send_message_length "
                f"= {limit / 2**20:.1f} MiB: raise distribute.grpc_max_send_message_length and "
                "distribute.grpc_max_receive_message_length (server and clients)"
            )

    def broadcast_model_para(
        self, msg_type: str = "model_para", sample_client_num: int = -1, filter_unseen_clients: bool = True
    ) -> None:
        """One message per receiver with its own projection (FS sends one payload to all)."""
        if filter_unseen_clients:
            self.sampler.change_state(self.unseen_clients_id, "unseen")
        if sample_client_num > 0:
            receivers = self.sampler.sample(size=sample_client_num)
        else:
            receivers = list(self.comm_manager.neighbors.keys())
            if msg_type == "model_para":
                self.sampler.change_state(receivers, "working")
        rnd = self.state - 1 if msg_type == "evaluate" else self.state
        self._send_per_client(msg_type, receivers, min(rnd, self.total_round_num))
        if filter_unseen_clients:
            self.sampler.change_state(self.unseen_clients_id, "seen")

    def terminate(self, msg_type: str = "finish") -> None:
        """Send every client its final projection and export the adapter if asked."""
        self.is_finish = True
        self._monitor.finish_fl()
        self._send_per_client(msg_type, list(self.comm_manager.neighbors.keys()), self.state)
        if self.flex.save_adapter and not self._exported and self.federation.global_update is not None:
            ranks = self.federation.export(self.flex.save_adapter, base_model_name_or_path=self.flex.base_model)
            self._exported = True
            logger.info("FlexLoRA: global adapter (ranks %s) exported to %s", rank_summary(ranks), self.flex.save_adapter)

    # -- incoming ------------------------------------------------------------------------------
    @staticmethod
    def collect_feedback(buffer: Mapping[int, Any], *, pin: bool = False) -> tuple[dict[int, Reply], dict[int, str]]:
        """Decode ``{client: (sample_size, content)}``; return the replies and the refused clients with the reason.

        Distributed: tuples arrive as lists and the factors as one safetensors string
        (:mod:`~flexlora_plugin.federatedscope.wire`); anything else, FS's base64-pickled tensors
        included, is refused without being unpickled. A ``sample_size`` that is not a positive
        number is left to the core, which excludes it with the reason. ``pin``: in-process
        replies are copied into page-locked memory (:func:`~.wire.decode_state`).
        """
        replies, failed = {}, {}
        for cid, item in buffer.items():
            try:
                sample_size, content = item
                replies[cid] = Reply(decode_state(content, sender=f"client {cid}", pin=pin), sample_size)
            except (PayloadError, TypeError, ValueError) as err:
                failed[cid] = f"reply refused: {err}"
        return replies, failed

    def _perform_federated_aggregation(self) -> int:
        """Aggregate this round's buffer with the core's round protocol; return the number of messages used."""
        buffer = self.msg_buffer["train"][self.state]
        if self.staled_msg_buffer:
            raise RuntimeError("FlexLoRA rounds are synchronous, yet stale messages are buffered (asyn.use is not supported)")
        replies, failed = self.collect_feedback(buffer, pin=self.federation.pin_replies)
        received = ", ".join(
            f"client {cid}: {rank_summary(current_ranks_of(r.state)) or 'malformed'} "
            f"{_kib(state_nbytes(r.state))}{_wire(buffer[cid])}"
            for cid, r in replies.items()
        )
        result = self.aggregator.aggregate({"replies": replies, "failed": failed, "round": self.state + 1})
        if not result.updated:
            logger.warning("FlexLoRA round %d: no usable client update; the previous global update is kept", self.state)
        for cid, why in result.excluded.items():
            logger.warning("FlexLoRA round %d: client %s excluded: %s", self.state, cid, why)
        logger.info(
            "FlexLoRA round %d: aggregated %d/%d clients (%s) | received %s",
            self.state,
            len(result.kept),
            len(buffer),
            self.flex.core.method,
            received,
        )
        if result.updated:
            update = self.federation.global_update
            self.models[0].load_state_dict(
                update.project(  # type: ignore[union-attr]
                    self._server_ranks, lora_alpha=self.flex.core.lora_alpha, use_rslora=self.flex.core.use_rslora
                )
            )  # the server's own model holds the rank-r projection (for make_global_eval)
            if update.cumulative:  # flora: and its base is W_0 + C_t, as every client's
                deltas = {m: update.base_delta(m) for m in update.modules}
                self._base_weights.apply(self.models[0].model, deltas)  # type: ignore[arg-type]
        return len(buffer)


def _wire(content: Any) -> str:
    """`` (wire N KiB)`` when the factors arrived encoded (distributed mode), else ''."""
    encoded = encoded_nbytes(content[1])
    return f" (wire {_kib(encoded)})" if encoded else ""


def current_ranks_of(state: Mapping[str, Tensor]) -> dict[str, int]:
    """Rank per module of a received state dict, parsed by the core's ``split_state``.

    ``{}`` when malformed: this is for logging only, the core's exclusion says why.
    """
    try:
        return {m: f.r for m, f in split_state(state, client="log").items()}
    except FlexLoRAError:
        return {}


class FlexLoRAClient(Client):
    """FS client whose LoRA has the ranks the profile assigns to its id."""

    def __init__(
        self,
        ID: int = -1,
        server_id: int | None = None,
        state: int = -1,
        config: Any = None,
        data: Any = None,
        model: Any = None,
        device: str = "cpu",
        strategy: Any = None,
        is_unseen_client: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(ID, server_id, state, config, data, model, device, strategy, is_unseen_client, *args, **kwargs)
        if config is None:
            return
        flush_notes()
        if not isinstance(self.trainer, FlexLoRATrainer):
            raise TypeError(
                f"federate.method {config.federate.method!r} needs trainer.type 'flexlora_llmtrainer', "
                f"got {type(self.trainer).__name__}"
            )
        self.flex = settings_from_cfg(self._cfg)
        self.ranks: dict[str, int] | None = None
        if self._cfg.fedprox.use:
            self.trainer.use_trainable_prox()
        if self.ID > 0:  # standalone; distributed ids arrive with assign_client_id
            self.assign_ranks()

    def assign_ranks(self) -> None:
        """Draw this client's rank map and rebuild its LoRA at it."""
        self.ranks = assigned_ranks(self.flex, self.ID, module_shapes(self.trainer.ctx.model))
        self.trainer.set_ranks(
            self.ranks,
            lora_alpha=self.flex.core.lora_alpha,
            use_rslora=self.flex.core.use_rslora,
            lora_dropout=self.flex.lora_dropout,
        )
        logger.info("FlexLoRA client %d: LoRA ranks %s", self.ID, rank_summary(self.ranks))

    def callback_funcs_for_assign_id(self, message: Message) -> None:
        super().callback_funcs_for_assign_id(message)
        self.assign_ranks()
