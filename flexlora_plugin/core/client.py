"""The client side every host shares: device and dtype, one frozen base, one adapter per rank map, FedProx.

A client process loads its base model **once**, on its device and in its dtype, and keeps it for
every round and every partition it serves. :class:`ClientModel` wraps that base in a single peft
model holding one LoRA adapter per distinct rank map it has been asked for (a run has a handful:
the profile's LoRA types); a round activates the right adapter and loads the received factors
into it. Nothing is deep-copied per round. LoRA factors always train in float32, whatever the
base's dtype (peft casts the layer input to the adapter's dtype and the result back).

:func:`proximal_term` is FedProx's term over the trainable factors (both hosts use it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import LORA_A, factor_of, only_factors, split_base_delta
from .errors import FlexLoRAError, MissingModuleError, RankError, UnsupportedKeyError
from .methods import method_class
from .peft_io import adapter_state, check_received, load_adapter_state, lora_config_for, target_shapes
from .start import with_common_A

__all__ = [
    "DTYPES",
    "BaseWeights",
    "freeze_untrained",
    "apply_received",
    "rebuild_base",
    "ClientModel",
    "parse_device",
    "proximal_term",
    "received_factors",
    "resolve_device",
    "resolve_dtype",
    "trained_factors",
]

logger = logging.getLogger(__name__)

#: Names accepted for the frozen base's dtype.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_device(name: str | torch.device | None) -> torch.device | None:
    """Check a device name without looking for hardware: None for ``auto`` (or None), else the device.

    A server checks its clients' setting with it (it may have no GPU itself).

    Raises
    ------
    ValueError
        Not ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """
    text = "auto" if name is None else str(name).strip().lower()
    if text == "auto":
        return None
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    return device


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto`` (or None) -> ``cuda`` when available, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` are checked.

    Raises
    ------
    ValueError
        An unknown device name (:func:`parse_device`), CUDA asked for where there is none, or
        ``cuda:N`` past the visible devices (the message says what ``CUDA_VISIBLE_DEVICES`` shows).
    """
    device = parse_device(name)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device (torch {torch.__version__})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: only {count} CUDA device(s) are visible (check CUDA_VISIBLE_DEVICES)")
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """``float32`` | ``bfloat16`` | ``float16`` -> the torch dtype; bfloat16 is refused where the device lacks it."""
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        key = str(name).strip().lower().removeprefix("torch.")
        if key not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
        dtype = DTYPES[key]
    if dtype == torch.bfloat16 and device is not None and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype bfloat16 asked for, but {torch.cuda.get_device_name(device)} does not support it")
    return dtype


def proximal_term(params: Iterable[tuple[str, Tensor]], anchor: Mapping[str, Tensor], p: int = 2) -> Tensor | float:
    """FedProx's ``Σ_w ‖w − w₀‖_p^p / p`` over the trainable tensors of ``params`` that ``anchor`` holds.

    Parameters
    ----------
    params : iterable of (name, Tensor)
        Usually ``model.named_parameters()``; tensors without ``requires_grad`` are skipped.
    anchor : Mapping[str, Tensor]
        ``w₀`` per parameter name: the factors received this round, detached.

    The host multiplies it by ``mu`` (Li et al., "Federated Optimization in Heterogeneous
    Networks", MLSys 2020); with ``mu/2 · ‖w − w₀‖²`` this is ``p = 2``.
    """
    total: Tensor | float = 0.0
    for name, w in params:
        if w.requires_grad and name in anchor:
            total = total + torch.sum(torch.abs(w - anchor[name]) ** p)
    return total / float(p)


def received_factors(received: Mapping[str, Tensor], own: Mapping[str, Tensor], *, method: str, seed: int) -> dict[str, Tensor]:
    """What a client of ``method`` loads: the server's payload, checked, with the factors it does not train added.

    ``received`` must hold exactly the factors ``method`` sends (:attr:`GlobalUpdate.trains`, both
    or ``lora_B`` alone) at the shapes of ``own`` (the receiving adapter's state, same key format).
    A factor the method does not train is the common round-1 factor, regenerated from ``seed``
    (:func:`~flexlora_plugin.core.start.with_common_A`), as the server does with the replies.

    Raises
    ------
    MissingModuleError, RankError, UnsupportedKeyError
        A missing, unexpected or misshaped factor (:func:`~flexlora_plugin.core.peft_io.check_received`).
    """
    trains = method_class(method).trains
    check_received(received, own, factors=trains)
    if LORA_A in trains:
        return dict(received)
    d_in = {found[0]: int(v.shape[1]) for k, v in own.items() if (found := factor_of(k)) is not None and found[1] == LORA_A}
    return with_common_A(received, d_in, seed=seed, client="server")


