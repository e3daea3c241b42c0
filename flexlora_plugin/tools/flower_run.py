"""The main job: a small FlexLoRA federation in Flower's simulation engine, start to finish.

``python -m flexlora_plugin.flower.run [--num-rounds N] [--strategy S] [--profile P]
[--num-supernodes N] [--clients-per-round K] [--gpus-per-client F] [--output-dir DIR] [--run-config "k=v ..."]
[--engine deployment --num-partitions N]``

It builds a run-local ``FLWR_HOME`` under the output directory (default ``runs/<timestamp>``),
builds the tiny random LLaMA there unless ``model-path`` is given, runs ``flwr run
<repo>/flower_app local --stream`` on a local SuperLink listening on a free port, reads the
run's final status with ``flwr ls``, and always stops that SuperLink by PID. Exit status: 0 only
when the run finished as ``finished:completed``. ``--engine deployment`` runs the same App on a
loopback SuperLink with ``--num-supernodes`` pool SuperNodes instead (:func:`run_deployment`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .._cli import DefaultsHelp
from ..flower.settings import APP_DIR, DEFAULT_DATA, EXPERIMENT_KEYS, Settings, SettingsError, app_config

__all__ = [
    "RunResult",
    "build_parser",
    "check_options",
    "free_port",
    "main",
    "quiet",
    "run_deployment",
    "run_simulation",
    "stop_pids",
    "toml_overrides",
    "wait_port",
]

logger = logging.getLogger(__name__)

COMPLETED = "finished:completed"
TINY_MAX_LENGTH = 1024  # positions of the tiny model (its tokenizer is trained on a few clients' texts)
_RUN_ID = re.compile(r"Successfully started run (\d+)")
# Flower and library lines that repeat or contradict ours on the console (all stay in flwr_run.log):
# Flower's round counter restarts at 1 on a resume (ours says "round 4/5 (resumed after 3)"), its
# strategy banner and closing block give the global adapter's ArrayRecord size (the final summary
# names the adapter and its bytes), its SuperNode-count notice names a default this runner never uses.
QUIET = re.compile(
    r"Since flwr 1\.32, default simulated SuperNodes|To change federation size|flwr federation simulation-config"
    r"|fraction_evaluate is set to 0\.0|Starting FlexLoRA strategy:|├── Number of rounds|├── ArrayRecord \(|"
    r"├── ConfigRecord \(|\[ROUND \d+/\d+\]|└──> Aggregated MetricRecord|Global evaluation$|└──> MetricRecord: None"
    r"|Initial global evaluation results|^INFO:flwr:|RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO|^\s*warnings\.warn\($"
    r"|Loading weights:|is_gradient_checkpointing` is deprecated|^INFO\s*:\s*$"
    # Flower's closing "Final results" block: its Global Arrays placeholder and a dump of our own metrics
    r"|Strategy execution finished in|Final results:$|Global Arrays:$|^INFO\s*:\s*ArrayRecord \([\d.]+ MB\)$"
    r"|(ClientApp|ServerApp)-side (Train|Evaluate) Metrics:$|^INFO\s*:\s*\{\}$"
    r"|^INFO\s*:\s*(\{ ?)?(\d+: \{ )?'[\w-]+': '[^']*'[,}\s]*$"
)


@dataclass
class RunResult:
    """Outcome of one ``flwr run``: ids, final status, where the outputs are."""

    run_id: str | None
    status: str
    output_dir: Path
    log_path: Path
    wall_s: float
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED

    @property
    def adapter_dir(self) -> Path:
        return self.output_dir / "adapter"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_overrides(values: Mapping[str, Any]) -> str:
    """``k=v`` pairs for ``flwr run --run-config`` (strings as TOML literal strings)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            if "'" in str(value):
                raise ValueError(f"run-config value of {key!r} cannot contain a single quote: {value!r}")
            text = f"'{value}'"
        parts.append(f"{key}={text}")
    return " ".join(parts)


