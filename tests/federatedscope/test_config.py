"""cfg.flexlora on a real FS config: defaults, activation, validation errors, the shipped yamls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.federatedscope._util import YAMLS

pytestmark = pytest.mark.federatedscope
pytest.importorskip(
    "federatedscope.llm", reason="needs FederatedScope, branch llm (FS-LLM); see docs/tutorials/federatedscope.md"
)


def _cfg(yaml: Path, opts: list[str] | None = None) -> Any:
    from federatedscope.core.configs.config import global_cfg

    import flexlora_plugin.federatedscope  # noqa: F401
    from flexlora_plugin.federatedscope.config import using_cfg_file

    cfg = global_cfg.clone()
    with using_cfg_file(str(yaml)):  # what --cfg tells main.py: inputs may be relative to the yaml's folder
        cfg.merge_from_file(str(yaml))
        cfg.merge_from_list(opts or [])
    return cfg


@pytest.mark.parametrize("name", sorted(p.name for p in YAMLS.glob("*.yaml") if p.name != "tiny_rank_table.yaml"))
def test_shipped_yamls_validate(name: str, tmp_path: Path) -> None:
    cfg = _cfg(YAMLS / name, ["outdir", str(tmp_path)])
    cfg.freeze(save=False, inform=False)
    ours = cfg.federate.method in ("flexlora", "hetlora")
    assert cfg.flexlora.use is ours
    assert (cfg.trainer.type == "flexlora_llmtrainer") is ours


def test_one_key_switches_flexlora_on(tmp_path: Path) -> None:
    cfg = _cfg(YAMLS / "fedavg_r8.yaml", ["federate.method", "flexlora", "outdir", str(tmp_path)])
    assert cfg.flexlora.use and cfg.trainer.type == "flexlora_llmtrainer"
    cfg.freeze(save=False, inform=False)
    assert cfg.flexlora.profile == "" and cfg.flexlora.seed == 0  # defaults survive freeze (Argument unwrapped)


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        (["llm.adapter.use", "False"], "llm.adapter.use True"),
        (["federate.share_local_model", "True"], "share_local_model"),
        (["federate.restore_from", "x.pt"], "flexlora.restore_from"),
        (["flexlora.profile", "no_such_profile"], "no_such_profile"),
        (["trainer.type", "general"], "flexlora_llmtrainer"),
        (["asyn.use", "True"], "asyn.use"),
    ],
)
def test_invalid_combinations_raise(opts: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _cfg(YAMLS / "flexlora.yaml", opts)


def test_flexlora_use_with_another_method_raises() -> None:
    with pytest.raises(ValueError, match="federate.method"):
        _cfg(YAMLS / "fedavg_r8.yaml", ["flexlora.use", "True"])


def test_a_stock_yaml_without_target_modules_gets_peft_defaults(tiny_model: Path, tmp_path: Path) -> None:
    """FS-LLM yamls often omit target_modules (peft then picks the model's defaults): so does the plugin."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    from flexlora_plugin.federatedscope.config import adapter_args, settings_from_cfg

    args = "[{'adapter_package': 'peft', 'adapter_method': 'lora', 'r': 8, 'lora_alpha': 16}]"
    cfg = _cfg(
        YAMLS / "tiny_cpu.yaml",
        ["model.type", f"{tiny_model}@huggingface_llm", "llm.adapter.args", args, "outdir", str(tmp_path)],
    )
    assert adapter_args(cfg)["target_modules"] == DEFAULTS["llama"]
    assert settings_from_cfg(cfg).targets == tuple(DEFAULTS["llama"])
    with pytest.raises(ValueError, match="cannot be read to pick peft's defaults"):
        _cfg(YAMLS / "tiny_cpu.yaml", ["model.type", f"{tmp_path / 'nowhere'}@huggingface_llm", "llm.adapter.args", args])