def trained_factors(state: Mapping[str, Tensor], *, method: str) -> dict[str, Tensor]:
    """The factors of ``state`` a client of ``method`` trains and sends back."""
    return only_factors(state, method_class(method).trains)


def freeze_untrained(model: nn.Module, *, method: str) -> None:
    """Stop training the LoRA factors ``method`` freezes (``ffa-lora``: every ``lora_A``); others are left as they are."""
    trains = method_class(method).trains
    for name, param in model.named_parameters():
        found = factor_of(name)
        if found is not None and param.requires_grad and found[1] not in trains:
            param.requires_grad_(False)


def rebuild_base(W0: Tensor, delta: tuple[Tensor, Tensor] | Tensor) -> Tensor:
    """``W_0 + C`` in float32, returned in ``W_0``'s dtype and device: one rule, so every host's base is bit-identical.

    ``delta``: the correction ``(B : (d_out, R), A : (R, d_in))`` as ``B A``, or dense ``(d_out, d_in)``.
    """
    correction = delta[0].float() @ delta[1].float() if isinstance(delta, tuple) else delta.float()
    return (W0.float() + correction.to(W0.device)).to(W0.dtype)


class BaseWeights:
    """The untouched base weights ``W_0`` of the adapted modules, so a client can set ``W_0 + C`` every round.

    A cumulative method (``flora``) sends its running total ``C`` each round; a client rebuilds
    ``W_0 + C`` from the copy kept here (never adding to what it set last round), so it needs no
    state of its own and every client of a round starts from the same base. Costs one copy of
    each adapted weight, made the first time it is changed.
    """

    def __init__(self) -> None:
        self.kept: dict[str, Tensor] = {}  # module (peft key prefix) -> W_0

    def apply(self, peft_model: nn.Module, deltas: Mapping[str, tuple[Tensor, Tensor] | Tensor]) -> None:
        """Set each module's base weight to ``W_0 + deltas[module]`` (``W_0`` where no correction came)."""
        for module in {*deltas, *self.kept}:
            try:
                layer = peft_model.get_submodule(module)
            except AttributeError as err:
                raise MissingModuleError(f"base correction for module {module}, which this model does not have") from err
            base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            weight = base.weight
            if module not in self.kept:
                self.kept[module] = weight.detach().clone()
            W0 = self.kept[module]
            new = rebuild_base(W0, deltas[module]) if module in deltas else W0
            if tuple(new.shape) != tuple(weight.shape):
                raise RankError(f"module {module}: base correction is {tuple(new.shape)}, the weight {tuple(weight.shape)}")
            with torch.no_grad():
                weight.copy_(new)


def apply_received(
    received: Mapping[str, Tensor], own: Mapping[str, Tensor], *, method: str, seed: int, peft_model: nn.Module, base: BaseWeights
) -> dict[str, Tensor]:
    """A client's whole receive step, for every host: the base correction applied, the factors checked and completed.

    Returns the factors to load (:func:`received_factors`). A base correction reaches only a
    cumulative method's client (:attr:`GlobalUpdate.cumulative`), which rebuilds its base with it
    every round (none: ``W_0``).
    """
    factors, deltas = split_base_delta(received)
    if method_class(method).cumulative:
        base.apply(peft_model, deltas)
    elif deltas:
        raise UnsupportedKeyError(f"server: a base correction for {len(deltas)} module(s), but method {method!r} takes none")
    return received_factors(factors, own, method=method, seed=seed)


