"""Where a GPU server step spends its time: the hosts' call from page-locked factors, in one process.

The 80-client setting of ``bench_aggregation.py`` (same federation, same seed), factors pinned once:

1. the transfer bound (every factor host -> device, pinned, one sync);
2. ``reps`` runs of the hosts' call (``aggregate(max_rank)`` + ``project`` per distinct rank map),
   alternating the worker scheduling: stream priorities on (the default) and off
   (``aggregation._PRIORITIES = False``, one stream per worker), each run's time and worker timeline;
3. one run of each under ``torch.profiler``: kernel time summed per kind (GEMMs, the solver's
   float64 eigendecompositions and Cholesky-QR, copies, the rest) and the top kernels.

``bench_aggregation.py`` times each variant in its own process; this script compares the two
schedulings in one process, on the same pinned inputs, and shows the kernels behind the numbers.

    PYTHONPATH=. python3 benchmarks/profile_gpu.py --out /tmp/profile     # ~1 min on an H100
    python benchmarks/profile_gpu.py --device cpu --quick --out /tmp/p     # smoke run on the CPU (no priorities there)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_aggregation, next to this file

import bench_aggregation as bench  # noqa: E402

KINDS = (  # kernel (on the CPU: aten op) name -> kind, first match wins
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
    ("eigendecompositions, SVDs", re.compile(r"sytrd|stedc|syevd|ormtr|ormql|ormqr|larft|larfb|steqr|sterf|eigh|svd", re.I)),
    ("Cholesky-QR (potrf, trsm, potrs)", re.compile(r"potrf|getrf|trsm|potrs|trsv|trtri|cholesky|solve_triangular", re.I)),
    ("GEMM", re.compile(r"gemm|cutlass|sm90_|sm80_|ampere_|hopper|gemv|dot_kernel|aten::(mm|addmm_?|bmm|matmul)$", re.I)),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="(default: cuda)")
    p.add_argument("--quick", action="store_true", help="small shapes and 12 clients (a smoke run)")
    p.add_argument("--reps", type=int, default=6, help="timed runs per scheduling, alternating (default: 6)")
    p.add_argument("--threads", type=int, default=16, help="torch CPU threads (default: 16)")
    p.add_argument("--out", required=True, help="folder for profile.json and the kernel tables")
    return p.parse_args(argv)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def kernel_times(prof: Any, on_gpu: bool) -> tuple[dict[str, float], list[tuple[str, int, float]]]:
    """Per kind, and the top 25 names, of the kernels' time in ms (summed over streams); on the CPU the ops' self time.

    On the GPU only device events count (kernels, copies): an op's row repeats its kernels' time.
    """
    from torch.autograd import DeviceType

    per_kind: dict[str, float] = {}
    rows = []
    for ev in prof.key_averages():
        if on_gpu and getattr(ev, "device_type", None) != DeviceType.CUDA:
            continue
        ms = (getattr(ev, "self_device_time_total", 0.0) if on_gpu else ev.self_cpu_time_total) / 1e3
        if ms <= 0:
            continue
        per_kind[kind_of(ev.key)] = per_kind.get(kind_of(ev.key), 0.0) + ms
        rows.append((ev.key, int(ev.count), ms))
    rows.sort(key=lambda r: -r[2])
    return dict(sorted(per_kind.items(), key=lambda kv: -kv[1])), rows[:25]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from flexlora_plugin.core import aggregation

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    torch.set_num_threads(args.threads)
    hidden, inter, clients = (256, 688, 12) if args.quick else (2048, 5504, 80)
    setting = bench.with_ranks(bench.Setting(name="80-clients", n_clients=clients, n_modules=10, hidden=hidden, inter=inter,
                                             ranks="profile:heavy_tail_strong", device=args.device))  # fmt: skip
    states, weights, rank_maps = bench.make_federation(setting)
    if on_gpu:  # as a server that receives each reply into page-locked memory: the (cp) variant
        states = [{k: t.pin_memory() for k, t in s.items()} for s in states]
    bench.warm_up_libraries(args.device, core=True)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
                              "core": bench.core_version(), "clients": clients, "runs": {}}  # fmt: skip
    if on_gpu:
        flat = [t for s in states for t in s.values()]
        bound = []
        for _ in range(3):
            phases: dict[str, float] = {}
            bench.run_transfer(states, flat, phases, args.device)
            bound.append(phases["pinned -> device"])
        report["transfer bound [s]"] = statistics.median(bound)
    schedulings = {"priorities": True, "one stream": False}
    for flag in schedulings.values():  # one warm-up run each: stream pools, allocator caches
        aggregation._PRIORITIES = flag
        bench.run_ours(states, weights, rank_maps, {}, args.device)
    times: dict[str, list[float]] = {name: [] for name in schedulings}
    phases_of: dict[str, list[dict[str, float]]] = {name: [] for name in schedulings}
    for _ in range(args.reps):
        for name, flag in schedulings.items():
            aggregation._PRIORITIES = flag
            phases = {}
            t0 = time.perf_counter()
            bench.run_ours(states, weights, rank_maps, phases, args.device)
            times[name].append(time.perf_counter() - t0)
            phases_of[name].append(phases)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    lines = [f"# GPU server-step profile ({report['device']}, torch {report['torch']}, core {report['core']})", ""]
    bound_s = report.get("transfer bound [s]")
    for name, flag in schedulings.items():
        aggregation._PRIORITIES = flag
        with profile(activities=activities) as prof:
            bench.run_ours(states, weights, rank_maps, {}, args.device)
        per_kind, top = kernel_times(prof, on_gpu)
        median = statistics.median(times[name])
        timeline = {k: statistics.median(p[k] for p in phases_of[name]) for k in phases_of[name][0]}
        report["runs"][name] = {"times [s]": times[name], "median [s]": median, "phases median [s]": timeline,
                                "kernel ms by kind": per_kind, "top kernels": top}  # fmt: skip
        ratio = f", {median / bound_s:.2f}× the transfer bound ({bound_s * 1e3:.1f} ms)" if bound_s else ""
        lines += [f"## {name}: median {median * 1e3:.1f} ms{ratio}", "",
                  "runs [ms]: " + ", ".join(f"{t * 1e3:.1f}" for t in times[name]),
                  "phases (median, ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in timeline.items()), "",
                  "| kernels (one profiled run, summed over streams) | ms |", "|---|---:|"]  # fmt: skip
        lines += [f"| {kind} | {ms:.1f} |" for kind, ms in per_kind.items()]
        lines += ["", "| top kernels | calls | ms |", "|---|---:|---:|"]
        lines += [f"| `{key[:90]}` | {count} | {ms:.2f} |" for key, count, ms in top]
        lines.append("")
    aggregation._PRIORITIES = True
    (out / "profile.json").write_text(json.dumps(report, indent=1))
    (out / "profile.md").write_text("\n".join(lines))
    print("\n".join(line for line in lines if not line.startswith("| `")))


if __name__ == "__main__":
    main()
