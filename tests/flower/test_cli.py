"""``python -m flexlora_plugin.flower.run`` as a new user meets it: early one-line errors, what ran, where it went."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402

from flexlora_plugin.flower.settings import SettingsError  # noqa: E402
from flexlora_plugin.tools.flower_run import main, quiet  # noqa: E402

pytestmark = [pytest.mark.flower]

SMALL = "local-steps=1 batch-size=2 max-train-examples=4"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--profile", "nosuch"], "unknown resource profile 'nosuch'; registered: ['heavy_tail_light'"),
        (["--num-rounds", "0"], "--num-rounds must be >= 1, got 0"),
        (["--strategy", "fedavg"], "method 'fedavg' averages factors of one rank, but profile 'heavy_tail_strong'"),
        (["--strategy", "fedavg", "--profile", '{"0": 8, "1": 16}'], "the rank table gives clients 2 different rank maps"),
        (["--run-config", "lrr=0.1"], "unknown key 'lrr' (did you mean 'lr'?)"),
        (["--run-config", "lr="], "'lr=' is not key=value"),
        (["--run-config", "device=cuda"], "a value is not a number, true/false or a quoted string"),
        (["--run-config", "device='gpu'"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
        (["--run-config", "dtype='float8'"], "float8"),
        (["--run-config", "model-path='/no/such/model'"], "model-path /no/such/model is not a transformers model folder"),
        (["--run-config", "data-path='/'"], "has no training file for partition(s) [0, 1, 2, 3, 4]..."),
        (["--run-config", "eval-data='/no/such.json'"], "eval-data /no/such.json does not exist"),
        (["--clients-per-round", "9"], "--clients-per-round 9 exceeds the 8 partitions"),
        (["--run-config", "resume=true"], "resume=true but"),
        (["--profile", "{oops"], "profile looks like a JSON rank table but is not JSON"),
        pytest.param(
            ["--gpus-per-client", "0.25"],
            "reserves GPU shares, but torch sees no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA"),
        ),
        pytest.param(
            ["--run-config", "device='cuda'"],
            "use device='auto' or 'cpu' here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA"),
        ),
        (["--run-config", "server-device='gpu'"], "server_device: device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
        pytest.param(
            ["--run-config", "server-device='cuda'"],
            "use server-device='auto' or 'cpu' here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA"),
        ),
    ],
)
def test_bad_options_fail_before_anything_starts(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*argv, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m flexlora_plugin.flower.run: error: ") and message in err, err
    assert "\n" not in err and not out.exists()  # one line, nothing built


@pytest.mark.slow
def test_bad_option_from_a_fresh_shell_exits_2_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flexlora_plugin.flower.run", "--profile", "heavy_tail_x"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "heavy_tail_x" in proc.stderr and "aliases {'heavy_tail': 'heavy_tail_light'" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_no_app_folder_is_one_line_naming_the_fix(tmp_path):
    """A package installed without its repository has no flower_app/: say so, and how to point at one."""
    env = {**os.environ, "FLEXLORA_APP_DIR": str(tmp_path / "nowhere")}
    proc = subprocess.run(
        [sys.executable, "-m", "flexlora_plugin.flower.run"], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"no Flower App at {tmp_path / 'nowhere'}" in proc.stderr and "FLEXLORA_APP_DIR" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert stop.value.code == 0
    assert "(default: heavy_tail_strong)" in text and "(default: 3)" in text and "heavy_tail = heavy_tail_light" in text


@pytest.mark.parametrize(
    "line",
    [
        "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.\n",
        "\x1b[92mINFO \x1b[0m:      [ROUND 1/2]\n",
        "\x1b[92mINFO \x1b[0m:      \t├── ArrayRecord (0.00 MB)\n",
        "INFO:flwr:[ROUND 2/6]\n",
        "\x1b[36m(ClientAppActor pid=5986)\x1b[0m Loading weights: 100%|██████████| 272/272\n",
        "\x1b[36m(ClientAppActor pid=12944)\x1b[0m   warnings.warn(\n",
        "\x1b[36m(ClientAppActor pid=12944)\x1b[0m \n",
        "\x1b[92mINFO \x1b[0m:      \t\tArrayRecord (0.000 MB)\n",
        "\x1b[92mINFO \x1b[0m:      \t\tArrayRecord (0.457 MB)\n",  # Result.arrays: the final global adapter
        "\x1b[92mINFO \x1b[0m:      \t├── ArrayRecord (0.46 MB)\n",
        "\x1b[92mINFO \x1b[0m:      \t{ 1: { 'bytes-received': '1900544',\n",
        "\x1b[92mINFO \x1b[0m:      \t       'train-loss': '6.2186e+00'}}\n",
        "\x1b[92mINFO \x1b[0m:      \t  2: { 'bytes-received': '390804480',\n",  # the later rounds of that dump
    ],
)
def test_quiet_drops_flowers_misleading_lines(line):
    assert quiet(line)


@pytest.mark.parametrize(
    "line",
    [
        "\x1b[92mINFO \x1b[0m:      round 1/2: 3/3 clients ok, train loss 6.2, sent 0.1 MB\n",
        "\x1b[91mERROR \x1b[0m:     ServerApp thread raised an exception: boom\n",
        "Traceback (most recent call last):\n",
        "\x1b[93mWARNING \x1b[0m:   round 2: partition 1 (node 7) excluded: non-finite\n",
        "\x1b[92mINFO \x1b[0m:      saved a peft adapter to /x/adapter: 14 modules, each at its own rank (32 to 64, mean 54.9)\n",
        "\n",
    ],
)
def test_quiet_keeps_ours_and_every_error(line):
    assert not quiet(line)


@pytest.mark.slow
def test_a_run_says_what_ran_and_where_its_results_are(tmp_path, tiny_model, data_path, capsys):
    out = tmp_path / "run"
    argv = [
        "--num-rounds",
        "1",
        "--num-supernodes",
        "2",
        "--clients-per-round",
        "2",
        "--output-dir",
        str(out),
        "--run-config",
        f"{SMALL} model-path='{tiny_model}' data-path='{data_path}'",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    head = text.splitlines()[:8]
    assert head[0] == "FlexLoRA run: strategy flexlora, profile heavy_tail_strong: 5% r8, 5% r30, 10% r30_200, 80% r200"
    assert "simulation engine, 2 SuperNodes (one partition each); 2 clients per round; 1 rounds from round 1" in head[1]
    assert "clients on cpu (float32 base, float32 LoRA)" in head[2] and "FedProx mu 0" in head[2]
    assert head[3].startswith("  settings off their defaults: ") and "local-steps=1" in head[3]
    assert f"output folder: {out}" in head[4] and "r30-200 = rank 30 on some modules" in head[5]
    assert "round 1/1: 2/2 clients ok" in text
    assert "[ROUND 1/1]" not in text and "ArrayRecord (" not in text  # Flower's own lines: in the log only
    assert "tiny random LLaMA" not in text and not (out / "tiny-llama").exists()  # model-path was given: nothing built
    assert "'bytes-received'" not in text  # Flower's closing dump of our metrics, every round of it
    log = (out / "flwr_run.log").read_text()
    assert "[ROUND 1/1]" in log
    tail = text.splitlines()[-4:]
    assert tail[0].startswith("done: rounds 1-1, final train loss ") and "(2/2 clients ok)" in tail[0]
    assert tail[1].startswith("  per round ") and "x the base model (" in tail[1]  # bytes relative to the model
    assert tail[2].startswith("run ") and ": finished:completed in " in tail[2]
    assert tail[3] == f"adapter (peft, PeftModel.from_pretrained): {out / 'adapter'}; metrics: {out / 'metrics.json'}"


@pytest.mark.slow
@pytest.mark.parametrize("keep", [False, True])
def test_a_failed_run_removes_what_it_created_unless_asked(keep, tmp_path, tiny_model, data_path, capsys):
    out = tmp_path / "run"
    argv = [
        "--num-rounds",
        "1",
        "--num-supernodes",
        "2",
        "--output-dir",
        str(out),
        "--timeout",
        "2",
        "--run-config",
        f"{SMALL} model-path='{tiny_model}' data-path='{data_path}'",
        *(["--keep-failed"] if keep else []),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "the run failed (timeout)" in err
    assert out.exists() == keep
    assert (f"kept {out}" if keep else f"removed {out} (it held no finished round; --keep-failed keeps it)") in err


@pytest.mark.slow
def test_a_failed_run_in_a_folder_the_user_made_is_kept(tmp_path, tiny_model, data_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = [
        "--num-rounds",
        "1",
        "--num-supernodes",
        "2",
        "--output-dir",
        str(out),
        "--timeout",
        "2",
        "--run-config",
        f"{SMALL} model-path='{tiny_model}' data-path='{data_path}'",
    ]
    assert main(argv) == 1
    assert (out / "notes.txt").read_text() == "mine" and f"kept {out}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_resumed_run_numbers_its_rounds_from_the_saved_state(tmp_path, tiny_model, data_path, capsys):
    out = tmp_path / "run"
    common = ["--num-supernodes", "2", "--clients-per-round", "2", "--output-dir", str(out)]
    config = f"{SMALL} model-path='{tiny_model}' data-path='{data_path}'"
    assert main(["--num-rounds", "1", *common, "--run-config", config]) == 0
    capsys.readouterr()
    record = json.loads((out / "metrics.json").read_text())
    assert record["config"]["local-steps"] == 1 and record["config"]["num-server-rounds"] == 1
    assert record["versions"]["torch"] == torch.__version__ and "flwr" in record["versions"]
    assert main(["--num-rounds", "2", *common, "--run-config", f"{config} resume=true"]) == 2  # 2 rounds, 1 recorded
    assert "num-server-rounds=2 (recorded 1) differ from the run's record" in capsys.readouterr().err
    assert main(["--num-rounds", "2", *common, "--override", "num-server-rounds", "--run-config", f"{config} resume=true"]) == 0
    text = capsys.readouterr().out
    assert "resume: num-server-rounds changed on request (--override): 1 -> 2" in text
    assert "2 rounds from the next round after the saved server state" in text
    assert "round 2/2 (resumed after 1): 2/2 clients ok" in text and "round 1/2" not in text
    assert "[ROUND 1/1]" not in text and "done: rounds 1-2, final train loss" in text
    assert "resumed after round 1" in (out / "flwr_run.log").read_text()
    # a run started without the runner (run_simulation, flwr run) is held to the record by the ServerApp itself
    from flexlora_plugin.tools.flower_run import run_simulation

    rerun = f"{config} resume=true clients-per-round=2".replace("local-steps=1", "local-steps=2")
    assert "local-steps=2" in rerun
    refused = run_simulation(out, num_rounds=2, num_supernodes=2, extra_run_config=rerun, echo=False)
    assert not refused.ok and "local-steps=2 (recorded 1) differ from the run's record" in refused.log_path.read_text()


def _recorded(out: Path, config: dict) -> None:
    """A run folder whose server state records ``config`` (what the ServerApp saves every round)."""
    from flexlora_plugin.core import save_server_state

    out.mkdir(parents=True)
    save_server_state(out / "server_state.safetensors", None, round=1, extra={"config": config})


def test_resume_restores_the_recorded_experiment_settings_and_refuses_a_changed_one(tmp_path, tiny_model, data_path, capsys):
    from flexlora_plugin.tools.flower_run import build_parser, check_options

    out = tmp_path / "run"
    record = {
        "num-server-rounds": 8,
        "local-steps": 16,
        "proximal-mu": 0.01,
        "model-path": str(tiny_model),
        "data-path": str(data_path),
        "device": "cpu",
    }
    _recorded(out, record)
    parse = build_parser().parse_args
    settings, _ = check_options(parse(["--output-dir", str(out), "--run-config", "resume=true torch-threads=2"]), out)
    assert (settings.num_server_rounds, settings.local_steps, settings.proximal_mu) == (8, 16, 0.01)  # not the defaults
    assert settings.torch_threads == 2 and settings.model_path == tiny_model  # placement settings may change
    assert "resume: 5 experiment settings restored from the run's record" in capsys.readouterr().out
    with pytest.raises(SettingsError, match=r"resume: local-steps=4 \(recorded 16\) differ .* --override local-steps"):
        check_options(parse(["--output-dir", str(out), "--run-config", "resume=true local-steps=4"]), out)
    with pytest.raises(SettingsError, match=r"num-server-rounds=3 \(recorded 8\)"):
        check_options(parse(["--output-dir", str(out), "--num-rounds", "3", "--run-config", "resume=true"]), out)
    args = parse(["--output-dir", str(out), "--override", "local-steps", "--run-config", "resume=true local-steps=4"])
    settings, _ = check_options(args, out)
    assert settings.local_steps == 4 and settings.num_server_rounds == 8
    assert "local-steps changed on request (--override): 16 -> 4" in capsys.readouterr().out
    with pytest.raises(SettingsError, match=r"--override: \['device'\] are not experiment settings"):
        check_options(parse(["--output-dir", str(out), "--override", "device", "--run-config", "resume=true"]), out)
    with pytest.raises(SettingsError, match="--override applies to a resumed run"):
        check_options(parse(["--output-dir", str(tmp_path / "new"), "--override", "lr"]), tmp_path / "new")


def test_the_start_banner_shows_fedprox_mu_and_every_setting_off_its_default(tmp_path, tiny_model, data_path, capsys):
    from flexlora_plugin.tools.flower_run import build_parser, check_options, describe_run

    out = tmp_path / "run"
    args = build_parser().parse_args(
        ["--output-dir", str(out), "--run-config", f"proximal-mu=0.01 lr=0.001 model-path='{tiny_model}' data-path='{data_path}'"]
    )
    settings, run_config = check_options(args, out)
    lines = "\n".join(describe_run(args, settings, out, resuming=False, run_config=run_config))
    assert "lr 0.001, FedProx mu 0.01" in lines
    assert "settings off their defaults:" in lines and "proximal-mu=0.01" in lines and "lr=0.001" in lines


def _pids_with_env(entry: str) -> list[int]:
    """Processes whose environment holds ``entry`` (this run's FLWR_HOME): the runner's descendants."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_sigterm_stops_every_process_it_started_and_keeps_the_run(tmp_path, tiny_model, data_path):
    """SIGTERM mid-run: exit 143, the SuperLink, SuperExec and Ray workers of this run are gone, the folder and log stay."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "flexlora_plugin.flower.run",
        "--num-rounds",
        "20",
        "--num-supernodes",
        "2",
        "--output-dir",
        str(out),
        "--run-config",
        f"{SMALL} model-path='{tiny_model}' data-path='{data_path}'",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = out / "flwr_run.log"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (log.exists() and "round 1/20" in log.read_text(errors="replace")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(1)
    home = f"FLWR_HOME={out / 'flwr_home'}"
    assert _pids_with_env(home), "no process of the run was found while it ran"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted; the SuperLink was stopped; kept" in err
    assert log.exists() and "round 1/20" in log.read_text(errors="replace")
    deadline = time.monotonic() + 30
    while _pids_with_env(home) and time.monotonic() < deadline:
        time.sleep(1)
    left = _pids_with_env(home)
    assert not left, [" ".join(Path(f"/proc/{p}/cmdline").read_text(errors="replace").split("\0"))[:200] for p in left]


def test_every_run_config_key_is_an_experiment_or_a_placement_setting():
    from flexlora_plugin.flower.settings import EXPERIMENT_KEYS, PLACEMENT_KEYS, app_config

    assert not set(EXPERIMENT_KEYS) & set(PLACEMENT_KEYS)
    assert set(EXPERIMENT_KEYS) | set(PLACEMENT_KEYS) == set(app_config())
