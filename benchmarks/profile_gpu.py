"""Where a GPU server step spends its time: the hosts' call from page-locked factors, in one process.

The 80-client setting of ``bench_aggregation.py`` (same federation, same seed), factors pinned once:

1. the transfer bound (every factor host -> device, pinned, one sync);
2. ``reps`` runs of the hosts' call (``aggregate(max_rank)`` + ``project`` per distinct rank map),
   each run's time and worker timeline;
3. one run under ``torch.profiler``: kernel time summed per kind (GEMMs, the solver's float64
   eigendecompositions and Cholesky-QR, copies, the rest) and the top kernels.

With ``--sweep``, step 3 is replaced by the configurations of :data:`SWEEP` (the core's worker
count, filter degree and dtype, CUDA linear algebra library, and two combinations), alternating,
each with its float64 exactness gap, then the fastest one within :data:`TOLERANCE`: choices
compared in one process, on the same pinned inputs.

    PYTHONPATH=. python3 benchmarks/profile_gpu.py --out /tmp/profile            # ~1 min on an H100
    PYTHONPATH=. python3 benchmarks/profile_gpu.py --sweep --out /tmp/sweep      # ~1 min on an H100
    python benchmarks/profile_gpu.py --device cpu --quick --out /tmp/p            # smoke run on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
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
    p.add_argument("--reps", type=int, default=6, help="timed runs per configuration, alternating (default: 6)")
    p.add_argument("--threads", type=int, default=16, help="torch CPU threads (default: 16)")
    p.add_argument("--out", required=True, help="folder for profile.json and the kernel tables")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="instead of the profile: the configurations of SWEEP (worker count, "
        "filter degree and dtype, MAGMA), alternating, each with its exactness gap; writes sweep.json and sweep.md",
    )
    return p.parse_args(argv)


SWEEP = (  # name -> the core's scheduling knobs (:func:`scheduling`); the first is the default
    ("default", {}),
    ("4 workers", {"workers": 4}),
    ("8 workers", {"workers": 8}),
    ("10 workers", {"workers": 10}),
    ("filter degree 16", {"degree": 16}),
    ("MAGMA for eigh and Cholesky", {"linalg": "magma"}),
    ("filter in float64", {"filter_dtype": "float64"}),
    ("filter in float64, MAGMA", {"filter_dtype": "float64", "linalg": "magma"}),
    ("filter in float64, 8 workers", {"filter_dtype": "float64", "workers": 8}),
)
TOLERANCE = 1e-5  # the documented exactness tolerance (relative Frobenius gap): a faster configuration must stay within it


@contextlib.contextmanager
def scheduling(**knobs: Any) -> Iterator[None]:
    """The core's scheduling knobs set for one run, restored after: ``workers`` (CUDA worker threads),
    ``degree`` (Chebyshev degrees per filter round), ``filter_dtype`` (the filter's dtype by name,
    e.g. ``"float64"``: H100 float64 tensor-core GEMMs against float32 SIMT ones) and ``linalg``
    (torch's preferred CUDA linear algebra library, ``"cusolver"`` or ``"magma"``: the solver's
    float64 ``eigh`` and Cholesky)."""
    from flexlora_plugin.core import aggregation, topk

    where = {"workers": (aggregation, "_WORKERS"), "degree": (topk, "_DEGREE"), "filter_dtype": (topk, "_FILTER_DTYPE")}
    before = {name: getattr(*where[name]) for name in knobs if name in where}
    on_gpu = torch.cuda.is_available()  # the library choice means nothing to CPU runs (and needs a CUDA build)
    library = torch.backends.cuda.preferred_linalg_library() if "linalg" in knobs and on_gpu else None
    try:
        for name, value in knobs.items():
            if name == "linalg":
                if on_gpu:  # RuntimeError where torch was built without MAGMA
                    torch.backends.cuda.preferred_linalg_library(value)
            else:
                setattr(*where[name], getattr(torch, value) if name == "filter_dtype" else value)
        yield
    finally:
        for name, value in before.items():
            setattr(*where[name], value)
        if library is not None:
            torch.backends.cuda.preferred_linalg_library(library)


def timed(
    setting: Any, states: Any, weights: Any, rank_maps: Any, device: str, reps: int, configs: Sequence[tuple[str, dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    """Each configuration ``reps`` times, alternating, after one warm-up run each: times, median
    timeline, the check modules' factors of the last run. A configuration this torch cannot set
    (MAGMA missing) is left out, with a line on stderr."""
    usable = []
    for name, knobs in configs:  # warm-up: stream pools, allocator caches
        try:
            with scheduling(**knobs):
                bench.run_ours(states, weights, rank_maps, {}, device)
        except RuntimeError as err:
            if "MAGMA" not in str(err):
                raise
            print(f"{name}: left out ({err})", file=sys.stderr)
            continue
        usable.append((name, knobs))
    configs = usable
    runs: dict[str, dict[str, Any]] = {name: {"knobs": knobs, "times [s]": [], "phases": []} for name, knobs in configs}
    for _ in range(reps):
        for name, knobs in configs:
            phases: dict[str, float] = {}
            with scheduling(**knobs):
                t0 = time.perf_counter()
                _, table = bench.run_ours(states, weights, rank_maps, phases, device)
                runs[name]["times [s]"].append(time.perf_counter() - t0)
            runs[name]["phases"].append(phases)
            runs[name]["factors"] = bench.sample_factors(setting, table)
    for run in runs.values():
        phases_list = run.pop("phases")
        run["median [s]"] = statistics.median(run["times [s]"])
        run["phases median [s]"] = {k: statistics.median(p[k] for p in phases_list) for k in phases_list[0]}
    return runs


def sweep_lines(runs: dict[str, dict[str, Any]], bound_s: float | None) -> list[str]:
    """The sweep's table: time, ratio to the transfer bound, worker timeline, exactness gap."""
    keys = ["workers: first start", "workers: last start", "workers: last end"]
    lines = [
        "| configuration | median [ms] | × transfer bound | runs [ms] | first / last start, last end [ms] | max gap |",
        "|---|---:|---:|---|---|---:|",
    ]
    for name, run in runs.items():
        spans = " / ".join(f"{run['phases median [s]'][k] * 1e3:.1f}" for k in keys if k in run["phases median [s]"]) or "-"
        ratio = f"{run['median [s]'] / bound_s:.2f}×" if bound_s else "-"
        times = ", ".join(f"{t * 1e3:.1f}" for t in run["times [s]"])
        lines.append(
            f"| {name} | {run['median [s]'] * 1e3:.1f} | {ratio} | {times} | {spans} | {max(run['gaps'].values()):.1e} |"
        )
    return lines + ["", best_line(runs)]


