"""Fixtures for the FederatedScope host tests: a tiny LLaMA built once per session, and an
in-process FS standalone runner (FS's ``main.py`` steps, with a hook to patch the built runner)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.federatedscope._util import NI_DATA, YAMLS


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flexlora_plugin.tools.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny_llama", max_length=1024)


@pytest.fixture
def rank_table(tmp_path: Path) -> Path:
    path = tmp_path / "ranks.yaml"
    path.write_text("1: 4\n2: 8\n3: 16\n")
    return path


@pytest.fixture
def tiny_opts(tiny_model: Path, tmp_path: Path, rank_table: Path) -> list[str]:
    """Overrides making yaml_configs/tiny_cpu.yaml hermetic (tmp outdir, test-built model)."""
    return [
        "model.type",
        f"{tiny_model}@huggingface_llm",
        "outdir",
        str(tmp_path / "exp"),
        "data.root",
        str(NI_DATA),
        "flexlora.rank_table",
        str(rank_table),
        "federate.save_to",
        "",
        "flexlora.max_examples",
        "6",
    ]


@pytest.fixture
def run_fs() -> Callable[..., Any]:
    """Run FS standalone in-process: ``run_fs(opts, patch=None, cfg_file=tiny_cpu.yaml) -> runner``."""

    def run(opts: Sequence[str], patch: Callable[[Any], None] | None = None, cfg_file: Path = YAMLS / "tiny_cpu.yaml") -> Any:
        from federatedscope.core.auxiliaries.data_builder import get_data
        from federatedscope.core.auxiliaries.logging import update_logger
        from federatedscope.core.auxiliaries.runner_builder import get_runner
        from federatedscope.core.auxiliaries.utils import setup_seed
        from federatedscope.core.auxiliaries.worker_builder import get_client_cls, get_server_cls
        from federatedscope.core.configs.config import global_cfg

        import flexlora_plugin.federatedscope  # noqa: F401

        cfg = global_cfg.clone()
        cfg.merge_from_file(str(cfg_file))
        cfg.merge_from_list(list(opts))
        update_logger(cfg, clear_before_add=True)
        setup_seed(cfg.seed)
        data, modified = get_data(config=cfg.clone())
        cfg.merge_from_other_cfg(modified)
        cfg.freeze()
        runner = get_runner(data=data, server_class=get_server_cls(cfg), client_class=get_client_cls(cfg), config=cfg.clone())
        if patch is not None:
            patch(runner)
        runner.run()
        return runner

    return run
