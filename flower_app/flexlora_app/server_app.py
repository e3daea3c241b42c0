"""FlexLoRA ServerApp: rank query, ``num-server-rounds`` rounds of :class:`FlexLoRA`, peft adapter export."""

from __future__ import annotations

import json
import logging

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from flexlora_app.task import Settings, route_logs
from flexlora_plugin.core.export import save_peft_adapter
from flexlora_plugin.data import sample_texts
from flexlora_plugin.flower import FlexLoRA, rank_label
from flexlora_plugin.tiny import build_tiny_llama

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
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    if not context.run_config["model-path"]:
        logger.info("building the tiny random LLaMA in %s", settings.model_path)
        build_tiny_llama(settings.model_path, texts=sample_texts(settings.data_path), max_length=1024)
    strategy = FlexLoRA(
        settings.flexlora_config(),
        clients_per_round=settings.clients_per_round or None,
        expected_nodes=settings.min_nodes or None,
        query_timeout=settings.query_timeout,
        state_path=settings.output_dir / STATE_FILE,
        resume=settings.resume,
        dump_dir=settings.dump_dir,
    )
    strategy.query_nodes(grid)
    remaining = settings.num_server_rounds - strategy.round_offset
    if remaining > 0:
        strategy.start(grid, ArrayRecord(), num_rounds=remaining, timeout=settings.round_timeout, train_config=ConfigRecord())
    else:
        logger.info("nothing to do: the restored state already has %d rounds", strategy.round_offset)
    if strategy.global_update is None:
        raise RuntimeError("no round produced a global update; no adapter to export")
    adapter = settings.output_dir / ADAPTER_DIR
    # The global model itself: each module at the numerical rank reproducing its ΔW to 1e-5.
    chosen = save_peft_adapter(
        strategy.global_update, adapter, base_model_name_or_path=str(settings.model_path), lora_alpha=settings.lora_alpha
    )
    summary = {
        "strategy": settings.strategy,
        "rank-maps": {str(p): rank_label(m) for p, m in sorted(strategy.rank_maps.items())},
        "history": strategy.history,
        "adapter": str(adapter),
        "adapter-ranks": chosen,
    }
    (settings.output_dir / METRICS_FILE).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    logger.info("final adapter (%s, ranks %s) saved to %s", settings.strategy, sorted(set(chosen.values())), adapter)

