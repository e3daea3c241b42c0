"""``trainer.type: flexlora_llmtrainer``: FS-LLM's ``LLMTrainer`` at a client-specific LoRA rank.

FS-LLM builds every model from the one ``llm.adapter.args[0]`` (a single rank for all).
:class:`FlexLoRATrainer` adds three narrow pieces on top of ``LLMTrainer``:

* :meth:`~FlexLoRATrainer.set_ranks` rebuilds the peft LoRA of ``ctx.model`` at the client's
  per-module ranks (peft ``rank_pattern`` through the core's ``lora_config_for``);
* :meth:`~FlexLoRATrainer.update` loads the server's factors only when every LoRA key is present
  with the shape of this client's adapter (FS-LLM's ``load_state_dict`` would skip missing keys
  and raise a bare size-mismatch ``RuntimeError`` otherwise);
* :meth:`~FlexLoRATrainer.use_trainable_prox` swaps FedProx's hooks (which deep-copy *every*
  parameter of the base model) for ones that keep only the trainable LoRA factors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from federatedscope.llm.trainer.trainer import LLMTrainer
from torch import Tensor, nn

from ..core import (
    PEFT_PREFIX,
    BaseWeights,
    RankError,
    apply_received,
    factor_of,
    freeze_untrained,
    lora_config_for,
    proximal_term,
    split_state,
    to_wire,
    trained_factors,
)
from .config import cfg_value
from .wire import decode_state, encode_state

__all__ = ["FlexLoRATrainer", "TrainableProximal", "hook_del_trainable_init", "hook_record_trainable_init"]

logger = logging.getLogger(f"federatedscope.{__name__}")  # under FS's logger: its handlers and level apply


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """Every LoRA factor of an FS-LLM ``AdapterModel``, frozen ones included (``state_dict()`` has the trainable ones)."""
    return {k: v for k, v in model.state_dict(return_trainable=False).items() if factor_of(k) is not None}


def current_ranks(model: nn.Module) -> dict[str, int]:
    """Module name (FS key format) -> LoRA rank of an FS-LLM ``AdapterModel``."""
    return {m: f.r for m, f in split_state(lora_state(model), client="local").items()}


class TrainableProximal(nn.Module):
    """FedProx's proximal term over the trainable parameters only.

    ``forward(ctx)`` returns ``Σ_w ‖w − w_0‖_p^p / p`` over parameters with ``requires_grad``,
    where ``w_0`` was recorded by :func:`hook_record_trainable_init` (the factors received this
    round). FS multiplies it by ``regularizer.mu`` (= ``fedprox.mu``).
    """

    def forward(self, ctx: Any, p: int = 2) -> Tensor | float:
        init = getattr(ctx, "weight_init_trainable", None)
        if init is None:
            return 0.0
        return proximal_term(ctx.model.named_parameters(), init, p)


def hook_record_trainable_init(ctx: Any) -> None:
    """``on_fit_start``: copy the trainable parameters (the LoRA factors) as the proximal anchor."""
    ctx.weight_init_trainable = {n: w.detach().clone() for n, w in ctx.model.named_parameters() if w.requires_grad}


def hook_del_trainable_init(ctx: Any) -> None:
    """``on_fit_end``: drop the proximal anchor."""
    ctx.weight_init_trainable = None


class FlexLoRATrainer(LLMTrainer):
    """FS-LLM ``LLMTrainer`` whose LoRA has this client's own per-module ranks.

    The ranks come from the client (:class:`~flexlora_plugin.federatedscope.worker.FlexLoRAClient`
    draws them with the core's ``sample_ranks`` once its id is known). Reference: Bai et al.,
    "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
    Resources", NeurIPS 2024.
    """

    def set_ranks(self, ranks: Mapping[str, int], *, lora_alpha: float, use_rslora: bool, lora_dropout: float) -> None:
        """Rebuild the LoRA adapter of ``ctx.model`` at ``ranks`` (no-op when it already has them).

        Parameters
        ----------
        ranks : Mapping[str, int]
            Full module name in FS key format (``base_model.model.model.layers.0.self_attn.q_proj``)
            -> rank; exactly the modules the model adapts.
        lora_alpha, use_rslora, lora_dropout
            From ``llm.adapter.args[0]`` / ``flexlora.use_rslora``; shared by every client.
        """
        adapter_model = self.ctx.model
        have = current_ranks(adapter_model)
        if set(have) != set(ranks):
            raise RankError(
                f"rank map covers {len(ranks)} modules, the model adapts {len(have)}: {sorted(set(have) ^ set(ranks))[:4]}"
            )
        if dict(have) == dict(ranks):
            return
        pattern = {m.removeprefix(PEFT_PREFIX): r for m, r in ranks.items()}
        config = lora_config_for(pattern, lora_alpha=lora_alpha, use_rslora=use_rslora, lora_dropout=lora_dropout)
        from peft import get_peft_model

        base = adapter_model.model.base_model.unload()
        adapter_model.model = get_peft_model(base, config)
        got = current_ranks(adapter_model)
        if got != dict(ranks):
            wrong = {m: (got.get(m), r) for m, r in ranks.items() if got.get(m) != r}
            raise RankError(f"peft built other ranks than assigned (module: (built, assigned)): {dict(list(wrong.items())[:4])}")

    def update(self, model_parameters: dict[str, Any], strict: bool = False) -> None:
        """Load the server's factors for this client, requiring every LoRA key at this client's shape.

        Raises
        ------
        PayloadError
            The factors are not flexlora's safetensors encoding (e.g. FS's pickled tensors: refused,
            never unpickled) or not tensors.
        MissingModuleError, RankError
            A key is missing or unexpected, or a factor's shape is not this adapter's
            (:func:`~flexlora_plugin.core.received_factors`: only the factors the method sends; one it
            freezes is the common round-1 factor, regenerated from ``flexlora.seed``, and stops training).
        """
        received = decode_state(model_parameters, sender="server")
        method, seed = str(cfg_value(self.cfg.federate.method)).lower(), int(cfg_value(self.cfg.flexlora.seed))
        # the core's checks and completion, as in the Flower client: exactly the factors the method sends
        if not hasattr(self, "_base_weights"):
            self._base_weights = BaseWeights()  # W_0 of the adapted modules, for a cumulative method (flora)
        full = apply_received(
            received,
            lora_state(self.ctx.model),
            method=method,
            seed=seed,
            peft_model=self.ctx.model.model,
            base=self._base_weights,
        )
        super().update(full, strict=strict)
        freeze_untrained(self.ctx.model, method=method)

    def get_model_para(self) -> Any:
        """The adapter's factors in ``flexlora.wire_dtype``; distributed: one safetensors string (FS would pickle tensors)."""
        method = str(cfg_value(self.cfg.federate.method)).lower()
        para = to_wire(trained_factors(super().get_model_para(), method=method), str(cfg_value(self.cfg.flexlora.wire_dtype)))
        return encode_state(para) if self.cfg.federate.mode == "distributed" else para

    def use_trainable_prox(self) -> None:
        """Replace FedProx's all-parameter hooks and regularizer by the trainable-only ones."""
        for replace in (self.replace_hook_in_train, self.replace_hook_in_eval):
            replace(hook_record_trainable_init, "on_fit_start", "_hook_record_initialization")
            replace(hook_del_trainable_init, "on_fit_end", "_hook_del_initialization")
        self.ctx.regularizer = TrainableProximal()
        n_trainable = sum(1 for p in self.ctx.model.parameters() if p.requires_grad)
        logger.info("FedProx: proximal term over the %d trainable tensors only (mu=%s)", n_trainable, self.cfg.fedprox.mu)