def flwr_env(flwr_home: Path, port: int) -> dict[str, str]:
    """Environment of every ``flwr`` call of one run: its own FLWR_HOME and SuperLink port."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n', encoding="utf-8"
    )
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DEDUP_LOGS="0",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
    )
    bindir = str(Path(sys.executable).parent)  # flwr / flower-superlink of this interpreter first
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    """Direct and indirect child processes of ``pid`` (from /proc)."""
    parent_of = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parent_of[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        nxt = [p for p, pp in parent_of.items() if pp in frontier]
        out += nxt
        frontier = nxt
    return out


def superlink_pids(port: int) -> list[int]:
    """PIDs of ``flower-superlink`` processes started with ``--port <port>``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            args = _cmdline(int(entry.name))
            if (
                any("flower-superlink" in a for a in args[:2])
                and "--port" in args
                and args[args.index("--port") + 1] == str(port)
            ):
                pids.append(int(entry.name))
    return pids


def stop_pids(pids: Sequence[int], grace_s: float = 10.0) -> None:
    """SIGTERM each pid (and its children), wait up to ``grace_s``, then SIGKILL the survivors."""
    targets = [p for pid in pids for p in (pid, *_children(pid))]
    for pid in targets:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and not _is_zombie(p) for p in targets):
        time.sleep(0.2)
    for pid in targets:
        if Path(f"/proc/{pid}").exists() and not _is_zombie(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def run_status(superlink: str, run_id: str, env: Mapping[str, str], app_dir: Path = APP_DIR) -> str:
    """A run's status (e.g. ``finished:completed``) from ``flwr ls --format json``."""
    proc = subprocess.run(
        ["flwr", "ls", superlink, "--run-id", run_id, "--format", "json"],
        capture_output=True,
        text=True,
        env=dict(env),
        timeout=60,
        cwd=app_dir,
    )
    try:
        runs = json.loads(proc.stdout[proc.stdout.index("{") :])["runs"]
        return str(runs[0]["status"])
    except (ValueError, KeyError, IndexError) as err:
        raise RuntimeError(f"cannot read the status of run {run_id}: {proc.stdout[-500:]} {proc.stderr[-500:]}") from err


def quiet(line: str) -> bool:
    """Whether a streamed line is one of Flower's that :data:`QUIET` keeps off the console."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", line.rstrip("\n"))
    text = re.sub(r"^\(ClientAppActor pid=\d+\)\s*", "", plain)
    return (text != plain and not text.strip()) or QUIET.search(text) is not None


def stream_flwr_run(
    cmd: Sequence[str], env: Mapping[str, str], log: TextIO, timeout: float, echo: bool | str, cwd: Path = APP_DIR
) -> tuple[str | None, int]:
    """Run ``flwr run --stream`` from the App folder ``cwd``, teeing its output; return (run id, exit code).

    The exit code is 124 when ``timeout`` killed it.

    ``echo``: False = log only; True = every line on stdout too; ``"quiet"`` = stdout without the
    :func:`quiet` lines (the log keeps everything). The simulation's workers inherit ``cwd``, so
    it must be the App being run: its package then shadows any other copy.
    """
    run_id = None
    t0 = time.monotonic()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(env), cwd=cwd)
    watchdog = threading.Timer(timeout, proc.kill)  # a silent hang cannot outlive the timeout
    watchdog.start()
    try:
        for line in proc.stdout or ():
            log.write(line)
            log.flush()
            if echo and not (echo == "quiet" and quiet(line)):
                sys.stdout.write(line)
                sys.stdout.flush()
            match = _RUN_ID.search(line)
            run_id = run_id or (match.group(1) if match else None)
        code = proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return run_id, 124 if time.monotonic() - t0 >= timeout else code


def run_simulation(
    output_dir: str | os.PathLike[str],
    *,
    num_rounds: int = 3,
    num_supernodes: int = 8,
    run_config: Mapping[str, Any] | None = None,
    extra_run_config: str = "",
    timeout: float = 900.0,
    echo: bool | str = True,
    gpus_per_client: float = 0.0,
    app_dir: str | os.PathLike[str] | None = None,
) -> RunResult:
    """Run the Flower App in the simulation engine and return its outcome (never raises on a failed run).

    Parameters
    ----------
    output_dir : path
        Everything lands here: ``flwr_home/``, ``tiny-llama/``, ``adapter/``, ``metrics.json``,
        ``server_state.safetensors``, ``flwr_run.log``.
    run_config : Mapping, optional
        Run-config overrides (kebab-case keys of ``flower_app/pyproject.toml``).
    extra_run_config : str
        A raw ``"k=v ..."`` string applied last (the CLI's ``--run-config``).
    timeout : float
        Seconds for the whole ``flwr run``; then it is killed (status ``timeout``). (default: 900)
    gpus_per_client : float
        Flower's ``client-resources-num-gpus``: the share of a GPU each virtual client reserves
        (0.25 = four clients train at once on one GPU). Pair it with run-config ``device``
        ``auto``/``cuda``. (default: 0, CPU only)
    app_dir : path, optional
        Another Flower App folder to run, e.g. a copy of ``flower_app/`` with your own ClientApp.
        (default: :data:`~flexlora_plugin.flower.settings.APP_DIR`)
    """
    if gpus_per_client < 0:
        raise ValueError(f"gpus_per_client must be >= 0, got {gpus_per_client}")
    t0 = time.monotonic()
    out = Path(output_dir).resolve()
    overrides = _run_overrides(out, num_rounds, run_config, echo, extra_run_config)
    port = free_port()
    env = flwr_env(out / "flwr_home", port)
    federation = f"num-supernodes={num_supernodes} client-resources-num-cpus=1"
    if gpus_per_client:
        federation += f" client-resources-num-gpus={gpus_per_client!r}"
    app = Path(app_dir).resolve() if app_dir is not None else APP_DIR
    cmd = [
        "flwr",
        "run",
        str(app),
        "local",
        "--stream",
        "--federation-config",
        federation,
        "--run-config",
        toml_overrides(overrides),
    ]
    if extra_run_config:
        cmd += ["--run-config", extra_run_config]
    try:
        return _flwr_run(cmd, env, "local", out, timeout, echo, t0, cwd=app)
    finally:
        stop_pids(superlink_pids(port))


def _run_overrides(
    out: Path, num_rounds: int, run_config: Mapping[str, Any] | None, echo: bool | str, extra_run_config: str = ""
) -> dict[str, Any]:
    """The run config of one run (the tiny model built when no ``model-path`` is given, here or in ``extra_run_config``)."""
    from flexlora_plugin.data import sample_texts

    from .tiny import build_tiny_llama

    out.mkdir(parents=True, exist_ok=True)
    overrides = {"num-server-rounds": num_rounds, "output-dir": str(out), "data-path": str(DEFAULT_DATA), **(run_config or {})}
    given = {**overrides, **parse_run_config(extra_run_config)}
    if not given.get("model-path"):
        if echo:
            print(f"building the tiny random LLaMA in {out / 'tiny-llama'} ...", flush=True)
        data = Path(str(given["data-path"]))
        overrides["model-path"] = str(build_tiny_llama(out / "tiny-llama", texts=sample_texts(data), max_length=TINY_MAX_LENGTH))
    return overrides


def _flwr_run(
    cmd: Sequence[str],
    env: Mapping[str, str],
    federation: str,
    out: Path,
    timeout: float,
    echo: bool | str,
    t0: float,
    cwd: Path = APP_DIR,
) -> RunResult:
    """Stream one ``flwr run`` into ``out/flwr_run.log`` and read its final status and metrics."""
    log_path = out / "flwr_run.log"
    with log_path.open("w", encoding="utf-8") as log:
        run_id, code = stream_flwr_run(cmd, env, log, timeout, echo, cwd)
    if code == 124:
        status = "timeout"
    elif run_id is None:
        status = f"not-started (flwr run exited {code}; see {log_path})"
    else:
        status = run_status(federation, run_id, env)
    metrics_file = out / "metrics.json"
    metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.exists() else {}
    return RunResult(run_id, status, out, log_path, time.monotonic() - t0, metrics)


def wait_port(port: int, timeout: float, host: str = "127.0.0.1") -> None:
    """Return once something listens on ``host:port``; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def run_deployment(
    output_dir: str | os.PathLike[str],
    *,
    num_rounds: int = 3,
    num_nodes: int = 2,
    num_partitions: int = 8,
    node_devices: Sequence[str] | None = None,
    run_config: Mapping[str, Any] | None = None,
    extra_run_config: str = "",
    timeout: float = 900.0,
    echo: bool | str = True,
) -> RunResult:
    """Run the Flower App in Flower's deployment engine on loopback: no Ray (never raises on a failed run).

    A ``flower-superlink`` and ``num_nodes`` pool SuperNodes (node config ``partition-id='any'
    num-partitions=N``: each serves whichever partition a message names) on 127.0.0.1 free ports,
    then ``flwr run`` against them. Every process is stopped by PID. This is how several clients
    share one GPU where Ray is not installed; the price: Flower 1.42's SuperNode runs every message
    in a fresh ClientApp process, which loads the base model again (simulation keeps it per actor).

    Parameters
    ----------
    num_nodes : int
        Pool SuperNodes, i.e. clients training at once. (default: 2)
    num_partitions : int
        Partitions ``0..N-1`` the pool serves. (default: 8)
    node_devices : sequence of str, optional
        Node config ``device`` per node (e.g. ``["cuda:0", "cuda:1"]``); default: the run config's.
    """
    if num_nodes < 1 or num_partitions < 1:
        raise ValueError(f"num_nodes and num_partitions must be >= 1, got {num_nodes}, {num_partitions}")
    if node_devices is not None and len(node_devices) != num_nodes:
        raise ValueError(f"node_devices names {len(node_devices)} devices for {num_nodes} nodes")
    t0 = time.monotonic()
    out = Path(output_dir).resolve()
    overrides = {**_run_overrides(out, num_rounds, run_config, echo, extra_run_config), "min-nodes": num_nodes}
    link_port = free_port()
    env = flwr_env(out / "flwr_home", free_port())
    with (out / "flwr_home" / "config.toml").open("a", encoding="utf-8") as f:
        f.write(f'\n[superlink.deploy]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[TextIO] = []

    def start(name: str, args: list[str]) -> None:
        logs.append((out / f"{name}.log").open("w", encoding="utf-8"))
        procs.append(subprocess.Popen(args, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))

    try:
        start(
            "superlink",
            [
                "flower-superlink",
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
                "--disable-runtime-dependency-installation",
                # Flower's state in memory (no --database): a resume reads our server state, not
                # Flower's, and a SQLite file locked under FLoRA's 2.4 GB rounds ("database is
                # locked" on a heartbeat ended a run)
            ],
        )
        wait_port(link_port, 60)
        for k in range(num_nodes):
            node = f"partition-id='any' num-partitions={num_partitions}"
            if node_devices is not None:
                node += f" device='{node_devices[k]}'"
            start(
                f"supernode{k}",
                [
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    node,
                ],
            )
        cmd = ["flwr", "run", str(APP_DIR), "deploy", "--stream", "--run-config", toml_overrides(overrides)]
        if extra_run_config:
            cmd += ["--run-config", extra_run_config]
        return _flwr_run(cmd, env, "deploy", out, timeout, echo, t0)
    finally:
        stop_pids([p.pid for p in reversed(procs)])
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()


class _Given(argparse.Action):
    """Store the value and note that the user gave the option (``namespace.given``): a resume compares those with the record."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flexlora_plugin.flower.run``."""
    p = argparse.ArgumentParser(
        prog="python -m flexlora_plugin.flower.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelp,
        epilog="Every other run-config key (device, dtype, model-path, lr, ...) goes in --run-config; "
        "see docs/tutorials/flower.md. Exit status: 0 completed, 1 failed, 2 bad option.",
    )
    p.add_argument("--num-rounds", type=int, action=_Given, default=3, help="server rounds")
    p.add_argument("--strategy", choices=METHOD_CHOICES, action=_Given, default="flexlora", help="aggregation method")
    p.add_argument(
        "--profile",
        action=_Given,
        default="heavy_tail_strong",
        help=f"resource profile ({', '.join(PROFILE_HELP)}) or a JSON rank table",
    )
    p.add_argument(
        "--engine",
        choices=("simulation", "deployment"),
        default="simulation",
        help="simulation (Ray) or deployment (loopback SuperLink + pool SuperNodes, no Ray)",
    )
    p.add_argument(
        "--num-supernodes", type=int, default=8, help="simulation: one per partition; deployment: pool nodes training at once"
    )
    p.add_argument("--num-partitions", type=int, default=8, help="deployment: partitions the pool nodes serve")
    p.add_argument(
        "--clients-per-round",
        type=int,
        action=_Given,
        default=None,
        help="partitions sampled each round (0 = all; default: 4, or all when there are fewer)",
    )
    p.add_argument(
        "--gpus-per-client",
        type=float,
        default=0.0,
        help="share of a GPU per virtual client (Flower's client-resources-num-gpus); with --run-config device='auto'",
    )
    p.add_argument("--output-dir", default=None, help="where everything lands (default: runs/<timestamp>)")
    p.add_argument("--run-config", default="", help='extra "k=v ..." run-config overrides, applied last')
    p.add_argument(
        "--override",
        default="",
        help="resume: experiment settings (run-config keys, comma-separated) allowed to differ from the run's record; "
        "every other experiment setting is restored from it (docs/tutorials/flower.md, 'Resuming')",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run")
    p.add_argument(
        "--keep-failed",
        action="store_true",
        help="keep the output folder of a failed run (default: removed when this command created it "
        "and it holds no server state)",
    )
    p.add_argument("--verbose", action="store_true", help="show every Flower line on the console (the log has them anyway)")
    return p


def _profile_help() -> list[str]:
    from flexlora_plugin.core import list_aliases, list_profiles

    return [*list_profiles(), *(f"{a} = {n}" for a, n in list_aliases().items())]


def _methods() -> list[str]:
    from flexlora_plugin.core import list_methods

    return list_methods()


METHOD_CHOICES = tuple(_methods())
PROFILE_HELP = _profile_help()


def _close(key: str, known: Sequence[str]) -> str:
    import difflib

    match = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def parse_run_config(text: str) -> dict[str, Any]:
    """``--run-config "k=v ..."`` as flwr reads it, refusing what flwr would silently drop (``lr``, ``lr=``, ``lr = 1``).

    Raises
    ------
    SettingsError
        A token that is not ``key=value`` or a value flwr cannot type (strings need quotes).
    """
    import shlex

    from flwr.common.config import parse_config_args

    if not text.strip():
        return {}
    how = "expected space-separated key=value pairs, strings in quotes, e.g. \"device='cuda' lr=0.001\""
    try:
        tokens = shlex.split(text, posix=False)
    except ValueError as err:
        raise SettingsError(f"--run-config {text!r}: {err}; {how}") from err
    keys = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if not (sep and key and value):
            raise SettingsError(f"--run-config: {token!r} is not key=value; {how}")
        keys.append(key)
    try:
        parsed = parse_config_args([text])
    except Exception as err:  # click.ClickException: a value that is not bool, int, float or a quoted string
        raise SettingsError(f"--run-config {text!r}: a value is not a number, true/false or a quoted string; {how}") from err
    if sorted(parsed) != sorted(set(keys)):
        raise SettingsError(f"--run-config {text!r}: flwr read only {sorted(parsed)}; {how}")
    return parsed


def check_options(args: argparse.Namespace, out: Path) -> tuple[Settings, dict[str, Any]]:
    """The run config this command would start, checked before any model, SuperLink or Ray starts.

    Returns the typed :class:`Settings` and the run-config overrides to pass to ``flwr run``.

    Raises
    ------
    SettingsError
        One line naming the option and what to use instead.
    """
    for name, value, low in (
        ("--num-rounds", args.num_rounds, 1),
        ("--num-supernodes", args.num_supernodes, 1),
        ("--num-partitions", args.num_partitions, 1),
        ("--clients-per-round", args.clients_per_round or 0, 0),
    ):
        if value < low:
            raise SettingsError(f"{name} must be >= {low}, got {value}")
    if args.gpus_per_client < 0 or args.timeout <= 0:
        raise SettingsError(f"--gpus-per-client must be >= 0 and --timeout > 0, got {args.gpus_per_client}, {args.timeout}")
    defaults = app_config()
    extra = parse_run_config(args.run_config)
    for key in extra:
        if key not in defaults:
            raise SettingsError(
                f"--run-config: unknown key {key!r}{_close(key, list(defaults))}; the keys are listed "
                "in docs/tutorials/flower.md and flower_app/pyproject.toml"
            )
    partitions = args.num_partitions if args.engine == "deployment" else args.num_supernodes
    per_round = min(4, partitions) if args.clients_per_round is None else args.clients_per_round
    overrides = {
        "num-server-rounds": args.num_rounds,
        "strategy": args.strategy,
        "profile": args.profile,
        "clients-per-round": per_round,
        "output-dir": str(out.resolve()),
        "data-path": str(DEFAULT_DATA),
    }
    if str(extra.get("resume", defaults.get("resume"))).lower() == "true":
        overrides = _keep_record(args, out, {**defaults, **overrides, **extra}, overrides, extra)
    elif args.override:
        raise SettingsError("--override applies to a resumed run (--run-config resume=true)")
    settings = Settings.from_context({**defaults, **overrides, **extra}, run_id=0)
    settings.check_paths(partitions)
    _check_hardware(args, settings)
    if settings.clients_per_round > partitions:
        raise SettingsError(
            f"--clients-per-round {settings.clients_per_round} exceeds the {partitions} partitions; "
            f"use at most {partitions} (or 0 for all)"
        )
    return settings, overrides


_CLI_KEYS = {
    "num_rounds": "num-server-rounds",
    "strategy": "strategy",
    "profile": "profile",
    "clients_per_round": "clients-per-round",
}


def _keep_record(
    args: argparse.Namespace, out: Path, merged: Mapping[str, Any], overrides: Mapping[str, Any], extra: Mapping[str, Any]
) -> dict[str, Any]:
    """A resumed run's overrides: every experiment setting as the run recorded it, unless ``--override`` names it.

    A setting given on this command line (in ``--run-config``, or an option such as ``--num-rounds``) that
    differs from the record is refused, naming it, unless ``--override`` lists it; then the new value
    is used, printed, and recorded with the state from the next round on. Placement settings
    (:data:`PLACEMENT_KEYS`) are taken as given.
    """
    from flexlora_plugin.core import FlexLoRAError, read_state_metadata, resume_settings

    state = out / "server_state.safetensors"
    if not state.exists():
        raise SettingsError(f"resume=true but {state} does not exist; give --output-dir of an earlier run, or drop resume=true")
    allowed = [k.strip() for k in args.override.split(",") if k.strip()]
    try:
        recorded = read_state_metadata(state, allow_legacy=str(merged.get("allow-legacy-state")).lower() == "true")
        record = recorded["extra"].get("config")
        given = set(extra) | {key for dest, key in _CLI_KEYS.items() if dest in getattr(args, "given", ())}
        stated = {k: merged[k] for k in given if k in merged}
        kept, changed = resume_settings(record, stated, EXPERIMENT_KEYS, override=allowed, option="--override")
    except FlexLoRAError as err:
        raise SettingsError(str(err)) from None
    if not record:
        print(f"note: {state} records no settings (an older run): resuming with the settings given", flush=True)
        return dict(overrides)
    for k in changed:
        print(f"resume: {k} changed on request (--override): {record[k]!r} -> {merged[k]!r}", flush=True)
    print(f"resume: {len(kept)} experiment settings restored from the run's record", flush=True)
    return {**overrides, **kept, "resume-override": ",".join(changed)}  # the ServerApp checks the record again


def _check_hardware(args: argparse.Namespace, settings: Settings) -> None:
    """Every node of this runner is on this machine: its device must exist here, GPU shares need CUDA."""
    import torch

    from flexlora_plugin.core import resolve_device

    if args.gpus_per_client > 0 and not torch.cuda.is_available():
        raise SettingsError(
            f"--gpus-per-client {args.gpus_per_client:g} reserves GPU shares, but torch sees no CUDA device "
            "here; on a CPU-only machine use --gpus-per-client 0"
        )
    try:
        resolve_device(settings.device)
    except ValueError as err:
        raise SettingsError(f"{err}; use device='auto' or 'cpu' here") from err
    try:
        resolve_device(settings.server_device)
    except ValueError as err:
        raise SettingsError(f"server-device: {err}; use server-device='auto' or 'cpu' here") from err


def describe_run(
    args: argparse.Namespace, settings: Settings, out: Path, resuming: bool, run_config: Mapping[str, Any] | None = None
) -> list[str]:
    """The lines printed before a run starts: what runs, where, how to read its output, and every setting off its default."""
    from flexlora_plugin.core import describe_profile

    table = settings.profile.lstrip().startswith("{")
    profile = f"rank table {settings.profile}" if table else describe_profile(settings.profile)
    if args.engine == "deployment":
        nodes = f"deployment engine, {args.num_supernodes} pool SuperNodes serving {args.num_partitions} partitions"
    else:
        nodes = f"simulation engine, {args.num_supernodes} SuperNodes (one partition each)"
    per_round = settings.clients_per_round or "all"
    tiny = settings.model_path == settings.output_dir / "tiny-llama"
    model = (
        (f"tiny random LLaMA built in {settings.model_path} (a plumbing check: its losses and scores say nothing about quality)")
        if tiny
        else str(settings.model_path)
    )
    start = "round 1" if not resuming else "the next round after the saved server state"
    return [
        f"FlexLoRA run: strategy {settings.strategy}, profile {profile}",
        f"  {nodes}; {per_round} clients per round; {settings.num_server_rounds} rounds from {start}; seed {settings.seed}",
        f"  clients on {settings.device} ({settings.dtype} base, float32 LoRA), {settings.local_steps} local steps of "
        f"batch {settings.batch_size}, lr {settings.lr:g}, FedProx mu {settings.proximal_mu:g}; model: {model}",
        *_non_defaults(run_config or {}, args),
        f"  output folder: {out} (adapter/, metrics.json, server_state.safetensors, flwr_run.log)",
        "  reading the rounds: r8 = rank 8 on every module, r30-200 = rank 30 on some modules (attention) and 200 on "
        "others (MLP); 'energy kept' = share of the update's squared norm a client of that rank receives (1 = all)",
        *(
            []
            if args.verbose
            else ["  Flower lines that repeat ours are kept off the console (flwr_run.log has all; --verbose shows them)"]
        ),
    ]


def _non_defaults(run_config: Mapping[str, Any], args: argparse.Namespace) -> list[str]:
    """One line of every run-config setting that differs from the App's default (the run folder aside)."""
    defaults = app_config()
    extra = parse_run_config(args.run_config)
    given = {**run_config, **extra}
    diff = {k: v for k, v in sorted(given.items()) if k not in ("output-dir", "data-path") and defaults.get(k) != v}
    return [f"  settings off their defaults: {' '.join(f'{k}={v}' for k, v in diff.items())}"] if diff else []


def summarize(result: RunResult) -> list[str]:
    """The lines printed after a run: rounds done, final loss, bytes, where the results are."""
    rows = [r for r in result.metrics.get("history", []) if "train-loss" in r]
    lines = []
    if rows:
        last = rows[-1]
        sent = sum(r["bytes-sent"] for r in rows) / 1e6
        received = sum(r["bytes-received"] for r in rows) / 1e6
        lines.append(
            f"done: rounds {rows[0]['round']}-{last['round']}, final train loss {last['train-loss']:.4f} "
            f"({last['clients-ok']}/{last['clients']} clients ok), {sent:.1f} MB sent and {received:.1f} MB "
            f"received in all"
        )
        base = result.metrics.get("base-model-bytes")
        if base:
            per_round = (sent + received) / 2 / len(rows)
            lines.append(
                f"  per round {per_round:.1f} MB each way (mean), {per_round * 1e6 / base:.2f}x the base model "
                f"({base / 1e6:.1f} MB)"
            )
    lines.append(f"run {result.run_id}: {result.status} in {result.wall_s:.0f} s; log {result.log_path}")
    if result.ok:
        lines.append(
            f"adapter (peft, PeftModel.from_pretrained): {result.adapter_dir}; metrics: {result.output_dir / 'metrics.json'}"
        )
    return lines


def clean_failed(out: Path, created: bool, keep: bool) -> str:
    """After a failed run: remove ``out`` when this command created it and it holds nothing to resume.

    Returns what was done, for the user. A folder with a server state is kept (resume it with
    ``--run-config resume=true``); so is any folder the user made, or asked to keep.
    """
    import shutil

    if not out.exists():
        return ""
    if keep or not created:
        return f"kept {out}"
    if (out / "server_state.safetensors").exists():
        return f"kept {out}: it holds a server state; resume with --output-dir {out} --run-config resume=true"
    shutil.rmtree(out, ignore_errors=True)
    return f"removed {out} (it held no finished round; --keep-failed keeps it)"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 completed, 1 failed, 2 bad option, 130/143 interrupted)."""
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    try:
        settings, run_config = check_options(args, out)
    except SettingsError as err:
        print(f"{build_parser().prog}: error: {err}", file=sys.stderr)
        return 2
    created = not out.exists()
    print("\n".join(describe_run(args, settings, out, resuming=settings.resume, run_config=run_config)), flush=True)
    echo = True if args.verbose else "quiet"
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if args.engine == "deployment":
            result = run_deployment(
                out,
                num_rounds=args.num_rounds,
                num_nodes=args.num_supernodes,
                num_partitions=args.num_partitions,
                run_config=run_config,
                extra_run_config=args.run_config,
                timeout=args.timeout,
                echo=echo,
            )
        else:
            result = run_simulation(
                out,
                num_rounds=args.num_rounds,
                num_supernodes=args.num_supernodes,
                run_config=run_config,
                extra_run_config=args.run_config,
                timeout=args.timeout,
                gpus_per_client=args.gpus_per_client,
                echo=echo,
            )
    except KeyboardInterrupt as stop:
        code = stop.args[0] if stop.args and isinstance(stop.args[0], int) else 130
        print(
            f"interrupted; the SuperLink was stopped; kept {out} (resume with --output-dir {out} "
            "--run-config resume=true when it holds a server state)",
            file=sys.stderr,
        )
        return code
    print("\n".join(summarize(result)), flush=True)
    if result.ok:
        return 0
    print(f"the run failed ({result.status}); see {result.log_path}", file=sys.stderr)
    tail = result.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:] if result.log_path.exists() else []
    if tail:
        print("last lines of the log:\n  " + "\n  ".join(tail), file=sys.stderr)
    done = clean_failed(out, created, args.keep_failed)
    if done:
        print(done, file=sys.stderr)
    return 1


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(128 + signum)  # unwinds: the runner's finally blocks stop the SuperLink and nodes


if __name__ == "__main__":
    sys.exit(main())
