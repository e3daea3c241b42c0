"""Round 1: one initial global adapter, the same for every method and every host.

Before any client has trained, the server sends every client factors cut from one adapter:
``B = 0`` and, per module, one common ``A`` at the largest rank any client has for that module,
drawn like peft's own init (``kaiming_uniform_(a=√5)``, i.e. uniform in ``±1/√d_in``) from a
generator seeded by ``(run seed, module name)``. A client of rank ``r`` receives its first ``r``
rows. So every client of a given rank starts from identical factors, FedAvg and HetLoRA average
factors that share one ``A`` (not unrelated random ones), and a rank-200 HetLoRA client's rows
8..199 are not zero (zero rows with ``B = 0`` get no gradient and would stay zero).

``ΔW = s·B·A = 0`` for every client, so FlexLoRA's round-1 global model is the base model, as
with its completion rows; but completion rows are seeded per rank, and a rank-8 ``A`` is not
a prefix of a rank-200 one. Completion rows keep their role for later rounds (a client rank
above ``rank(ΔW)``).

The module name seeding ``A`` is taken without peft's ``base_model.model.`` prefix, so the
FederatedScope host (``…lora_A.default.weight`` keys) and the Flower host (``…lora_A.weight``)
draw the same ``A`` for the same seed and model.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Hashable, Iterable, Mapping

import torch
from torch import Tensor

from .adapters import LORA_A, LORA_B, factor_of, split_state
from .errors import MissingModuleError, RankError, ShapeMismatchError, UnsupportedKeyError
from .export import PEFT_PREFIX, _module_path
from .methods import FactorsUpdate, register_method
from .validation import ModuleInfo

__all__ = ["InitialUpdate", "common_lora_A", "initial_update", "module_infos", "module_infos_of", "with_common_A"]


def common_lora_A(module: str, rank: int, d_in: int, *, seed: int, round: int | None = None) -> Tensor:
    """The common round-1 ``A : (rank, d_in)`` of ``module``, float32 on the CPU (with ``round``: that round's fresh A).

    peft's default LoRA init (``kaiming_uniform_(a=√5)`` on a ``(rank, d_in)`` weight: uniform in
    ``±1/√d_in``, whatever the rank), from a generator seeded by ``(seed, module)``, or by
    ``(seed, round, module)`` for the fresh LoRA a method starts every round (``flora``). The rows
    are drawn in order, so ``common_lora_A(m, r, …)`` is the first ``r`` rows of
    ``common_lora_A(m, R, …)`` for ``r <= R``.
    """
    if rank < 1 or d_in < 1:
        raise RankError(f"module {module}: common A needs rank >= 1 and d_in >= 1, got ({rank}, {d_in})")
    tag = "initial-A" if round is None else f"round-{int(round)}-A"
    generator = torch.Generator(device="cpu").manual_seed(
        (seed * 1_000_003 + zlib.crc32(f"{tag}:{_module_path(module)}".encode())) % (2**63)
    )
    bound = 1.0 / math.sqrt(d_in)
    rows = [(torch.rand(d_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound for _ in range(rank)]
    return torch.stack(rows).to(torch.float32)


@register_method("initial", aggregates=False)
class InitialUpdate(FactorsUpdate):
    """The round-1 global update: ``ΔW = 0`` held as ``B̄ = 0`` and the common ``Ā`` per module.

    ``project(ranks)`` returns ``A = Ā[:r]`` and ``B = 0`` (the receiver's scaling is irrelevant:
    ``B = 0``). Build it with :func:`initial_update`.
    """

    def _project_module(self, module: str, r: int, scaling: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        A, B = self.factors[module]
        if r > A.shape[0]:
            raise RankError(
                f"initial adapter: module {module} was drawn at rank {A.shape[0]} (the largest rank known when it "
                f"was built), rank {r} was requested"
            )
        return A[:r].to(dtype).cpu(), B[:, :r].to(dtype).cpu()


def with_common_A(
    state: Mapping[str, Tensor], d_in: Mapping[str, int], *, seed: int, client: Hashable = "?"
) -> dict[str, Tensor]:
    """``state`` (``lora_B`` factors only) completed with each module's common ``A``: the frozen A of B-only methods.

    For every ``…lora_B….weight : (d_out, r)`` the matching ``lora_A`` key gets
    ``common_lora_A(module, r, d_in, seed)`` rounded once to B's dtype (the wire dtype), so a
    client and the server, each completing the same B, hold bit-identical factors.

    Parameters
    ----------
    d_in : Mapping[str, int]
        Module (the key prefix of ``state``) -> ``d_in`` of its weight.

    Raises
    ------
    UnsupportedKeyError
        ``state`` holds a ``lora_A`` factor (the method trains and sends only B) or another key.
    MissingModuleError
        A module ``d_in`` does not know.
    """
    out: dict[str, Tensor] = {}
    for key, B in state.items():
        found = factor_of(key)
        if found is None or found[1] != LORA_B:
            what = "a lora_A factor" if found is not None else "not a LoRA factor"
            raise UnsupportedKeyError(f"client {client}: key {key!r} is {what}; this method trains and sends lora_B only")
        module = found[0]
        if module not in d_in:
            raise MissingModuleError(f"client {client}: module {module} is not adapted in this federation")
        if not isinstance(B, Tensor) or B.dim() != 2 or not 1 <= B.shape[1] <= d_in[module]:
            shape = tuple(B.shape) if isinstance(B, Tensor) else type(B).__name__
            raise ShapeMismatchError(f"client {client}, module {module}: lora_B must be (d_out, r), got {shape}")
        a_key = key[: key.rindex(LORA_B)] + LORA_A + key[key.rindex(LORA_B) + len(LORA_B) :]
        out[a_key] = common_lora_A(module, int(B.shape[1]), d_in[module], seed=seed).to(B.dtype)
        out[key] = B
    return out


def module_infos(
    shapes: Mapping[str, tuple[int, int]],
    *,
    key_format: str = "{module}.{factor}.weight",
    prefix: str = PEFT_PREFIX,
    dtype: torch.dtype = torch.float32,
) -> dict[str, ModuleInfo]:
    """:class:`ModuleInfo` per module from base-model shapes, with peft's state-dict keys.

    Parameters
    ----------
    shapes : Mapping[str, tuple[int, int]]
        Base-model module name (``model.layers.0.self_attn.q_proj``) -> ``(d_out, d_in)``, as
        :func:`~flexlora_plugin.core.peft_io.target_shapes` returns.
    key_format : str
        State-dict key of a factor; ``{module}`` is ``prefix + name``, ``{factor}`` is
        ``lora_A`` / ``lora_B``. (default: peft's ``get_peft_model_state_dict`` format)
    """
    out = {}
    for name, (d_out, d_in) in shapes.items():
        module = name if name.startswith(prefix) else prefix + name
        keys = [key_format.format(module=module, factor=f) for f in (LORA_A, LORA_B)]
        out[module] = ModuleInfo(module, (int(d_out), int(d_in)), dtype, keys[0], keys[1])
    return out


def module_infos_of(state: Mapping[str, Tensor]) -> dict[str, ModuleInfo]:
    """:class:`ModuleInfo` per module of an existing adapter state dict (its keys, shapes, dtype)."""
    return {m: ModuleInfo(m, f.shape, f.A.dtype, f.a_key, f.b_key) for m, f in split_state(state, client="template").items()}


def initial_update(info: Mapping[str, ModuleInfo], rank_maps: Iterable[Mapping[str, int]], *, seed: int) -> InitialUpdate:
    """The round-1 global adapter for clients with these rank maps (see the module docstring).

    Parameters
    ----------
    info : Mapping[str, ModuleInfo]
        The adapted modules (:func:`module_infos` or :func:`module_infos_of`).
    rank_maps : iterable of Mapping[str, int]
        Every client's rank map (full names, suffixes or regexes, as ``project`` takes). Per
        module the common ``A`` is drawn at the largest of these ranks, capped at ``min(d_out, d_in)``.
    seed : int
        The run seed.

    Raises
    ------
    RankError
        No rank map, or a module no rank map covers.
    """
    maps = [dict(m) for m in rank_maps]
    if not maps:
        raise RankError("initial_update() needs at least one client rank map")
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    probe = InitialUpdate(info, (), {}, factors={}, scales={}, seed=seed)
    for module, mi in info.items():
        d_out, d_in = mi.shape
        top = min(max(probe.rank_for(module, m) for m in maps), min(d_out, d_in))
        A = common_lora_A(module, top, d_in, seed=seed).to(mi.dtype)
        factors[module] = (A, torch.zeros(d_out, top, dtype=mi.dtype))
    return InitialUpdate(info, (), {}, factors=factors, scales=dict.fromkeys(info, 1.0), seed=seed)
