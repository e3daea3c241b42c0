"""``flexlora-fs`` checks its command line before FederatedScope loads data or a model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.federatedscope._util import YAMLS

pytestmark = pytest.mark.federatedscope
pytest.importorskip(
    "federatedscope.llm", reason="needs FederatedScope, branch llm (FS-LLM); see docs/tutorials/federatedscope.md"
)

REPO = Path(__file__).resolve().parents[2]
TINY = str(YAMLS / "tiny_cpu.yaml")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cfg", "nope.yaml"], "--cfg nope.yaml: no such file"),
        ([TINY, "federate.total_round_num", "0"], "federate.total_round_num must be >= 1, got 0"),
        ([TINY, "no_such.key", "1"], "no_such.key"),
        ([TINY, "federate.client_num"], "options must be 'key value' pairs"),
        ([TINY, "flexlora.rank_table", "", "flexlora.profile", "nosuch"], "unknown resource profile 'nosuch'"),
        ([TINY, "data.root", "/"], "data.root /: no local_training_<i>.json for client(s) [1, 2, 3]"),
        ([TINY, "model.type", "/no/such/model@huggingface_llm"], "model.type /no/such/model: no such folder"),
        ([TINY, "federate.share_local_model", "True"], "federate.share_local_model must be False"),
    ],
)
def test_bad_command_lines_are_refused_before_fs_starts(args, message, tmp_path, capsys):
    from flexlora_plugin.federatedscope.cli import main

    argv = ["--cfg", *args] if args[0] == TINY else args
    assert main([*argv, "outdir", str(tmp_path / "exp")] if args[0] == TINY else argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flexlora-fs: error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "exp").exists()


def test_a_hub_model_name_is_a_note_not_an_error():
    from flexlora_plugin.federatedscope.cli import check_args

    notes = check_args(["--cfg", TINY, "model.type", "HuggingFaceTB/SmolLM2-135M-Instruct@huggingface_llm"])
    assert len(notes) == 1 and "Hugging Face hub" in notes[0]


@pytest.mark.slow
def test_the_console_script_exits_2_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flexlora_plugin.federatedscope.cli", "--cfg", TINY, "federate.total_round_num", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    lines = [x for x in proc.stderr.splitlines() if x.startswith("flexlora-fs")]
    assert proc.returncode == 2 and lines == ["flexlora-fs: error: federate.total_round_num must be >= 1, got 0"], proc.stderr[
        -2000:
    ]
