"""ClientApp: a FlowerTune-style LoRA trainer. The lines marked FlexLoRA are all that changed from FedAvg."""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flexlora_plugin.flower import QUERY_RANK, FlexLoRAClient  # FlexLoRA
from flowertune_flexlora.task import data_path, load_model, load_partition, train

app = ClientApp()


@lru_cache(maxsize=1)
def flexlora_client(model_path: str, method: str, lora_alpha: float, targets: str, seed: int) -> tuple[FlexLoRAClient, object]:
    """One client per process: the base model loaded once, an adapter per rank map it is sent."""
    base, tokenizer = load_model(model_path)
    client = FlexLoRAClient(base, lora_alpha=lora_alpha, target_modules=targets.split(","), method=method, seed=seed)  # FlexLoRA
    return client, tokenizer


def _client(context: Context) -> tuple[FlexLoRAClient, object]:
    c = context.run_config
    return flexlora_client(
        str(c["model-path"]), str(c["method"]), float(c["lora-alpha"]), str(c["target-modules"]), int(c["seed"])
    )


@app.query(QUERY_RANK)  # FlexLoRA: the strategy asks each node its partition once, before round 1
def rank(msg: Message, context: Context) -> Message:
    return _client(context)[0].answer_rank_query(msg, context)


@app.train()
def train_round(msg: Message, context: Context) -> Message:
    client, tokenizer = _client(context)
    got = client.receive(msg, context)  # FlexLoRA: the peft model at this partition's ranks, the factors loaded
    c = context.run_config
    feats = load_partition(str(data_path(c)), got.partition, tokenizer, int(c["max-length"]), int(c["max-train-examples"]))
    params = [p for _, p in client.trainable()]  # FlexLoRA: what the method trains (B alone for ffa-lora)
    loss = train(
        got.model,
        params,
        feats,
        steps=int(c["local-steps"]),
        batch_size=int(c["batch-size"]),
        lr=float(c["lr"]),
        pad_id=int(tokenizer.pad_token_id),
        seed=f"{c['seed']}:{got.partition}:{got.round}",  # the same batches whichever node trains it
    )
    return client.reply(msg, {"train_loss": loss, "num-examples": len(feats)})  # FlexLoRA: what travels back
