"""``FlexLoRA``: a Flower (Message API) strategy for heterogeneous-rank federated LoRA.

The strategy only translates: every number comes from :mod:`flexlora_plugin.core`
(:func:`~flexlora_plugin.core.aggregate`, :meth:`GlobalUpdate.project`, ``energy_kept``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from safetensors.torch import save_file
from torch import Tensor

from ..core import (
    FlexLoRAConfig,
    FlexLoRAError,
    FlexLoRAWarning,
    GlobalUpdate,
    aggregate,
    initial_update,
    load_server_state,
    module_infos,
    rank_label,
    sample_ranks,
    save_server_state,
    state_nbytes,
)
from .records import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    QUERY_RANK,
    RANK_INFO,
    RANK_MAP,
    SERVER_ROUND,
    TRAIN_LOSS,
    read_pool_info,
    read_rank_info,
    record_to_state,
    state_to_record,
)

__all__ = ["FlexLoRA", "rank_label", "sample_partitions"]

logger = logging.getLogger(__name__)


def sample_partitions(partition_ids: Iterable[int], k: int, *, seed: int, server_round: int) -> list[int]:
    """The ``k`` partitions trained in ``server_round``: a pure function of (seed, round, ids).

    Every method (flexlora, hetlora, fedavg) run with the same seed therefore trains the same
    clients in the same rounds. Returns them sorted.
    """
    ids = sorted(set(partition_ids))
    if not 1 <= k <= len(ids):
        raise ValueError(f"cannot sample {k} of {len(ids)} partitions")
    return sorted(random.Random(f"{seed}:{server_round}").sample(ids, k))


def _last_line(text: str | None, limit: int = 300) -> str:
    """The last non-empty line of a (traceback-like) error reason, at most ``limit`` characters."""
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return (lines[-1] if lines else "")[-limit:]


class FlexLoRA(FedAvg):
    """FlexLoRA on Flower's Message API: heterogeneous-rank LoRA aggregated by truncated SVD.

    Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
    Client Resources", NeurIPS 2024, arXiv:2402.11505. Clients train LoRA adapters of different
    ranks. Each round the server forms, per module, ΔW = Σ_k p_k·s_k·B_k·A_k and sends every node
    factors at its own rank.

    Parameters
    ----------
    config : FlexLoRAConfig, optional
        Core settings (method, profile, seed, lora_alpha...). Pass either this or its fields as
        keyword arguments. (default: ``FlexLoRAConfig(**config_fields)``)
    clients_per_round : int, optional
        Partitions trained per round (default: ``fraction_train`` of the queried nodes, at least 1).
    fraction_train : float
        Used when ``clients_per_round`` is None. (default: 1.0)
    seed : int, optional
        Seed of the client sampling. (default: ``config.seed``)
    expected_nodes : int, optional
        Nodes the rank query waits for. (default: the nodes connected when the query starts)
    query_timeout : float
        Seconds to wait for ``expected_nodes`` to connect and answer. (default: 120.0)
    state_path : path, optional
        Server state written after every round with ``save_server_state``. (default: None)
    resume : bool
        Restore ``state_path`` when it exists and continue after its round. (default: False)
    dump_dir : path, optional
        For tests: per round, the factors sent to and received from every partition as
        safetensors (``round-NNN/sent-pK.safetensors``, ``reply-pK.safetensors``). (default: None)
    **config_fields
        ``FlexLoRAConfig`` fields when ``config`` is None.

    Notes
    -----
    Protocol (keys in :mod:`flexlora_plugin.flower.records`):

    1. before round 1, a ``query.rank`` message asks every node its partition id and rank map;
    2. ``configure_train`` samples partitions (:func:`sample_partitions`) and sends each node one
       message with ``update.project(rank_map, lora_alpha=α)``: ``B = U_r S_r / s``, ``A = V_rᵀ``,
       so that ``s·B·A`` is the best rank-``r`` approximation of ΔW. Round 1 sends the core's
       :func:`~flexlora_plugin.core.initial_update` for the run seed, the same for every method:
       ``B = 0`` and the first ``r`` rows of one common ``A`` per module (:attr:`initial`);
    3. ``aggregate_train`` logs failed replies at WARNING and calls ``aggregate(...,
       on_invalid="exclude")``: a malformed (wrong rank, bad keys) or non-finite reply is left out
       of the round, not fatal. ``p_k`` is the reply's ``num-examples``.

    ``fedavg`` and ``hetlora`` (``config.method``) run the same code. Aggregation runs in the
    config's ``compute_dtype`` (float32 by default); factors are sent in the adapters' dtype.
    The global update lives in :attr:`global_update`; the ArrayRecord returned to ``start()``
    is empty. Federated evaluation is off (``configure_evaluate`` returns no message).
    """

    def __init__(
        self,
        config: FlexLoRAConfig | None = None,
        *,
        clients_per_round: int | None = None,
        fraction_train: float = 1.0,
        seed: int | None = None,
        expected_nodes: int | None = None,
        query_timeout: float = 120.0,
        state_path: str | os.PathLike[str] | None = None,
        resume: bool = False,
        dump_dir: str | os.PathLike[str] | None = None,
        **config_fields: Any,
    ) -> None:
        if config is not None and config_fields:
            raise ValueError(f"pass a FlexLoRAConfig or its fields, not both (got fields {sorted(config_fields)})")
        if clients_per_round is not None and clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train}")
        super().__init__(fraction_train=fraction_train, fraction_evaluate=0.0, min_available_nodes=expected_nodes or 1)
        self.config = config if config is not None else FlexLoRAConfig(**config_fields)
        self.clients_per_round = clients_per_round
        self.seed = self.config.seed if seed is None else int(seed)
        self.expected_nodes = expected_nodes
        self.query_timeout = float(query_timeout)
        self.state_path = Path(state_path) if state_path is not None else None
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.global_update: GlobalUpdate | None = None
        self.round_offset = 0
        self.history: list[dict[str, Any]] = []
        self.rank_maps: dict[int, dict[str, int]] = {}  # partition id -> rank map
        self.shapes: dict[str, tuple[int, int]] = {}  # base-model module -> (d_out, d_in), from the rank query
        self._initial: GlobalUpdate | None = None
        self.node_of: dict[int, int] = {}  # partition id -> node id of a node serving one partition
        self.pool_nodes: list[int] = []  # nodes serving any partition (node config partition-id=any)
        self._pool_size = 0  # partitions 0.._pool_size-1 not claimed by a single-partition node go to the pool
        self._in_flight: list[tuple[Message, int]] = []  # (train message, partition id) of the round in flight
        self._sent_bytes = 0  # of the round in flight
        self._clock: tuple[float, int] | None = None  # (start time, last round) of this start() call, for the ETA
        if resume and self.state_path is not None and self.state_path.exists():
            self._restore(self.state_path)

    # ------------------------------------------------------------------ state
    def _restore(self, path: Path) -> None:
        state = load_server_state(path)
        if state.update is not None and state.update.method != self.config.method:
            raise ValueError(f"{path} holds a {state.update.method!r} update, this run uses {self.config.method!r}")
        if state.seed != self.seed:
            raise ValueError(f"{path} was written with seed {state.seed}, this run uses seed {self.seed}")
        self.global_update, self.round_offset = state.update, state.round
        self.history = list(state.extra.get("history", []))
        logger.info("resumed from %s after round %d", path, state.round)

    @property
    def max_rank(self) -> int:
        """The largest rank of any module of any queried node."""
        return max(max(m.values()) for m in self.rank_maps.values())

    def summary(self) -> None:
        """Log this strategy's settings (Flower's ``Strategy.start`` calls it first)."""
        start = f"resumed after round {self.round_offset}" if self.round_offset else "fresh start"
        logger.info(
            "FlexLoRA strategy: method=%s, profile=%s, %d nodes, %s clients/round, seed=%d, lora_alpha=%g, %s",
            self.config.method, "rank table" if self.config.rank_table is not None else self.config.profile,
            len(self.rank_maps), self.clients_per_round or f"{self.fraction_train:.0%} of the", self.seed,
            self.config.lora_alpha, start,
        )  # fmt: skip

    # ------------------------------------------------------------------ rank query
    def query_nodes(
        self, grid: Grid, expected_nodes: int | None = None, timeout: float | None = None
    ) -> dict[int, dict[str, int]]:
        """Ask every node its partition id and rank map (``query.rank``); wait with a deadline.

        Returns
        -------
        dict[int, dict[str, int]]
            Partition id -> rank map; also kept in :attr:`rank_maps` (node ids in :attr:`node_of`).

        Raises
        ------
        TimeoutError
            When fewer than ``expected_nodes`` nodes connect or answer in time; the message lists
            who answered and the errors received.
        """
        expected = expected_nodes or self.expected_nodes
        deadline = time.monotonic() + (self.query_timeout if timeout is None else timeout)
        node_ids = sorted(grid.get_node_ids())
        while expected is not None and len(node_ids) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(node_ids)} of {expected} nodes connected: {node_ids}")
            time.sleep(0.5)
            node_ids = sorted(grid.get_node_ids())
        messages = [
            Message(RecordDict({CONFIG: ConfigRecord()}), dst_node_id=nid, message_type=f"{MessageType.QUERY}.{QUERY_RANK}")
            for nid in node_ids
        ]
        replies = list(grid.send_and_receive(messages, timeout=max(1.0, deadline - time.monotonic())))
        answered, errors = self._read_rank_replies(replies)
        self._expand_pool()
        want = expected if expected is not None else len(node_ids)
        if len(answered) < want:
            raise TimeoutError(
                f"rank query: {len(answered)} of {want} nodes answered "
                f"(node -> partition {answered}); errors: {errors or 'none'}; no reply from "
                f"{sorted(set(node_ids) - set(answered) - set(errors))}"
            )
        logger.info(
            "rank query: %d nodes (%d serving any partition), ranks %s", len(answered), len(self.pool_nodes),
            {p: rank_label(m) for p, m in sorted(self.rank_maps.items())},
        )  # fmt: skip
        return dict(self.rank_maps)

    def _expand_pool(self) -> None:
        """Give every partition ``< num-partitions`` that no single-partition node claims to the pool.

        Their rank maps come from the core's ``sample_ranks(profile, partition, seed)`` on the
        nodes' module shapes: the draw a single-partition node makes for itself.
        """
        if not self.pool_nodes:
            return
        sampler = self.config.sampler()
        for pid in range(self._pool_size):
            if pid not in self.node_of:
                self.rank_maps[pid] = sample_ranks(sampler, pid, self.seed, shapes=self.shapes)

    def _read_rank_replies(self, replies: list[Message]) -> tuple[dict[int, int], dict[int, str]]:
        answered: dict[int, int] = {}
        errors: dict[int, str] = {}
        for reply in replies:
            nid = reply.metadata.src_node_id
            if reply.has_error():
                errors[nid] = _last_line(reply.error.reason)
                logger.warning("rank query: node %d replied with an error: %s", nid, errors[nid])
                continue
            try:
                record = reply.content.config_records[RANK_INFO]
                pool = read_pool_info(record)
                pid, ranks, shapes = (-1, {}, pool[1]) if pool is not None else read_rank_info(record)
            except (KeyError, ValueError) as err:
                errors[nid] = f"malformed rank info: {err}"
                logger.warning("rank query: node %d sent malformed rank info: %s", nid, err)
                continue
            if pid in self.node_of and self.node_of[pid] != nid:
                raise ValueError(f"rank query: nodes {self.node_of[pid]} and {nid} both claim partition {pid}")
            if self.shapes and shapes != self.shapes:
                diff = sorted(set(shapes.items()) ^ set(self.shapes.items()))[:3]
                raise ValueError(
                    f"rank query: node {nid} (partition {pid}) has other module shapes than the nodes before it: {diff}"
                )
            self.shapes = shapes
            answered[nid] = pid
            if pool is not None:
                self.pool_nodes.append(nid)
                self._pool_size = max(self._pool_size, pool[0])
                continue
            self.node_of[pid], self.rank_maps[pid] = nid, ranks
        return answered, errors

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3, **kwargs: Any) -> Result:
        """Run the rank query (unless done) and then ``num_rounds`` rounds of :meth:`Strategy.start`.

        After a resume, ``num_rounds`` counts the rounds still to run; round numbers in messages,
        logs, dumps and the state file continue from the restored round.
        """
        if not self.rank_maps:
            self.query_nodes(grid)
        self._clock = (time.perf_counter(), self.round_offset + num_rounds)
        return super().start(grid, initial_arrays if initial_arrays is not None else ArrayRecord(), num_rounds, **kwargs)

    # ------------------------------------------------------------------ train
    def sampled_partitions(self, server_round: int) -> list[int]:
        """Partitions trained in (global) round ``server_round``."""
        n = len(self.rank_maps)
        k = self.clients_per_round or max(1, int(n * self.fraction_train))
        return sample_partitions(self.rank_maps, min(k, n), seed=self.seed, server_round=server_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One message per sampled node, carrying that node's own factors; ``config`` is copied, never mutated."""
        rnd = server_round + self.round_offset
        messages, sent_bytes, pids = [], 0, []
        pooled = 0
        for pid in self.sampled_partitions(rnd):
            if pid in self.node_of:
                node = self.node_of[pid]
            else:  # round-robin over the pool nodes, in sampled order
                node, pooled = self.pool_nodes[pooled % len(self.pool_nodes)], pooled + 1
            pids.append(pid)
            state = self._factors_for(pid)
            sent_bytes += state_nbytes(state)
            record, dtype_note = state_to_record(state)
            node_config = ConfigRecord(dict(config))
            node_config.update({**dtype_note, SERVER_ROUND: rnd, PARTITION_ID: pid, RANK_MAP: json.dumps(self.rank_maps[pid])})
            messages.append(
                Message(
                    RecordDict({ARRAYS: record, CONFIG: node_config}),
                    dst_node_id=node,
                    message_type=MessageType.TRAIN,
                )
            )
            self._dump(rnd, f"sent-p{pid}", state, {"node-id": str(node), RANK_MAP: json.dumps(self.rank_maps[pid])})
        self._sent_bytes = sent_bytes
        self._in_flight = list(zip(messages, pids, strict=True))  # message ids are set when the grid sends them
        logger.info("round %d: sending to partitions %s (%.3f MB)", rnd, pids, sent_bytes / 1e6)
        return messages

    @property
    def initial(self) -> GlobalUpdate:
        """The round-1 adapter (core :func:`initial_update` for the queried shapes, rank maps and seed)."""
        if self._initial is None:
            if not self.shapes:
                raise RuntimeError("the round-1 adapter needs the nodes' module shapes: run query_nodes() first")
            self._initial = initial_update(module_infos(self.shapes), self.rank_maps.values(), seed=self.seed)
        return self._initial

    def _factors_for(self, pid: int) -> dict[str, Tensor]:
        cfg = self.config
        update = self.global_update if self.global_update is not None else self.initial
        return update.project(self.rank_maps[pid], lora_alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora)

    def _pid_of(self, reply: Message) -> int | None:
        """The partition a train reply answers: by the message it replies to, else by its node."""
        sent = {m.metadata.message_id: pid for m, pid in self._in_flight}
        pid = sent.get(reply.metadata.reply_to_message_id)
        if pid is not None:
            return pid
        nid = reply.metadata.src_node_id
        return next((p for p, n in self.node_of.items() if n == nid), None)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate good replies with the core; failed, malformed or non-finite ones are excluded."""
        rnd = server_round + self.round_offset
        states, weights, losses, excluded = self._read_train_replies(rnd, list(replies))
        update = None
        if states:
            kwargs = self.config.aggregate_kwargs(client_max_rank=self.max_rank)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FlexLoRAWarning)  # exclusions are logged below
                    update = aggregate(
                        states, weights, expected_ranks={p: self.rank_maps[p] for p in states}, on_invalid="exclude", **kwargs
                    )
            except FlexLoRAError as err:  # every reply excluded (NonFiniteUpdateError) or unusable
                logger.error("round %d: no usable reply, the global update is unchanged: %s", rnd, err)
                excluded.update({p: "aggregation failed: " + str(err) for p in states if p not in excluded})
        if update is not None:
            excluded.update({int(p): reason for p, reason in update.excluded.items()})  # type: ignore[call-overload]
            self.global_update = update
        for pid, reason in sorted(excluded.items()):
            logger.warning("round %d: partition %d (node %s) excluded: %s", rnd, pid, self.node_of.get(pid), reason)
        metrics = self._round_metrics(rnd, states, weights, losses, excluded)
        if self.state_path is not None and self.global_update is not None:
            extra = {"history": self.history}
            save_server_state(self.state_path, self.global_update, round=rnd, seed=self.seed, max_rank=self.max_rank, extra=extra)
        return ArrayRecord(), MetricRecord(metrics)

    def _read_train_replies(
        self, rnd: int, replies: list[Message]
    ) -> tuple[dict[int, dict[str, Tensor]], dict[int, float], dict[int, float], dict[int, str]]:
        states: dict[int, dict[str, Tensor]] = {}
        weights: dict[int, float] = {}
        losses: dict[int, float] = {}
        excluded: dict[int, str] = {}
        for reply in replies:
            nid = reply.metadata.src_node_id
            pid = self._pid_of(reply)
            if pid is None:
                logger.warning("round %d: reply from unknown node %d ignored", rnd, nid)
                continue
            if reply.has_error():
                excluded[pid] = f"error reply (code {reply.error.code}): {_last_line(reply.error.reason)}"
                continue
            try:
                content = reply.content
                state = record_to_state(content.array_records[ARRAYS], content.config_records.get(CONFIG))
                metrics = content.metric_records[METRICS]
                weight, loss = float(metrics[NUM_EXAMPLES]), float(metrics.get(TRAIN_LOSS, math.nan))
            except (KeyError, TypeError, ValueError) as err:
                excluded[pid] = f"malformed reply: {err!r}"
                continue
            if not (math.isfinite(weight) and weight > 0):
                excluded[pid] = f"num-examples must be positive, got {weight}"
                continue
            states[pid], weights[pid], losses[pid] = state, weight, loss
            self._dump(rnd, f"reply-p{pid}", state, {NUM_EXAMPLES: str(weight), TRAIN_LOSS: str(loss)})
        return states, weights, losses, excluded

    def _round_metrics(
        self, rnd: int, states: Mapping[int, Mapping[str, Tensor]], weights: Mapping[int, float],
        losses: Mapping[int, float], excluded: Mapping[int, str],
    ) -> dict[str, Any]:  # fmt: skip
        kept = [p for p in states if p not in excluded]
        total = sum(weights[p] for p in kept)
        finite = [p for p in kept if math.isfinite(losses[p])]
        loss = sum(weights[p] * losses[p] for p in finite) / sum(weights[p] for p in finite) if finite else math.nan
        metrics: dict[str, Any] = {
            "round": rnd,
            "clients": len(states) + len([p for p in excluded if p not in states]),
            "clients-ok": len(kept),
            "clients-excluded": len(excluded),
            "excluded-partitions": sorted(excluded),
            TRAIN_LOSS: loss,
            NUM_EXAMPLES: total,
            "bytes-sent": self._sent_bytes,
            "bytes-received": sum(state_nbytes(s) for s in states.values()),
        }
        energy = self._energy_by_rank() if self.global_update is not None else {}
        metrics.update({f"energy-{label}": value for label, value in energy.items()})
        start, last = self._clock if self._clock is not None else (time.perf_counter(), rnd)
        elapsed, done = time.perf_counter() - start, rnd - self.round_offset
        eta = elapsed / max(done, 1) * max(last - rnd, 0)  # mean round so far (evaluation included) x rounds left
        resumed = f" (resumed after {self.round_offset})" if self.round_offset else ""
        logger.info(
            "round %d/%d%s: %d/%d clients ok, train loss %.4f, sent %.3f MB, received %.3f MB, energy kept %s, excluded %s; "
            "%.0f s elapsed, ETA %.0f s",
            rnd, last, resumed, len(kept), metrics["clients"], loss, metrics["bytes-sent"] / 1e6, metrics["bytes-received"] / 1e6,
            {k: round(v, 4) for k, v in energy.items()}, sorted(excluded), elapsed, eta,
        )  # fmt: skip
        self.history.append({**metrics, "excluded-reasons": {str(p): r for p, r in excluded.items()}})
        return metrics

    def _energy_by_rank(self) -> dict[str, float]:
        """Mean over modules of the share of ‖ΔW‖² kept by each distinct rank map among the nodes."""
        update = self.global_update
        out: dict[str, float] = {}
        for ranks in self.rank_maps.values():
            label = rank_label(ranks)
            if label not in out and update is not None:
                kept = update.energy_kept(ranks)
                out[label] = sum(kept.values()) / len(kept)
        return dict(sorted(out.items()))

    # ------------------------------------------------------------------ evaluate (off)
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """No federated evaluation: evaluate the exported adapter instead."""
        return []

    # ------------------------------------------------------------------ test dumps
    def _dump(self, rnd: int, name: str, state: Mapping[str, Tensor], meta: Mapping[Hashable, str]) -> None:
        if self.dump_dir is None:
            return
        folder = self.dump_dir / f"round-{rnd:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
        save_file(tensors, str(folder / f"{name}.safetensors"), metadata={str(k): str(v) for k, v in meta.items()})
