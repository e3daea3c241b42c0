"""The peft side of a client: build its LoRA at its ranks, read and load adapter factors."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor, nn

from .adapters import LORA_A, LORA_B, factor_of, only_factors, split_state
from .errors import MissingModuleError, RankError, UnsupportedKeyError

__all__ = [
    "adapter_state",
    "check_received",
    "load_adapter_state",
    "lora_config_for",
    "model_parameters",
    "model_shapes",
    "target_shapes",
]

logger = logging.getLogger(__name__)


def target_shapes(model: nn.Module, target_modules: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``(d_out, d_in)`` of every ``nn.Linear`` whose name ends in one of ``target_modules``.

    Call it on the *base* model; names are the model's own (``model.layers.0.self_attn.q_proj``).
    """
    suffixes = tuple(target_modules)
    shapes = {
        name: (int(mod.out_features), int(mod.in_features))
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.split(".")[-1] in suffixes
    }
    if not shapes:
        raise MissingModuleError(f"no nn.Linear module named {list(suffixes)} in {type(model).__name__}")
    return shapes


def _meta_model(model_dir: str | os.PathLike[str]) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def model_shapes(model_dir: str | os.PathLike[str], target_modules: Sequence[str]) -> dict[str, tuple[int, int]]:
    """:func:`target_shapes` of a model folder, built from its ``config.json`` on the meta device (no weights read).

    What a server that never loads the model knows of it: the reference its clients' reports are checked against.
    """
    return target_shapes(_meta_model(model_dir), target_modules)


def model_parameters(model_dir: str | os.PathLike[str]) -> int:
    """The parameter count of a model folder (tied weights once), from its ``config.json`` on the meta device."""
    return sum(p.numel() for p in _meta_model(model_dir).parameters())


def lora_config_for(
    ranks: Mapping[str, int],
    *,
    lora_alpha: float,
    use_rslora: bool = False,
    lora_dropout: float = 0.0,
    task_type: str | None = "CAUSAL_LM",
) -> LoraConfig:
    """A peft ``LoraConfig`` training exactly ``ranks`` (full names or suffixes -> rank).

    ``lora_alpha`` is shared, so peft's scaling per module is ``alpha / r_module``
    (``alpha / sqrt(r_module)`` with rsLoRA), matching :func:`~.adapters.lora_scaling`.
    """
    if not ranks:
        raise RankError("lora_config_for() needs a non-empty rank map")
    targets = sorted({key.split(".")[-1] for key in ranks})
    return LoraConfig(
        r=max(ranks.values()),
        lora_alpha=lora_alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
        use_rslora=use_rslora,
        lora_dropout=lora_dropout,
        target_modules=targets,
        rank_pattern=dict(ranks),
        bias="none",
        task_type=task_type,
    )


def adapter_state(model: PeftModel, adapter_name: str = "default") -> dict[str, Tensor]:
    """An adapter's LoRA factors in peft's wire format (``…q_proj.lora_A.weight``), detached."""
    return {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}


def check_received(state: Mapping[str, Tensor], own: Mapping[str, Tensor], *, factors: Sequence[str] = (LORA_A, LORA_B)) -> None:
    """Check the factors a client receives, in every host.

    LoRA keys only, A/B ranks agreeing, exactly this adapter's keys of the kinds ``factors`` (what
    the method sends: both, or ``lora_B`` alone), each at this adapter's shape.

    Parameters
    ----------
    state : Mapping[str, Tensor]
        The received factors.
    own : Mapping[str, Tensor]
        The receiving adapter's factors, same key format (their shapes are what must arrive).

    Raises
    ------
    MissingModuleError
        When the adapter has factors that ``state`` lacks, or the reverse.
    RankError
        When a factor's shape differs from the adapter's (factors for a client of another rank).
    UnsupportedKeyError
        For a key that is not a LoRA factor.
    """
    if set(factors) >= {LORA_A, LORA_B}:
        split_state(state, client="server")  # rejects non-LoRA keys and A/B rank mismatches
    else:
        for key in state:
            found = factor_of(key)
            if found is None or found[1] not in factors:
                raise UnsupportedKeyError(f"server: key {key!r} is not one of the factors this method sends ({list(factors)})")
        own = only_factors(own, factors)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise MissingModuleError(
            f"adapter keys differ: missing {missing[:3]} ({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise RankError(f"{key}: received {tuple(value.shape)}, the model's adapter is {tuple(own[key].shape)}")


def load_adapter_state(model: PeftModel, state: Mapping[str, Tensor], adapter_name: str = "default") -> None:
    """Load factors into ``model``'s adapter ``adapter_name``, failing on any missing or misshaped factor.

    Raises
    ------
    MissingModuleError
        When the model has LoRA factors that ``state`` lacks, or the reverse.
    RankError
        When a factor's shape differs from the model's (a client of another rank).
    """
    own = get_peft_model_state_dict(model, adapter_name=adapter_name)
    check_received(state, own)
    with torch.no_grad():
        set_peft_model_state_dict(model, {k: v.to(own[k].dtype) for k, v in state.items()}, adapter_name=adapter_name)