class ClientModel:
    """One frozen base model on one device, with a LoRA adapter per distinct rank map.

    Parameters
    ----------
    base : nn.Module
        A transformers causal LM, already on its device and in its dtype. It becomes the base
        of a peft model (peft injects LoRA layers in place): do not use it elsewhere.
    lora_alpha, use_rslora, lora_dropout
        Shared by every adapter (``lora_config_for``).
    target_modules : sequence of str
        Module-name suffixes to adapt (``q_proj`` ...).
    gradient_checkpointing : bool
        Recompute activations in the backward pass (non-reentrant): less memory, ~30% slower.
    method : str
        The federation's method: which factors train and travel (:attr:`GlobalUpdate.trains`).
        (default: "flexlora", both)
    seed : int
        The run seed, for the common factors a method freezes. (default: 0)

    Examples
    --------
    >>> cm = ClientModel(base, lora_alpha=16.0, target_modules=("q_proj", "v_proj"))
    >>> model = cm.activate(rank_map, received)  # the peft model, this rank map's adapter active
    >>> ...train the parameters with requires_grad...
    >>> reply = cm.state()  # this adapter's factors, on the CPU
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        lora_alpha: float,
        target_modules: Iterable[str],
        use_rslora: bool = False,
        lora_dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        method: str = "flexlora",
        seed: int = 0,
    ) -> None:
        self.method, self.seed = method, int(seed)
        self.base = BaseWeights()  # W_0 of the adapted modules, kept once a cumulative method changes them
        method_class(method)  # an unknown method fails here, before any model work
        self.target_modules = tuple(target_modules)
        self.shapes = target_shapes(base, self.target_modules)  # before peft renames anything
        self.lora_alpha, self.use_rslora, self.lora_dropout = float(lora_alpha), bool(use_rslora), float(lora_dropout)
        first = next(base.parameters())
        self.device, self.dtype = first.device, first.dtype
        for param in base.parameters():
            param.requires_grad_(False)
        if gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if getattr(base, "config", None) is not None:
                base.config.use_cache = False
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self._base: nn.Module | None = base
        self.model: Any = None  # the PeftModel, built with the first adapter
        self._names: dict[tuple[tuple[str, int], ...], str] = {}  # rank map -> adapter name
        self.active: str | None = None

    def _name_for(self, rank_map: Mapping[str, int]) -> str:
        key = tuple(sorted((str(k), int(v)) for k, v in rank_map.items()))
        if key in self._names:
            return self._names[key]
        from peft import get_peft_model

        name = f"flex{len(self._names)}"
        config = lora_config_for(rank_map, lora_alpha=self.lora_alpha, use_rslora=self.use_rslora, lora_dropout=self.lora_dropout)
        if self.model is None:
            self.model = get_peft_model(self._base, config, adapter_name=name)  # type: ignore[arg-type]
            self._base = None
        else:
            self.model.add_adapter(name, config)
        for pname, param in self.model.named_parameters():  # factors train in float32, on the base's device
            if f".{name}." in pname and param.dtype != torch.float32:
                param.data = param.data.float()
        self._names[key] = name
        logger.debug("adapter %s built for ranks %s", name, sorted(set(rank_map.values())))
        return name

    @property
    def adapters(self) -> int:
        """How many adapters (distinct rank maps) this model holds."""
        return len(self._names)

    def activate(self, rank_map: Mapping[str, int], received: Mapping[str, Tensor]) -> Any:
        """Activate ``rank_map``'s adapter (built on first use), load ``received`` into it, return the peft model.

        ``received`` must hold every factor of this adapter at its shape (peft's key format,
        ``…q_proj.lora_A.weight``); only this adapter's parameters have ``requires_grad``.

        Raises
        ------
        FlexLoRAError
            No factors were received (a server must send the round-1 adapter), or they do not
            fit this rank map (``MissingModuleError`` / ``RankError``).
        """
        if not received:
            raise FlexLoRAError("no LoRA factors received: the server sends every client its factors, round 1 included")
        name = self._name_for(rank_map)
        self.model.set_adapter(name)
        self.active = name
        own = adapter_state(self.model, adapter_name=name)
        full = apply_received(received, own, method=self.method, seed=self.seed, peft_model=self.model, base=self.base)
        load_adapter_state(self.model, full, adapter_name=name)
        freeze_untrained(self.model, method=self.method)
        return self.model

    def state(self) -> dict[str, Tensor]:
        """The active adapter's trained factors (what travels back) in peft's key format, float32, detached, on the CPU."""
        if self.active is None:
            raise FlexLoRAError("no adapter is active: call activate() first")
        state = trained_factors(adapter_state(self.model, adapter_name=self.active), method=self.method)
        return {k: v.to(device="cpu", dtype=torch.float32, copy=True) for k, v in state.items()}

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the active adapter's factors (what the optimizer trains)."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
