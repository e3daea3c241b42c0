"""benchmarks/reproduce.py end to end on the tiny model: runs, resume-by-skip, report, evaluate CLI.

The smoke profile runs every piece of the small profile's pipeline in minutes; the paper profile
(256 partitions, 13 clients per round, all seven module types) runs one shortened round; the gpu
profile's settings (bf16 base, gradient checkpointing) run on the CPU, two runs at once
(``--parallel 2``), scored on one more held-out file (``--eval-file``).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="reproduce.py runs the Flower host (the flower extra)")
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
    out = _run(
        "--profile",
        "smoke",
        "--model",
        str(tiny_model),
        "--work",
        str(smoke.parent),
        "--distributions",
        "uniform",
        "--only",
        "zero-shot,fedavg-r8,flexlora-uniform,hetlora-uniform",
        timeout=120,
    )
    assert out.count("done already") == 4


def test_report_tables_and_plots(smoke):
    _run("--profile", "smoke", "--work", str(smoke.parent), "--report", timeout=120)
    text = (smoke / "results.md").read_text()
    for name in ("zero-shot", "fedavg-r8", "flexlora-uniform", "hetlora-uniform"):
        assert f"| {name} |" in text
    for a, b in [
        ("flexlora-uniform", "hetlora-uniform"),
        ("flexlora-uniform", "fedavg-r8"),
        ("hetlora-uniform", "fedavg-r8"),
        ("fedavg-r8", "zero-shot"),
    ]:
        assert f"| {a} | {b} | " in text
    assert "## Machine and versions" in text and "## Reading" in text
    assert (smoke / "heldout_per_round.png").stat().st_size > 1000 and (smoke / "rank_histograms.png").stat().st_size > 1000
    # a hand-written reading survives regeneration
    (smoke / "results.md").write_text(text.replace("Not written yet.", "FlexLoRA read by hand."))
    _run("--profile", "smoke", "--work", str(smoke.parent), "--report", timeout=120)
    assert "FlexLoRA read by hand." in (smoke / "results.md").read_text()


def test_evaluate_command_reproduces_the_recorded_score(smoke, data_path):
    rec = json.loads((smoke / "results" / "flexlora-uniform.json").read_text())
    cmd = [
        sys.executable,
        "-m",
        "flexlora_plugin.evaluate",
        "--adapter",
        rec["adapter"],
        "--data",
        str(data_path / "heldout_test.json"),
        "--max-per-task",
        "1",
        "--max-new-tokens",
        str(rec["profile"]["final-max-new-tokens"]),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert [e["prediction"] for e in got["examples"]] == [e["prediction"] for e in rec["final"]["examples"]]
    assert got["rougeL"] == pytest.approx(rec["final"]["rougeL"], abs=1e-12)


def test_paper_profile_runs_one_shortened_round(tmp_path, tiny_model, data_path):
    sets = [
        "--set",
        "rounds=1",
        "--set",
        "local-steps=1",
        "--set",
        "eval-every=1",
        "--set",
        "final-max-per-task=1",
        "--set",
        "final-max-new-tokens=4",
        "--set",
        "max-train-examples=8",
        "--set",
        "timeout=900",
    ]
    _run("--profile", "paper", "--model", str(tiny_model), "--work", str(tmp_path), "--only", "flexlora-heavy_tail_strong", *sets)
    rec = json.loads((tmp_path / "paper" / "results" / "flexlora-heavy_tail_strong.json").read_text())
    assert rec["profile"]["partitions"] == 256 and rec["profile"]["clients-per-round"] == 13
    assert len(rec["rank_maps"]) == 256 and rec["bytes_per_round"][0]["received"] > 0
    # the recorded command reproduces the run: every override is in it
    assert set(rec["command"].split(" --set ")[1:]) == set(sets[1::2])


def _extra_file(data_path: Path, out: Path, tasks: int) -> Path:
    """The first 2 examples of the first ``tasks`` held-out tasks: a second held-out file."""
    rows, seen = [], {}
    for ex in json.loads((data_path / "heldout_test.json").read_text()):
        task = ex.get("task_id", ex.get("category"))
        if seen.get(task, 0) < 2 and (task in seen or len(seen) < tasks):
            seen[task] = seen.get(task, 0) + 1
            rows.append(ex)
    out.write_text(json.dumps(rows))
    return out


def test_gpu_profile_two_runs_in_parallel_with_an_extra_eval_file(tmp_path, tiny_model, data_path):
    # the gpu profile's settings (bf16 base, gradient checkpointing, max length 512, scoring batches of 32),
    # but on the CPU, with the federation and the scoring shrunk to seconds
    sets = [
        "device=cpu",
        "gpus-per-client=0.0",
        "rounds=1",
        "partitions=4",
        "clients-per-round=2",
        "local-steps=1",
        "batch-size=2",
        "max-train-examples=8",
        "final-max-per-task=1",
        "final-max-new-tokens=4",
        "timeout=600",
    ]
    extra = _extra_file(data_path, tmp_path / "extra_heldout.json", tasks=3)
    base = [
        "--profile",
        "gpu",
        "--model",
        str(tiny_model),
        "--work",
        str(tmp_path / "w"),
        "--results",
        str(tmp_path / "res"),
        "--only",
        "fedavg-r8,flexlora-uniform",
        *[a for s in sets for a in ("--set", s)],
    ]
    out = _run(*base, "--parallel", "2", "--eval-file", str(extra), timeout=600)
    # both runs were running at once, each with its own log
    assert any("running: fedavg-r8" in line and "flexlora-uniform (" in line for line in out.splitlines()), out
    assert "done: fedavg-r8, flexlora-uniform" in out or "done: flexlora-uniform, fedavg-r8" in out, out
    for name in ("fedavg-r8", "flexlora-uniform"):
        assert "held-out Rouge-L" in (tmp_path / "w" / "gpu" / "logs" / f"{name}.log").read_text()
        rec = json.loads((tmp_path / "res" / f"{name}.json").read_text())
        prof = rec["profile"]
        assert (prof["dtype"], prof["device"], prof["gradient-checkpointing"], prof["max-length"]) == (
            "bfloat16",
            "cpu",
            True,
            512,
        )
        assert set(rec["command"].split(" --set ")[1:]) == set(sets)
        assert rec["final"]["n_tasks"] == 24 and [r["round"] for r in rec["heldout_per_round"]] == [0, 1]
        scored = rec["extra_eval"]["extra_heldout.json"]
        assert (scored["final"]["n_examples"], scored["final"]["n_tasks"]) == (3, 3)  # final-max-per-task=1
    # a second --eval-file: the recorded adapters are scored on it, nothing is trained again
    extra2 = _extra_file(data_path, tmp_path / "extra2.json", tasks=2)
    out = _run(*base, "--eval-file", str(extra), "--eval-file", str(extra2), timeout=300)
    assert "training" not in out and out.count("scoring the recorded adapter on extra2.json") == 2, out
    for name in ("fedavg-r8", "flexlora-uniform"):
        rec = json.loads((tmp_path / "res" / f"{name}.json").read_text())
        assert sorted(rec["extra_eval"]) == ["extra2.json", "extra_heldout.json"]
        assert rec["extra_eval"]["extra2.json"]["final"]["n_tasks"] == 2
    # then both are done: --parallel starts nothing
    out = _run(*base, "--parallel", "2", "--eval-file", str(extra), "--eval-file", str(extra2), timeout=120)
    assert out.count("done already") == 2 and "running:" not in out, out
    # the report: one table of scores and one of paired differences per extra file
    _run("--profile", "gpu", "--work", str(tmp_path / "w"), "--results", str(tmp_path / "res"), "--report", timeout=120)
    text = (tmp_path / "w" / "gpu" / "results.md").read_text()
    for file in ("extra_heldout.json", "extra2.json"):
        part = text.split(f"## Extra held-out file `{file}`")[1].split("## Extra held-out file")[0]
        assert "| flexlora-uniform | flexlora | uniform |" in part and "| flexlora-uniform | fedavg-r8 | " in part


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--only", "nosuch"], "--only: no run named ['nosuch']; runs: ['zero-shot', 'fedavg-r8'"),
        (["--set", "rounds=0"], "profile small: rounds must be >= 1, got 0"),
        (["--set", "roundz=1"], "--set 'roundz=1': expected KEY=VALUE with KEY one of"),
        (["--set", "clients-per-round=99"], "clients-per-round must be in 1..partitions=32, got 99"),
        (["--data", "/"], "--data /: no heldout_test.json there"),
        (["--model", "/no/such/model"], "--model /no/such/model: not 'smollm2', 'tiny' or a transformers folder"),
        (["--distributions", "heavy_tail,nosuch"], "--distributions: unknown ['nosuch']"),
        (["--parallel", "0"], "--parallel must be >= 1, got 0"),
    ],
)
def test_bad_options_fail_before_any_model_or_run(args, message, tmp_path):
    out = subprocess.run(
        [sys.executable, SCRIPT, "--work", str(tmp_path / "work"), "--model", "tiny", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == out.stderr.strip().splitlines()[-1] and message in out.stderr, out.stderr
    assert out.stderr.startswith("benchmarks/reproduce.py: error: ") and not (tmp_path / "work").exists()
