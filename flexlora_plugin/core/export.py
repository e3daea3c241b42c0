"""Export a global update as a peft adapter folder that ``PeftModel.from_pretrained`` loads.

Each module gets the smallest rank whose truncation reproduces its ΔW to a relative Frobenius
error ``≤ tol / 2`` in exact arithmetic (its numerical rank; the other half of ``tol`` is left to
rounding), written through peft's ``rank_pattern``: ``B = U_r S_r / s``, ``A = V_rᵀ``, the leading
triplets themselves. The folder holds ``adapter_config.json`` and
``adapter_model.safetensors`` (peft's own file names and key format).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from .adapters import lora_scaling, split_state
from .errors import RankError
from .methods import GlobalUpdate

__all__ = [
    "PEFT_PREFIX",
    "adapter_config",
    "adapter_error",
    "exact_ranks",
    "export_adapter",
    "save_peft_adapter",
    "write_peft_adapter",
]

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."


def exact_ranks(update: GlobalUpdate, tol: float = 1e-5) -> dict[str, int]:
    """Per module, the smallest rank ``r ≥ 1`` with ``‖ΔW − [ΔW]_r‖_F ≤ tol · ‖ΔW‖_F``.

    ``flexlora``: from the full spectrum computed in float64 (:meth:`FlexLoRAUpdate.exact_spectrum`).
    Baselines: the rank of their global factors (their ΔW is that factor product). Each method
    answers through its own ``exact_rank`` hook.
    """
    return {m: update.exact_rank(m, tol) for m in update.modules}


def _module_path(module: str) -> str:
    """``base_model.model.model.layers.0.q_proj`` -> ``model.layers.0.q_proj`` (the base model's name)."""
    return module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module


def export_adapter(
    update: GlobalUpdate,
    *,
    lora_alpha: float,
    use_rslora: bool = False,
    ranks: Mapping[str, int] | int | None = None,
    tol: float = 1e-5,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The global update as peft adapter tensors (``base_model.model.<module>.lora_A.weight`` ...) and the rank per module.

    Parameters
    ----------
    lora_alpha : float
        Scaling of the exported adapter: ``s = alpha / r_module``.
    ranks : int or Mapping, optional
        Fixed rank(s) instead of :func:`exact_ranks` (then the result is a truncation, whose
        error :func:`adapter_error` reports). A FlexLoRA global update is near full rank (340–382
        of 576 on SmolLM2-135M, about the model's size): a fixed rank makes it small.
    tol : float
        Without ``ranks``, each module reproduces its ΔW to ``‖ΔW − s·B A‖_F ≤ tol · ‖ΔW‖_F``.
        (default: 1e-5)
    """
    chosen: dict[str, int] = {}
    tensors: dict[str, torch.Tensor] = {}
    for m in update.modules:
        base = m if m.startswith(PEFT_PREFIX) else PEFT_PREFIX + m
        fixed = None if ranks is None else update.rank_for(m, ranks)
        A, B = update.export_factors(m, fixed, lambda r: lora_scaling(lora_alpha, r, use_rslora), tol)  # the method's hook
        chosen[m] = int(A.shape[0])
        tensors[f"{base}.lora_A.weight"] = A.cpu().contiguous()
        tensors[f"{base}.lora_B.weight"] = B.cpu().contiguous()
    return tensors, chosen


def adapter_config(
    tensors: Mapping[str, torch.Tensor],
    *,
    lora_alpha: float,
    use_rslora: bool = False,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> LoraConfig:
    """The peft ``LoraConfig`` of an adapter state in peft keys (:func:`export_adapter`, Flower's ``Result.arrays``).

    Each module at its ``lora_A``'s rank (``rank_pattern``), scaled by ``lora_alpha / r``: with it,
    ``get_peft_model(base, config)`` and ``set_peft_model_state_dict(model, tensors)`` rebuild the
    adapter.

    Raises
    ------
    RankError
        ``tensors`` holds no ``lora_A`` factor.
    """
    suffix = ".lora_A.weight"
    ranks = {_module_path(k[: -len(suffix)]): int(v.shape[0]) for k, v in tensors.items() if k.endswith(suffix)}
    if not ranks:
        raise RankError(f"no {suffix} factor in the adapter state (keys {sorted(tensors)[:3]}...)")
    return LoraConfig(
        r=max(ranks.values()),
        lora_alpha=lora_alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
        use_rslora=use_rslora,
        target_modules=sorted({m.split(".")[-1] for m in ranks}),
        rank_pattern=ranks,
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
    )


def write_peft_adapter(
    folder: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    chosen: Mapping[str, int],
    *,
    base_model_name_or_path: str,
    lora_alpha: float,
    use_rslora: bool = False,
    task_type: str | None = "CAUSAL_LM",
) -> dict[str, int]:
    """Write :func:`export_adapter`'s output as a peft adapter folder (config with ``rank_pattern`` + safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = adapter_config(
        tensors,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
    )
    config.save_pretrained(str(folder))
    save_file(dict(tensors), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    logger.info(
        "saved a peft adapter to %s: %d modules, each at its own rank (%d to %d, mean %.1f)",
        folder,
        len(chosen),
        min(chosen.values(), default=0),
        max(chosen.values(), default=0),
        sum(chosen.values()) / max(1, len(chosen)),
    )
    return dict(chosen)


def save_peft_adapter(
    update: GlobalUpdate,
    folder: str | os.PathLike[str],
    *,
    base_model_name_or_path: str,
    lora_alpha: float,
    use_rslora: bool = False,
    ranks: Mapping[str, int] | int | None = None,
    tol: float = 1e-5,
    task_type: str | None = "CAUSAL_LM",
) -> dict[str, int]:
    """Write ``update`` as a peft LoRA adapter folder and return the rank used per module.

    :func:`export_adapter` then :func:`write_peft_adapter`; see them for ``ranks`` and ``tol``
    (check the result with :func:`adapter_error`).
    """
    tensors, chosen = export_adapter(update, lora_alpha=lora_alpha, use_rslora=use_rslora, ranks=ranks, tol=tol)
    return write_peft_adapter(
        folder,
        tensors,
        chosen,
        base_model_name_or_path=base_model_name_or_path,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        task_type=task_type,
    )


def adapter_error(update: GlobalUpdate, folder: str | os.PathLike[str]) -> dict[str, float]:
    """Per module, ``‖ΔW − s·B A‖_F / ‖ΔW‖_F`` of the adapter folder written by :func:`save_peft_adapter`.

    An independent check of the export: ΔW from ``update.export_target`` (``delta``; FLoRA's
    running total ``C_T``) and ``B : (d_out, r)``,
    ``A : (r, d_in)`` read back from ``adapter_model.safetensors`` with ``s`` from
    ``adapter_config.json`` (``lora_alpha / r``, or ``/ √r`` with rsLoRA), all in float64.
    One dense ΔW exists at a time. Needs the update's full ΔW (a live update, not a state
    restored with only the clients' top triplets).
    """
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    factors = split_state(load_file(str(folder / "adapter_model.safetensors")), client=str(folder))
    out: dict[str, float] = {}
    for m in update.modules:
        f = factors[m if m.startswith(PEFT_PREFIX) else PEFT_PREFIX + m]
        r = f.A.shape[0]
        s = lora_scaling(config["lora_alpha"], r, bool(config.get("use_rslora", False)))
        delta = update.export_target(m).to(torch.float64)
        err = torch.linalg.matrix_norm(delta - s * (f.B.to(torch.float64) @ f.A.to(torch.float64)))
        out[m] = float(err / torch.linalg.matrix_norm(delta).clamp_min(1e-300))
    return out
