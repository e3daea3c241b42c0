"""FlexLoRA ServerApp: rank query, ``num-server-rounds`` rounds of :class:`FlexLoRA`, peft adapter export."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file
from torch import Tensor

from flexlora_app.task import Settings, load_base, route_logs
from flexlora_plugin.core import RankError, adapter_error, model_parameters, model_shapes, read_state_metadata, resume_settings
from flexlora_plugin.data import sample_texts
from flexlora_plugin.flower import FlexLoRA, RoundRecord, rank_label
from flexlora_plugin.flower.settings import EXPERIMENT_KEYS, package_versions
from flexlora_plugin.tools.tiny import build_tiny_llama

logger = logging.getLogger(__name__)
app = ServerApp()

STATE_FILE = "server_state.safetensors"
METRICS_FILE = "metrics.json"
ADAPTER_DIR = "adapter"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation and export the final global adapter to ``output-dir/adapter``."""
    route_logs()
    settings = Settings.from_context(context.run_config, context.run_id)
    settings.check_paths()
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    if not context.run_config["model-path"]:
        logger.info("building the tiny random LLaMA in %s", settings.model_path)
        build_tiny_llama(settings.model_path, texts=sample_texts(settings.data_path), max_length=1024)
    record = {"config": settings.record(context.run_config), "versions": package_versions()}
    if settings.resume and (settings.output_dir / STATE_FILE).exists():
        keep_experiment(settings.output_dir / STATE_FILE, record["config"], settings)
    strategy = FlexLoRA(
        settings.flexlora_config(),
        clients_per_round=settings.clients_per_round or None,
        min_available_nodes=settings.min_nodes or None,
        query_timeout=settings.query_timeout,
        module_shapes=model_shapes(settings.model_path, settings.target_modules),  # nodes reporting others are refused
        state_path=settings.output_dir / STATE_FILE,
        resume=settings.resume,
        record=record,  # saved with the server state every round, and below in metrics.json
        on_round=round_files(settings.dump_dir) if settings.dump_dir is not None else None,
        export_ranks=settings.export_ranks,
    )
    strategy.query_nodes(grid)
    remaining = settings.num_server_rounds - strategy.round_offset
    if remaining > 0:
        strategy.start(
            grid,
            ArrayRecord(),
            num_rounds=remaining,
            timeout=settings.round_timeout,
            train_config=ConfigRecord(),
            evaluate_fn=heldout_evaluator(settings, strategy),
        )
    else:
        logger.info("nothing to do: the restored state already has %d rounds", strategy.round_offset)
    if strategy.global_update is None:
        raise RuntimeError("no round produced a global update; no adapter to export")
    adapter = settings.output_dir / ADAPTER_DIR
    # The global model at export-rank: by default each module at the largest rank a client trains
    # (a truncation, whose error is reported below); "exact" reproduces ΔW. Computed once, also in Result.arrays.
    chosen = strategy.save_adapter(adapter, base_model_name_or_path=str(settings.model_path))
    try:  # an independent check of the export: ‖ΔW − s·B A‖_F / ‖ΔW‖_F read back from the folder
        max_error: float | None = max(adapter_error(strategy.global_update, adapter).values())
        what = {"max": "at the largest client rank", "exact": "exact"}.get(
            settings.export_rank, f"truncated at export-rank {settings.export_rank}"
        )
        logger.info("exported adapter (%s) reproduces ΔW to a relative Frobenius error of at most %.2e", what, max_error)
    except RankError as exc:  # a restored state keeps only the clients' top triplets, not ΔW
        max_error = None
        logger.warning("exported adapter not checked against ΔW: %s", exc)
    summary = {
        **record,
        "strategy": settings.strategy,
        "rank-maps": {str(p): rank_label(m) for p, m in sorted(strategy.rank_maps.items())},
        "history": strategy.history,
        "adapter": str(adapter),
        "adapter-ranks": chosen,
        "adapter-max-rel-error": max_error,
        "base-model-bytes": model_parameters(settings.model_path) * (2 if settings.dtype == "bfloat16" else 4),
    }
    (settings.output_dir / METRICS_FILE).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    distinct = sorted(set(chosen.values()))
    ranks = f"rank {distinct[0]}" if len(distinct) == 1 else f"ranks {distinct[0]}-{distinct[-1]} ({len(distinct)} distinct)"
    logger.info("final adapter (%s, %s) saved to %s", settings.strategy, ranks, adapter)


