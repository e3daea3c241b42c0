"""ServerApp: FedAvg swapped for FlexLoRA. The lines marked FlexLoRA are all that changed."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from peft import get_peft_model, set_peft_model_state_dict

from flexlora_plugin.core import adapter_config, model_shapes  # FlexLoRA
from flexlora_plugin.flower import FlexLoRA  # FlexLoRA (was: from flwr.serverapp.strategy import FedAvg)
from flowertune_flexlora.task import data_path, heldout, load_model, mean_loss

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    c = context.run_config
    model_path, targets = str(c["model-path"]), str(c["target-modules"]).split(",")
    out = Path(str(c["output-dir"]) or "results").resolve()
    strategy = FlexLoRA(  # FlexLoRA (was: FedAvg(fraction_train=..., fraction_evaluate=0.0))
        fraction_train=float(c["fraction-train"]),
        method=str(c["method"]),  # FlexLoRA: the one key: flexlora, hetlora, flora, ffa-lora, rbla, fedavg
        profile=str(c["profile"]),  # FlexLoRA: which partition trains at which rank
        lora_alpha=float(c["lora-alpha"]),
        seed=int(c["seed"]),
        module_shapes=model_shapes(model_path, targets),  # FlexLoRA: read on the meta device, no weights loaded
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(),  # every method starts from one common adapter (B = 0)
        num_rounds=int(c["num-server-rounds"]),
        evaluate_fn=heldout_loss(model_path, data_path(c), float(c["lora-alpha"]), int(c["max-length"])),
    )
    strategy.save_adapter(out / "adapter", base_model_name_or_path=model_path)  # PeftModel.from_pretrained loads it
    metrics = {str(r): dict(m) for r, m in result.evaluate_metrics_serverapp.items()}
    (out / "metrics.json").write_text(json.dumps({"heldout": metrics, "adapter-keys": len(result.arrays)}, indent=1))


def heldout_loss(model_path: str, folder: Path, lora_alpha: float, max_length: int):
    """Server-side evaluation: the held-out loss of the base model plus the round's global adapter."""
    base, tokenizer = load_model(model_path)
    feats = heldout(folder, tokenizer, max_length)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = arrays.to_torch_state_dict()  # peft keys: base_model.model.<module>.lora_A.weight ...
        model = get_peft_model(base, adapter_config(state, lora_alpha=lora_alpha))  # each module at its rank
        set_peft_model_state_dict(model, state)
        loss = mean_loss(model, feats, int(tokenizer.pad_token_id))
        model.unload()  # the LoRA layers out again: the base is the same for the next round
        return MetricRecord({"heldout-loss": loss, "adapter-rank": max(t.shape[0] for k, t in state.items() if "lora_A" in k)})

    return evaluate