def best_line(runs: dict[str, dict[str, Any]]) -> str:
    """The fastest configuration within :data:`TOLERANCE`, against the first (the default)."""
    default = next(iter(runs))
    exact = {name: run for name, run in runs.items() if max(run["gaps"].values()) <= TOLERANCE}
    if not exact:
        return f"No configuration stayed within the exactness tolerance {TOLERANCE:.0e}."
    best = min(exact, key=lambda name: exact[name]["median [s]"])
    saved = 1.0 - runs[best]["median [s]"] / runs[default]["median [s]"]
    return (
        f"Fastest within the exactness tolerance {TOLERANCE:.0e}: **{best}**, {saved:+.1%} of the {default}'s time "
        "saved (medians; a difference under the runs' spread is a tie)."
    )


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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    torch.set_num_threads(args.threads)
    hidden, inter, clients = (256, 688, 12) if args.quick else (2048, 5504, 80)
    setting = bench.with_ranks(
        bench.Setting(
            name="80-clients",
            n_clients=clients,
            n_modules=10,
            hidden=hidden,
            inter=inter,
            ranks="profile:heavy_tail_strong",
            device=args.device,
        )
    )
    states, weights, rank_maps = bench.make_federation(setting)
    if on_gpu:  # as a server that receives each reply into page-locked memory: the (cp) variant
        states = [{k: t.pin_memory() for k, t in s.items()} for s in states]
    bench.warm_up_libraries(args.device, core=True)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__,
        "core": bench.core_version(),
        "clients": clients,
    }
    if on_gpu:
        flat = [t for s in states for t in s.values()]
        bound = []
        for _ in range(3):
            phases: dict[str, float] = {}
            bench.run_transfer(states, flat, phases, args.device)
            bound.append(phases["pinned -> device"])
        report["transfer bound [s]"] = statistics.median(bound)
    bound_s = report.get("transfer bound [s]")
    runs = timed(setting, states, weights, rank_maps, args.device, args.reps, SWEEP if args.sweep else SWEEP[:1])
    gaps = bench.exactness_of(setting, {name: run.pop("factors") for name, run in runs.items()})
    for name, run in runs.items():
        run["gaps"] = gaps[name]
    report["runs"] = runs
    if args.sweep:
        lines = [
            f"# Scheduling sweep ({report['device']}, torch {report['torch']}, core {report['core']}; "
            f"transfer bound {(bound_s or 0.0) * 1e3:.1f} ms)",
            "",
            *sweep_lines(runs, bound_s),
        ]
        (out / "sweep.json").write_text(json.dumps(report, indent=1))
        (out / "sweep.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        bench.run_ours(states, weights, rank_maps, {}, args.device)
    per_kind, top = kernel_times(prof, on_gpu)
    run = runs["default"]
    run.update({"kernel ms by kind": per_kind, "top kernels": top})
    ratio = f", {run['median [s]'] / bound_s:.2f}× the transfer bound ({bound_s * 1e3:.1f} ms)" if bound_s else ""
    lines = [
        f"# GPU server-step profile ({report['device']}, torch {report['torch']}, core {report['core']})",
        "",
        f"median {run['median [s]'] * 1e3:.1f} ms{ratio}, max exactness gap {max(run['gaps'].values()):.1e}",
        "",
        "runs [ms]: " + ", ".join(f"{t * 1e3:.1f}" for t in run["times [s]"]),
        "phases (median, ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in run["phases median [s]"].items()),
        "",
        "| kernels (one profiled run, summed over streams) | ms |",
        "|---|---:|",
    ]
    lines += [f"| {kind} | {ms:.1f} |" for kind, ms in per_kind.items()]
    lines += ["", "| top kernels | calls | ms |", "|---|---:|---:|"]
    lines += [f"| `{key[:90]}` | {count} | {ms:.2f} |" for key, count, ms in top]
    (out / "profile.json").write_text(json.dumps(report, indent=1))
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(line for line in lines if not line.startswith("| `")))


if __name__ == "__main__":
    main()
