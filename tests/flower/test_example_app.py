"""The FlowerTune-style example App (examples/flowertune-flexlora), run as a Flower user runs it.

flexlora-plugin is built into a wheel and installed outside the repository; the App is copied
outside it too and run with ``flwr run`` in Flower's simulation engine, with the tiny model and
the data sample the wheel ships. The tutorial's first section shows exactly these files.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "flowertune-flexlora"
TUTORIAL = REPO / "docs" / "tutorials" / "flower.md"


def _wheel_site(tmp: Path) -> Path:
    """flexlora-plugin built from a copy of its sources into a wheel, installed into ``tmp/site``."""
    src = tmp / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "flexlora_plugin", src / "flexlora_plugin", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)], check=True)
    wheel = next((tmp / "dist").glob("flexlora_plugin-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], check=True)
    return tmp / "site"


@pytest.mark.slow
def test_the_example_app_runs_from_an_installed_wheel_and_hands_the_global_adapter_to_evaluate_fn(
    tmp_path, tiny_model, monkeypatch
):
    from flexlora_plugin.tools.flower_run import run_simulation

    site = _wheel_site(tmp_path)
    app = tmp_path / "flowertune-flexlora"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("__pycache__", "results"))
    monkeypatch.setenv("PYTHONPATH", str(site))  # every Flower process imports flexlora_plugin from the wheel
    out = tmp_path / "results"
    result = run_simulation(
        out, num_rounds=2, num_supernodes=4, app_dir=app, run_config={"model-path": str(tiny_model), "max-length": 1024}
    )
    assert result.ok, result.log_path.read_text()[-3000:]
    assert (site / "flexlora_plugin" / "flower" / "__pycache__").is_dir()  # the ServerApp and ClientApps imported the wheel's
    assert (site / "flexlora_plugin" / "sample_data" / "natural_instructions" / "heldout_test.json").is_file()  # package data

    summary = json.loads((out / "metrics.json").read_text())
    heldout = summary["heldout"]
    from safetensors import safe_open

    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as saved:
        assert summary["adapter-keys"] == len(list(saved.keys())) > 0  # Result.arrays: the final global adapter
    assert sorted(heldout) == ["0", "1", "2"]  # evaluate_fn before round 1 and after every round
    assert heldout["0"]["heldout-loss"] != heldout["2"]["heldout-loss"]

    # evaluate_fn got the global adapter: the saved one scores what round 2's evaluation reported
    sys.path.insert(0, str(app))
    try:
        from flowertune_flexlora.task import data_path, load_model, mean_loss
        from flowertune_flexlora.task import heldout as heldout_feats
    finally:
        sys.path.remove(str(app))
    from peft import PeftModel

    base, tokenizer = load_model(str(tiny_model))
    model = PeftModel.from_pretrained(base, out / "adapter")
    feats = heldout_feats(data_path({"data-path": ""}), tokenizer, 1024)
    assert mean_loss(model, feats, int(tokenizer.pad_token_id)) == pytest.approx(heldout["2"]["heldout-loss"], rel=1e-5)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == heldout["2"]["adapter-rank"]


def test_the_tutorial_opens_with_the_example_apps_own_lines():
    """What the tutorial shows first is what the test above runs: every line of its first code blocks is in the App."""
    text = TUTORIAL.read_text(encoding="utf-8")
    first = text.split("\n## ", 2)[1]  # the first section
    blocks = re.findall(r"```python\n(.*?)```", first, flags=re.S)
    assert len(blocks) >= 2, "the tutorial's first section shows the ServerApp and ClientApp changes"
    app_lines = {line.strip() for path in EXAMPLE.rglob("*.py") for line in path.read_text(encoding="utf-8").splitlines()}
    shown = [line.strip() for block in blocks for line in block.splitlines() if line.strip() and line.strip() != "..."]
    missing = [line for line in shown if line not in app_lines]
    assert not missing, f"tutorial lines not in examples/flowertune-flexlora: {missing}"
