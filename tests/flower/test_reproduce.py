"""benchmarks/reproduce.py end to end on the tiny model: runs, resume-by-skip, report, evaluate CLI.

The smoke profile runs every piece of the small profile's pipeline in minutes; the paper profile
(256 partitions, 13 clients per round, all seven module types) runs one shortened round.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rouge_score", reason="rouge-score is in the test extra")
pytest.importorskip("matplotlib", reason="matplotlib is in the eval extra")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "benchmarks" / "reproduce.py")
pytestmark = pytest.mark.slow


def _run(*args: str, timeout: int = 900) -> str:
    out = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _reproduce_module():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_model, data_path) -> Path:
    work = tmp_path_factory.mktemp("reproduce")
    names = "zero-shot,fedavg-r8,flexlora-uniform,hetlora-uniform"
    _run("--profile", "smoke", "--model", str(tiny_model), "--work", str(work), "--distributions", "uniform", "--only", names)
    return work / "smoke"


def test_each_run_records_what_the_issue_asks(smoke):
    results = smoke / "results"
    sha256_dir = _reproduce_module().sha256_dir
    assert sorted(p.stem for p in results.glob("*.json")) == ["fedavg-r8", "flexlora-uniform", "hetlora-uniform", "zero-shot"]
    for name in ("fedavg-r8", "flexlora-uniform", "hetlora-uniform"):
        rec = json.loads((results / f"{name}.json").read_text())
        assert rec["final"]["n_tasks"] == 24 and rec["final"]["n_examples"] == 24  # 1 per unseen task in smoke
        assert [r["round"] for r in rec["heldout_per_round"]] == [0, 1]
        assert rec["bytes_per_round"][0]["received"] > 0
        assert rec["adapter_sha256"] == sha256_dir(Path(rec["adapter"]))
        assert 0.0 <= rec["adapter_max_rel_error"] <= 1e-5
        assert rec["command"] == f"python benchmarks/reproduce.py --profile smoke --only {name}"
        assert {"torch", "peft", "flwr", "transformers", "cpu"} <= set(rec["machine"])
    zero = json.loads((results / "zero-shot.json").read_text())
    fed = json.loads((results / "fedavg-r8.json").read_text())
    # the floor is the base model, scored on the same examples as the trained runs
    assert [e["task"] for e in zero["final"]["examples"]] == [e["task"] for e in fed["final"]["examples"]]
    assert zero["strategy"] == "none" and zero["train_seconds"] == 0 and "adapter" not in zero


def test_finished_runs_are_skipped(smoke, tiny_model):
    out = _run("--profile", "smoke", "--model", str(tiny_model), "--work", str(smoke.parent), "--distributions", "uniform",
               "--only", "zero-shot,fedavg-r8,flexlora-uniform,hetlora-uniform", timeout=120)  # fmt: skip
    assert out.count("done already") == 4


def test_report_tables_and_plots(smoke):
    _run("--profile", "smoke", "--work", str(smoke.parent), "--report", timeout=120)
    text = (smoke / "results.md").read_text()
    for name in ("zero-shot", "fedavg-r8", "flexlora-uniform", "hetlora-uniform"):
        assert f"| {name} |" in text
    for a, b in [("flexlora-uniform", "hetlora-uniform"), ("flexlora-uniform", "fedavg-r8"), ("hetlora-uniform", "fedavg-r8"),
                 ("fedavg-r8", "zero-shot")]:  # fmt: skip
        assert f"| {a} | {b} | " in text
    assert "## Machine and versions" in text and "## Reading" in text
    assert (smoke / "heldout_per_round.png").stat().st_size > 1000 and (smoke / "rank_histograms.png").stat().st_size > 1000
    # a hand-written reading survives regeneration
    (smoke / "results.md").write_text(text.replace("Not written yet.", "FlexLoRA read by hand."))
    _run("--profile", "smoke", "--work", str(smoke.parent), "--report", timeout=120)
    assert "FlexLoRA read by hand." in (smoke / "results.md").read_text()


def test_evaluate_command_reproduces_the_recorded_score(smoke, data_path):
    rec = json.loads((smoke / "results" / "flexlora-uniform.json").read_text())
    cmd = [sys.executable, "-m", "flexlora_plugin.evaluate", "--adapter", rec["adapter"], "--data", str(data_path / "heldout_test.json"),
           "--max-per-task", "1", "--max-new-tokens", str(rec["profile"]["final-max-new-tokens"])]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert [e["prediction"] for e in got["examples"]] == [e["prediction"] for e in rec["final"]["examples"]]
    assert got["rougeL"] == pytest.approx(rec["final"]["rougeL"], abs=1e-12)


def test_paper_profile_runs_one_shortened_round(tmp_path, tiny_model, data_path):
    sets = ["--set", "rounds=1", "--set", "local-steps=1", "--set", "eval-every=1", "--set", "final-max-per-task=1",
            "--set", "final-max-new-tokens=4", "--set", "max-train-examples=8", "--set", "timeout=900"]  # fmt: skip
    _run("--profile", "paper", "--model", str(tiny_model), "--work", str(tmp_path), "--only", "flexlora-heavy_tail_strong", *sets)
    rec = json.loads((tmp_path / "paper" / "results" / "flexlora-heavy_tail_strong.json").read_text())
    assert rec["profile"]["partitions"] == 256 and rec["profile"]["clients-per-round"] == 13
    assert len(rec["rank_maps"]) == 256 and rec["bytes_per_round"][0]["received"] > 0
    # the recorded command reproduces the run: every override is in it
    assert set(rec["command"].split(" --set ")[1:]) == set(sets[1::2])
