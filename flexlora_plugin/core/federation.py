"""The server side of a federation, host-agnostic: :class:`Federation`.

A host (Flower's strategy, FederatedScope's server) owns the transport: who is sampled, how a
message is encoded, where logs go. Everything else about a round is a policy and lives here, once:

* **rank maps**: drawn from the config's profile (``sample_ranks`` on the model's module shapes;
  an operator's table may use patterns) or reported by a client, which names every module exactly
  (a peer's map is data: never compiled or matched as a pattern), and checked against those shapes
  (every module covered, no unknown module, ``1 <= r <= min(d_out, d_in)``);
* **what a client receives**: round 1 the common start of every method (:func:`initial_update`:
  ``B = 0`` and the first ``r`` rows of one common ``A`` per module), later the global update
  projected at the client's ranks;
* **replies**: a failed reply, a weight that is not a positive finite number up to
  :data:`MAX_EXAMPLES`, a wrong rank or shape, NaN/Inf factors, factors too large for the compute
  dtype: the client is left out of the round with a reason. The federation's modules (shapes,
  dtype, keys) are the reference, never a reply. A round is all-or-nothing: the new update is
  formed and checked (projected at the largest ranks, finite in the dtype clients receive) before
  it replaces the previous one; any failure, one raised by linear algebra included, keeps the
  previous update and reports the round as failed with the reason (:attr:`RoundResult.error`);
* **round metrics**: weighted train loss, examples, bytes both ways, the share of ‖ΔW‖² each
  distinct rank map keeps (by :func:`rank_label`), excluded clients with reasons;
* **server state**: saved atomically after a round, restored with the same checks for every host
  (another method or seed is refused: both change what clients would be sent);
* **export** of the global update as a peft adapter.

Shapes, in the docstrings below: a module's factors are ``A: (r, d_in)``, ``B: (d_out, r)``.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import torch
from torch import Tensor

from .adapters import WIRE_DTYPES, base_delta_state, only_factors, state_nbytes
from .aggregation import aggregate
from .checkpoint import load_server_state, save_server_state
from .client import resolve_device
from .config import FlexLoRAConfig
from .errors import FlexLoRAError, FlexLoRAWarning, RankError
from .methods import GlobalUpdate, method_class
from .profiles import check_rank_map, clamp_ranks, rank_label, sample_ranks
from .start import initial_update
from .validation import ModuleInfo, positive_finite

__all__ = ["MAX_EXAMPLES", "ExportRanks", "Federation", "Reply", "RoundResult"]

ExportRanks = Union[Literal["max", "exact"], int, Mapping[str, int], None]

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 2**53
"""The largest ``num_examples`` a reply may claim (every integer up to it is exact as a float)."""


@dataclass(frozen=True)
class Reply:
    """What a client sent back after a round: its adapter state, its weight, its mean train loss."""

    state: Mapping[str, Tensor]
    num_examples: float
    train_loss: float = math.nan


@dataclass
class RoundResult:
    """One aggregated round, as every host reports it.

    Attributes
    ----------
    round : int
        The round number (1-based, continuing after a resume).
    kept : list
        Clients whose reply went into the global update.
    excluded : dict
        Client -> why it was left out (failed, bad weight, wrong rank or shape, non-finite...).
    updated : bool
        False when no reply was usable: the previous global update is kept.
    dropped : list
        Clients dropped from sampling at this round (``drop_after_failures`` rounds excluded in a row).
    error : str, optional
        Why the round failed while forming the update (the previous update is kept; ``kept`` is
        empty and the replies are listed in ``excluded`` with this reason). None for a round that
        completed, with or without a new update.
    """

    round: int
    kept: list[Hashable]
    excluded: dict[Hashable, str]
    updated: bool
    train_loss: float
    num_examples: float
    bytes_sent: int
    bytes_received: int
    energy: dict[str, float] = field(default_factory=dict)
    dropped: list[Hashable] = field(default_factory=list)
    error: str | None = None

    def row(self) -> dict[str, Any]:
        """A flat history row (the keys of Flower's ``metrics.json`` history)."""
        return {
            "round": self.round,
            "clients": len(self.kept) + len(self.excluded),
            "clients-ok": len(self.kept),
            "clients-excluded": len(self.excluded),
            "excluded-partitions": _sorted(self.excluded),
            "dropped-partitions": _sorted(self.dropped),
            "train-loss": self.train_loss,
            "num-examples": self.num_examples,
            "bytes-sent": self.bytes_sent,
            "bytes-received": self.bytes_received,
            **{f"energy-{label}": value for label, value in self.energy.items()},
            "excluded-reasons": {str(c): r for c, r in self.excluded.items()},
            **({"round-failed": self.error} if self.error is not None else {}),
        }


def _nbytes(state: Any) -> int:
    """Bytes of the tensors in a reply, whatever else a hostile reply holds."""
    if not isinstance(state, Mapping):
        return 0
    return state_nbytes({k: v for k, v in state.items() if isinstance(v, Tensor)})


def _client_id(raw: Any) -> Hashable:
    """A client id read back from JSON: ints and strings as they were, anything else as its string."""
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise ValueError(f"client id {raw!r} is neither an int nor a string")
    return raw


def _last_line(text: str, limit: int = 300) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:limit]