def keep_experiment(state: Path, config: Mapping[str, Any], settings: Settings) -> None:
    """A resumed run keeps the experiment its state recorded: the core's rule, whoever started the run.

    ``python -m flexlora_plugin.flower.run`` restores the recorded settings before it starts; a
    run started otherwise (``run_simulation``, ``flwr run``) with another experiment setting is
    refused here, unless run config ``resume-override`` names it.
    """
    recorded = read_state_metadata(state, allow_legacy=settings.allow_legacy_state)["extra"].get("config")
    _, changed = resume_settings(recorded, config, EXPERIMENT_KEYS, override=settings.resume_override, option="resume-override")
    for key in changed:
        logger.warning("resume: %s changed on request (resume-override): %r -> %r", key, recorded[key], config[key])


def round_files(folder: Path) -> Callable[[RoundRecord], None]:
    """A round callback saving what travelled, for the parity tests (run config ``dump-dir``).

    Per round ``round-NNN/sent-pK.safetensors`` (metadata: node id, rank map) and
    ``reply-pK.safetensors`` (metadata: num-examples, train-loss) for every partition.
    """

    def save(record: RoundRecord) -> None:
        where = folder / f"round-{record.round:03d}"
        where.mkdir(parents=True, exist_ok=True)
        for pid, state in record.sent.items():
            meta = {"node-id": str(record.nodes[pid]), "rank-map": json.dumps(dict(record.rank_maps[pid]))}
            _save(where / f"sent-p{pid}.safetensors", state, meta)
        for pid, reply in record.replies.items():
            meta = {"num-examples": str(reply.num_examples), "train-loss": str(reply.train_loss)}
            _save(where / f"reply-p{pid}.safetensors", reply.state, meta)

    return save


def _save(path: Path, state: Mapping[str, Tensor], meta: Mapping[str, str]) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path), metadata=dict(meta))


def heldout_evaluator(settings: Settings, strategy: FlexLoRA) -> Callable[[int, ArrayRecord], MetricRecord | None] | None:
    """Server-side generated Rouge-L of the current global model on a fixed subset of ``eval-data``.

    Round 0 scores the base model (the zero-shot floor); later rounds export the exact global
    update to ``output-dir/eval-adapter`` and score base + adapter, on ``device`` in ``dtype``
    with the same code as ``python -m flexlora_plugin.evaluate``. The score is added to that
    round's row of the strategy's history (``heldout-rougeL``).
    """
    if settings.eval_data is None:
        return None
    from peft import PeftModel

    from flexlora_plugin.data import load_examples
    from flexlora_plugin.tools.evaluate import evaluate_model, select_examples

    examples = select_examples(load_examples(settings.eval_data), settings.eval_max_per_task or None)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        rnd = server_round + strategy.round_offset
        if (server_round == 0 and strategy.round_offset) or (rnd % settings.eval_every and rnd != settings.num_server_rounds):
            return None
        start = time.perf_counter()
        base, tokenizer = load_base(settings.model_path, settings.device, settings.dtype)
        model = base
        if strategy.global_update is not None:
            folder = settings.output_dir / "eval-adapter"
            strategy.federation.export(
                folder,
                base_model_name_or_path=str(settings.model_path),  # type: ignore[union-attr]
                ranks="exact",
            )  # scores are of the exact global model, whatever export-rank says
            model = PeftModel.from_pretrained(base, folder)  # LoRA layers injected into the shared base...
        try:
            result = evaluate_model(
                model, tokenizer, examples, max_new_tokens=settings.eval_max_new_tokens, batch_size=settings.eval_batch_size
            )
        finally:
            if model is not base:
                model.unload()  # ...and removed again: the base is unchanged for the next round
        score = result.summary()["rougeL"]
        row = next((h for h in strategy.history if h.get("round") == rnd), None)
        if row is None:
            strategy.history.append(row := {"round": rnd})
        row.update({"heldout-rougeL": score, "heldout-n": len(examples)})
        seconds = time.perf_counter() - start
        logger.info("round %d: held-out Rouge-L %.4f on %d examples (%.0f s)", rnd, score, len(examples), seconds)
        return MetricRecord({"heldout-rougeL": score})

    return evaluate
