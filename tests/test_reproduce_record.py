"""benchmarks/reproduce.py's record handling without training: where runs land, the comparison with the record."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def _write(folder: Path, name: str, per_task: dict[str, float]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"final": {"per_task": per_task}}))


def test_finished_runs_are_compared_with_their_record_task_by_task(tmp_path):
    compare = _reproduce().compare_with_record
    mine, record = tmp_path / "mine", tmp_path / "record"
    _write(record, "flexlora-uniform", {"1": 0.50, "2": 0.20, "3": 0.10})
    _write(mine, "flexlora-uniform", {"1": 0.505, "2": 0.195, "3": 0.10})
    _write(record, "hetlora-uniform", {"1": 0.40, "2": 0.30})
    _write(mine, "hetlora-uniform", {"1": 0.40, "2": 0.25})
    _write(mine, "rbla-uniform", {"1": 0.3})  # no record: not compared
    lines = compare(mine, record)
    assert len(lines) == 2
    assert lines[0].startswith("[flexlora-uniform] agrees with its record") and "3 tasks paired" in lines[0]
    assert lines[1].startswith("[hetlora-uniform] differs from its record") and "largest -0.0500 on task 2" in lines[1]
    assert compare(record, record) == [] and compare(mine, None) == []


def test_runs_land_in_the_work_folder_and_the_record_is_written_only_when_asked(capsys):
    import pytest

    module = _reproduce()
    parser = module.build_parser()
    assert parser.get_default("record") is False and parser.get_default("results") is None
    with pytest.raises(SystemExit) as stop:  # only small and gpu have a committed record
        module.main(["--profile", "smoke", "--record"])
    assert stop.value.code == 2 and "--record: profile 'smoke' has no committed record" in capsys.readouterr().err


@pytest.mark.slow
def test_report_of_a_profile_without_a_record_goes_to_its_work_folder(tmp_path):
    """``--report`` for a profile with no committed record writes ``<work>/<profile>/results.md``,
    even before any run made that folder (the committed record is only ever written for small/gpu)."""
    import subprocess

    before = (REPO / "docs" / "results.md").read_bytes()
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "reproduce.py"), "--profile", "smoke", "--work", str(tmp_path), "--report"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "smoke" / "results.md").is_file() and (tmp_path / "smoke" / "rank_histograms.png").is_file()
    assert (REPO / "docs" / "results.md").read_bytes() == before