def _info_names(shapes: Mapping[str, tuple[int, int]], info: Mapping[str, ModuleInfo]) -> dict[str, str]:
    """Each rank-map module name (:attr:`Federation.shapes`) -> the module of ``info`` it names (itself, or by suffix)."""
    out = {}
    for name in shapes:
        if name in info:
            out[name] = name
            continue
        hits = [m for m in info if m.endswith("." + name)]
        if len(hits) != 1:
            raise RankError(f"module {name} of the shapes names {len(hits)} modules of the adapter ({hits[:3]}), not one")
        out[name] = hits[0]
    return out


def _sorted(ids: Iterable[Hashable]) -> list[Hashable]:
    try:
        return sorted(ids)  # type: ignore[type-var]
    except TypeError:  # mixed id types
        return sorted(ids, key=str)


class Federation:
    """The server side of one federation: rank maps, what each client gets, rounds, state, export.

    Parameters
    ----------
    config : FlexLoRAConfig
        Method, profile or rank table, seed, lora_alpha...
    info : Mapping[str, ModuleInfo]
        The adapted modules (:func:`~flexlora_plugin.core.module_infos` from base-model shapes,
        or :func:`~flexlora_plugin.core.module_infos_of` from an adapter state); their key
        format is the one clients are sent.
    shapes : Mapping[str, tuple[int, int]], optional
        Module name -> ``(d_out, d_in)`` in the names the host's rank maps use (e.g. Flower's
        base-model names); each must match one module of ``info`` as a suffix. (default: ``info``'s)
    state_path : path, optional
        Where :meth:`aggregate` saves the server state after every round. (default: None)
    record : Mapping, optional
        Host data saved with every state (fields declared with
        :func:`~flexlora_plugin.core.register_state_field`, e.g. ``config``: the run's resolved
        settings, ``versions``).

    Examples
    --------
    >>> fed = Federation(FlexLoRAConfig(profile="uniform"), module_infos(shapes))
    >>> for client in clients: fed.draw_ranks(client)
    >>> send = {c: fed.factors_for(c) for c in sampled}          # round 1: the common start
    >>> result = fed.aggregate({c: Reply(state, n, loss) for ...})  # round 1 done
    """

    def __init__(
        self,
        config: FlexLoRAConfig,
        info: Mapping[str, ModuleInfo],
        *,
        shapes: Mapping[str, tuple[int, int]] | None = None,
        state_path: str | os.PathLike[str] | None = None,
        record: Mapping[str, Any] | None = None,
    ) -> None:
        if not info:
            raise RankError("a federation needs at least one adapted module")
        self.config = config
        self.info = dict(info)
        raw = shapes if shapes is not None else {m: i.shape for m, i in self.info.items()}
        self.shapes = {m: (int(d_out), int(d_in)) for m, (d_out, d_in) in raw.items()}
        if len(self.shapes) != len(self.info):
            raise RankError(f"shapes name {len(self.shapes)} modules, info {len(self.info)}")
        self.state_path = Path(state_path) if state_path is not None else None
        self.record = dict(record or {})
        self.rank_maps: dict[Hashable, dict[str, int]] = {}  # as drawn or reported (what clients are told)
        self._resolved: dict[Hashable, dict[str, int]] = {}  # the same, one rank per module of self.shapes
        self._by_info: dict[Hashable, dict[str, int]] = {}  # the same, keyed by the modules of self.info
        self._info_name = _info_names(self.shapes, self.info)
        self._clamped: dict[tuple[tuple[str, int], ...], dict[str, int]] = {}  # a profile's map -> resolved on the shapes
        self.global_update: GlobalUpdate | None = None
        self.round = 0  # the last completed round
        self.history: list[dict[str, Any]] = []
        self.failures: dict[Hashable, int] = {}  # client -> rounds excluded in a row
        self.dropped: dict[Hashable, int] = {}  # client -> round it was dropped from sampling at
        self._initial: GlobalUpdate | None = None
        self._adapter: tuple[GlobalUpdate, str, tuple[dict[str, Tensor], dict[str, int]]] | None = None
        self._correction: tuple[GlobalUpdate, Any, dict[str, Tensor]] | None = None
        self._sampler = config.sampler()
        device = resolve_device(config.server_device)  # a GPU asked for and missing fails here, not in round 1
        self.server_device = None if device.type == "cpu" else device

    # ------------------------------------------------------------------ rank maps
    def draw_ranks(self, client: Hashable) -> dict[str, int]:
        """The profile's rank map for ``client`` (a pure function of (seed, client)), resolved and clamped on the shapes."""
        if client not in self.rank_maps:
            pattern = sample_ranks(self._sampler, client, self.config.seed)  # the profile's map: one of a few
            key = tuple(sorted(pattern.items()))
            if key not in self._clamped:  # resolved on the shapes once per distinct map, not once per client
                self._clamped[key] = clamp_ranks(pattern, self.shapes, client=client)
            drawn = dict(self._clamped[key])
            self._set(client, drawn, drawn)
        return dict(self.rank_maps[client])

    def assign_ranks(self, client: Hashable, ranks: Mapping[str, int]) -> dict[str, int]:
        """Take the rank map a client reports, after checking it against the module shapes.

        A peer's map is data: it names every module of :attr:`shapes` exactly, once (no suffix,
        no pattern), so checking it is O(entries + modules) whatever it holds.

        Raises
        ------
        RankError
            A module without an entry, an entry that names no module, or a rank outside
            ``1..min(d_out, d_in)``; the message names the client and the module.
        """
        resolved = check_rank_map(ranks, self.shapes, client=client, exact=True)
        self._set(client, resolved, resolved)
        return dict(resolved)

    def _set(self, client: Hashable, ranks: dict[str, int], resolved: dict[str, int]) -> None:
        if self._initial is not None and client not in self.rank_maps:
            self._initial = None  # a new client: the common start is drawn over every rank map known
        self.rank_maps[client] = ranks
        self._resolved[client] = dict(resolved)
        self._by_info[client] = {self._info_name[m]: r for m, r in resolved.items()}

    def _largest_ranks(self) -> dict[str, int]:
        """Per module of :attr:`info`, the largest rank any client with a rank map has."""
        largest: dict[str, int] = {}
        for ranks in self._by_info.values():
            for m, r in ranks.items():
                largest[m] = max(r, largest.get(m, 0))
        return largest

    @property
    def max_rank(self) -> int:
        """The largest rank of any module of any client."""
        if not self.rank_maps:
            raise RankError("no rank map yet: draw_ranks() or assign_ranks() first")
        return max(max(r.values()) for r in self._resolved.values())

    def rank_for(self, client: Hashable) -> dict[str, int]:
        """``client``'s rank per module (the names of :attr:`shapes`), resolved once when its map was set."""
        return dict(self._resolved[client])

    # ------------------------------------------------------------------ incoming
    @property
    def pin_replies(self) -> bool:
        """Whether a host should receive replies into page-locked memory: the server aggregates on CUDA.

        Its staging then copies them to the device by DMA, without a pass through its own pinned
        buffers (docs/performance.md, "GPU server step" and "Decoding replies").
        """
        return self.server_device is not None and self.server_device.type == "cuda"

    # ------------------------------------------------------------------ outgoing
    @property
    def initial(self) -> GlobalUpdate:
        """The round-1 adapter of every method (:func:`initial_update` over every known rank map)."""
        if self._initial is None:
            if not self.rank_maps:
                raise RankError("the round-1 adapter needs the clients' rank maps: draw_ranks() or assign_ranks() first")
            self._initial = initial_update(self.info, self.rank_maps.values(), seed=self.config.seed)
        return self._initial

    @property
    def current(self) -> GlobalUpdate:
        """What clients are sent now: the global update, or the round-1 start before any round."""
        return self.global_update if self.global_update is not None else self.initial

    def factors_for(self, client: Hashable) -> dict[str, Tensor]:
        """``client``'s factors: :attr:`current` projected at its ranks, ``s·B·A`` the best rank-r approximation.

        Returns a private copy (``A: (r, d_in)``, ``B: (d_out, r)`` per module; only ``B`` for a
        method that freezes ``A``) in the config's ``wire_dtype`` (``auto``: the adapters' own),
        safe to hand to a transport; for a cumulative method (``flora``) also the running total
        every client adds to its base (:func:`~flexlora_plugin.core.adapters.base_delta_state`
        keys), one set of tensors shared by every client's message: read-only.
        """
        cfg = self.config
        wire = WIRE_DTYPES[cfg.wire_dtype]
        projected = self.current.project(self._by_info[client], lora_alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora, dtype=wire)
        out = {k: v.clone() for k, v in only_factors(projected, self.trains).items()}  # what the method sends
        out.update(self._base_correction(wire))
        return out

    def _base_correction(self, wire: Any, update: GlobalUpdate | None = None) -> dict[str, Tensor]:
        """A cumulative method's running total, the same for every client: converted once per update and shared.

        The model's size for a dense total, so it is not copied per client (read-only by contract:
        the hosts serialise it, or, in-process, the receiver copies it).
        """
        update = self.current if update is None else update
        if self._correction is None or self._correction[0] is not update or self._correction[1] != wire:
            parts: dict[str, Tensor] = {}
            for module in update.modules:
                delta = update.base_delta(module)
                if delta is not None:
                    parts.update(
                        {k: v.to(device="cpu", dtype=wire or v.dtype) for k, v in base_delta_state(module, delta).items()}
                    )
            self._correction = (update, wire, parts)
        return self._correction[2]

    @property
    def trains(self) -> tuple[str, ...]:
        """The factors clients train, receive and send back (the method's :attr:`GlobalUpdate.trains`)."""
        return method_class(self.config.method).trains

    def energy_kept(self, client: Hashable) -> dict[str, float]:
        """Per module, the share of ‖ΔW‖² that ``client``'s projection keeps (1 before any round)."""
        return self.current.energy_kept(self._by_info[client])

    def energy_by_label(
        self, clients: Iterable[Hashable] | None = None, *, update: GlobalUpdate | None = None
    ) -> dict[str, float]:
        """Mean over modules of the energy kept, per distinct rank map (by :func:`rank_label`)."""
        update = self.current if update is None else update
        out: dict[str, float] = {}
        for client in self.rank_maps if clients is None else clients:
            label = rank_label(self._resolved[client])
            if label not in out:
                kept = update.energy_kept(self._by_info[client])
                out[label] = sum(kept.values()) / len(kept)
        return dict(sorted(out.items()))

    # ------------------------------------------------------------------ incoming
    def aggregate(
        self,
        replies: Mapping[Hashable, Reply],
        *,
        failed: Mapping[Hashable, str] | None = None,
        bytes_sent: int = 0,
        round: int | None = None,
    ) -> RoundResult:
        """Aggregate one round's replies into the global update; never raises for a bad client.

        Parameters
        ----------
        replies : Mapping[client, Reply]
            The replies that arrived and decoded.
        failed : Mapping[client, str], optional
            Clients whose reply failed at the host (error reply, undecodable), with the reason.
        bytes_sent : int
            Bytes of factors the host sent this round (for the metrics).
        round : int, optional
            This round's number. (default: the last completed round + 1)

        Returns
        -------
        RoundResult
            Also appended to :attr:`history` (as :meth:`RoundResult.row`) and, with a
            ``state_path``, saved with the new global update.
        """
        rnd = self.round + 1 if round is None else int(round)
        excluded: dict[Hashable, str] = dict(failed or {})
        usable: dict[Hashable, Reply] = {}
        for client, reply in replies.items():
            if client in excluded:  # the host also reported a failure for it: the failure stands
                continue
            weight = positive_finite(reply.num_examples)
            if client not in self.rank_maps:
                excluded[client] = "no rank map was assigned to this client"
            elif weight is None or weight > MAX_EXAMPLES:
                excluded[client] = f"num-examples must be a positive finite number, at most 2**53, got {reply.num_examples!r:.40}"
            else:
                usable[client] = reply
        update, energy, error = None, {}, None
        if usable:
            try:
                update, energy = self._form(usable, rnd)
            except FlexLoRAError as err:  # every reply excluded, or none usable together
                excluded.update({c: f"no usable reply this round: {err}" for c in usable if c not in excluded})
            except Exception as err:  # linear algebra, memory...: the round fails, the federation goes on
                error = f"{type(err).__name__.lstrip('_')}: {_last_line(str(err))}"
                logger.error("round %d failed while forming the update; the previous update is kept: %s", rnd, error)
                excluded.update({c: f"round failed: {error}" for c in usable if c not in excluded})
        if update is not None:
            excluded.update(update.excluded)
            self.global_update = update
        kept = [c for c in usable if c not in excluded]
        weights = {c: float(usable[c].num_examples) for c in kept}
        finite = [c for c in kept if math.isfinite(usable[c].train_loss)]
        loss = sum(weights[c] * usable[c].train_loss for c in finite) / sum(weights[c] for c in finite) if finite else math.nan
        dropped = self._count_failures(kept, excluded, rnd) if error is None else []  # a failed round is nobody's failure
        result = RoundResult(
            round=rnd,
            kept=kept,
            excluded=excluded,
            updated=update is not None,
            train_loss=loss,
            num_examples=sum(weights.values()),
            bytes_sent=int(bytes_sent),
            bytes_received=sum(_nbytes(r.state) for r in replies.values()),
            energy=energy if update is not None else (self.energy_by_label() if self.global_update is not None else {}),
            dropped=dropped,
            error=error,
        )
        self.round = rnd
        self.history.append(result.row())
        if self.state_path is not None and self.global_update is not None:
            self.save(self.state_path)
        return result

    def _form(self, usable: Mapping[Hashable, Reply], rnd: int) -> tuple[GlobalUpdate, dict[str, float]]:
        """The round's update, complete and checked before anything global changes, and its energy per rank map.

        Complete: projected at every module's largest client rank (FlexLoRA: the spectra every
        client's projection needs), plus a cumulative method's running total. Checked: all of it
        finite in the dtype clients receive.
        """
        kwargs = self.config.aggregate_kwargs(client_max_rank=self.max_rank)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FlexLoRAWarning)  # the reasons are returned, hosts log them once
            update = aggregate(
                {c: r.state for c, r in usable.items()},
                {c: float(r.num_examples) for c, r in usable.items()},  # type: ignore[arg-type]
                expected_ranks={c: self._by_info[c] for c in usable},
                on_invalid="exclude",
                reference=self.info,
                device=self.server_device,
                previous=self.global_update,
                **kwargs,
            )
        cfg, wire = self.config, WIRE_DTYPES[self.config.wire_dtype]
        held = {m: r for m, r in self._largest_ranks().items() if m in update.info}
        sent = update.project(held, lora_alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora, dtype=wire)
        sent.update(self._base_correction(wire, update))
        bad = next((k for k, t in sent.items() if not bool(torch.isfinite(t).all())), None)
        if bad is not None:
            raise ArithmeticError(f"round {rnd}: the new update does not fit the dtype clients receive ({bad} holds inf or NaN)")
        return update, self.energy_by_label(update=update)

    def _count_failures(self, kept: list[Hashable], excluded: Mapping[Hashable, str], rnd: int) -> list[Hashable]:
        """Update the consecutive-exclusion counts; return the clients dropped at this round (opt-in)."""
        for client in kept:
            self.failures[client] = 0
        newly = []
        limit = self.config.drop_after_failures
        for client in excluded:
            self.failures[client] = self.failures.get(client, 0) + 1
            if limit and self.failures[client] >= limit and client not in self.dropped:
                self.dropped[client] = rnd
                newly.append(client)
                logger.warning(
                    "client %s dropped from sampling: excluded %d rounds in a row (drop_after_failures=%d); last reason: %s",
                    client,
                    self.failures[client],
                    limit,
                    excluded[client],
                )
        return newly

    def eligible(self, clients: Iterable[Hashable]) -> list[Hashable]:
        """``clients`` without the dropped ones, sorted: what a host samples from (a pure function of the saved state)."""
        return _sorted(c for c in clients if c not in self.dropped)

    # ------------------------------------------------------------------ state
    def save(self, path: str | os.PathLike[str], *, round: int | None = None, extra: Mapping[str, Any] | None = None) -> Path:
        """Write the server state (global update, round, seed, history) atomically."""
        meta = {
            "history": self.history,
            "method": self.config.method,
            "failures": [[c, n] for c, n in self.failures.items()],
            "dropped": [[c, r] for c, r in self.dropped.items()],
            **self.record,
            **(extra or {}),
        }
        return save_server_state(
            path,
            self.global_update,
            round=self.round if round is None else int(round),
            seed=self.config.seed,
            max_rank=self.max_rank if self.rank_maps else None,
            extra=meta,
        )

    def restore(self, path: str | os.PathLike[str], *, allow_legacy: bool | None = None) -> int:
        """Continue from a saved server state; return its round.

        Parameters
        ----------
        allow_legacy : bool, optional
            Load a state of an older format (metadata unchecked), with a warning.
            (default: the config's ``allow_legacy_state``)

        Raises
        ------
        FlexLoRAError
            The file fails a check of :func:`~flexlora_plugin.core.load_server_state` (a checksum,
            a field's type, an older format without the opt-in), is of another model (other
            modules or shapes), holds no update, or was written by another method or with
            another seed (the seed fixes every client's ranks and the round-1 start: continuing
            under another one would send clients factors of other ranks).
        """
        legacy = self.config.allow_legacy_state if allow_legacy is None else allow_legacy
        state = load_server_state(path, reference=self.info, allow_legacy=legacy)
        if state.update is None:
            raise FlexLoRAError(f"{path} holds no global update (saved before the first aggregation)")
        if state.update.method != self.config.method:
            raise FlexLoRAError(f"{path} was written by method {state.update.method!r}, this run uses {self.config.method!r}")
        if state.seed != self.config.seed:
            raise FlexLoRAError(f"{path} was written with seed {state.seed}, this run uses seed {self.config.seed}")
        self.global_update, self.round = state.update, state.round
        self.history = list(state.extra.get("history", []))
        try:  # lists of [client, n] pairs: JSON keeps the ids' int/str type
            self.failures = {_client_id(c): int(n) for c, n in state.extra.get("failures", [])}
            self.dropped = {_client_id(c): int(r) for c, r in state.extra.get("dropped", [])}
        except (TypeError, ValueError) as err:
            raise FlexLoRAError(f"{path}: malformed 'failures' / 'dropped' entries: {err}") from None
        if self.dropped:
            logger.info("resumed with %d client(s) dropped from sampling: %s", len(self.dropped), _sorted(self.dropped))
        logger.info("resumed from %s after round %d", path, state.round)
        return state.round

    # ------------------------------------------------------------------ export
    def export_ranks(self, ranks: ExportRanks = "max") -> int | dict[str, int] | None:
        """What an export at ``ranks`` writes, per module of the update.

        ``"max"``: the largest rank any client of the federation trains for that module (without
        rank maps: exact); ``"exact"`` (or None): the rank reproducing its ΔW; an int or a map: that rank.
        """
        if ranks == "exact" or ranks is None or (ranks == "max" and not self._by_info):
            return None
        if ranks == "max":
            return self._largest_ranks()
        if isinstance(ranks, str):
            raise ValueError(f"export ranks must be 'max', 'exact', an int or a rank map, got {ranks!r}")
        return ranks

    def adapter(self, ranks: ExportRanks = "max") -> tuple[dict[str, Tensor], dict[str, int]]:
        """:attr:`current` as peft adapter tensors and ranks (cached per ``ranks``, see :meth:`export_ranks`).

        By default each module at the largest rank the federation's clients train for it: the size
        a user expects, a truncation whose error :func:`~flexlora_plugin.core.adapter_error` reports;
        ``"exact"`` reproduces ΔW (near full rank for FlexLoRA: about the model's size). Before any
        round: the common start (``B = 0``).
        """
        from .export import export_adapter

        update, key = self.current, repr(ranks)
        if self._adapter is None or self._adapter[0] is not update or self._adapter[1] != key:
            cfg = self.config
            self._adapter = (
                update,
                key,
                export_adapter(update, lora_alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora, ranks=self.export_ranks(ranks)),
            )
        return self._adapter[2]

    def export(
        self,
        folder: str | os.PathLike[str],
        *,
        base_model_name_or_path: str | None = None,
        ranks: ExportRanks = "max",
    ) -> dict[str, int]:
        """Write the global update as a peft adapter at ``ranks`` (:meth:`export_ranks`; default the largest client rank)."""
        from .export import write_peft_adapter

        if self.global_update is None:
            raise FlexLoRAError("no round produced a global update; nothing to export")
        tensors, chosen = self.adapter(ranks)
        return write_peft_adapter(
            folder,
            tensors,
            chosen,
            base_model_name_or_path=base_model_name_or_path,  # type: ignore[arg-type]
            lora_alpha=self.config.lora_alpha,
            use_rslora=self.config.use_rslora,
        )
