#!/usr/bin/env python
"""FlexLoRA server aggregation: the published reference vs a dense baseline vs this core.

One run compares three variants on the *same* random client adapters (regenerated
deterministically from ``--seed`` in each variant's own subprocess):

(a) ``reference``: the published FlexLoRA code (FederatedScope, branch ``FlexLoRA``:
    ``fed_utils/model_aggregation.py::FlexLoRA`` then ``fed_utils/adaptive_peft.py::
    distribute_weight_fast``), rewritten without file I/O: client by client, module by module,
    ``(B @ A) * (alpha/r) * p_k`` is added into dense running sums held for all modules at once;
    then per module a full thin SVD (``torch.linalg.svd(full_matrices=False)``; the original
    calls the deprecated ``torch.svd``) and, for every entry of the federation's rank list (one
    per client, not deduplicated), ``lora_B = U_r diag(S_r) / (alpha/r)``, ``lora_A = V_rᵀ`` (a
    view, as in the original).
(b) ``dense``: a competent dense implementation: fp32, one module's ΔW at a time (``addmm_``),
    thin SVD, one projection per distinct rank.
(c) ``ours``: ``flexlora_plugin.core.aggregate(..., max_rank=r_max)`` then ``update.project``
    once per distinct rank map of the federation.

Per variant: extra peak memory (VmHWM after the first run minus VmRSS once the inputs exist,
after ``/proc/self/clear_refs`` reset the high-water mark), and the median of ``--reps`` timed
runs after that first (warm-up) run. The exactness gap
``(‖ΔW - s·B·A‖_F - ‖ΔW - [ΔW]_r‖_F) / ‖ΔW‖_F`` is computed in the parent process in float64 on
two sample modules, from the factors each variant saved. Results: docs/performance.md.

Usage::

    python benchmarks/bench_aggregation.py             # full run (about 15 min on 2 cores)
    python benchmarks/bench_aggregation.py --quick     # smoke run, small shapes (< 40 s)
    python benchmarks/bench_aggregation.py --device cuda --threads 16   # GPU: (t), (b), (c0), (c); 80 clients
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ALPHA = 16.0
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
VARIANTS = ("reference", "dense", "ours-default", "ours", "transfer", "ours-default-pinned", "ours-pinned")
DEFAULT_VARIANTS = ("reference", "dense", "ours-default", "ours")
CUDA_VARIANTS = ("transfer", "dense", "ours-default", "ours", "ours-default-pinned", "ours-pinned")
OURS = ("ours-default", "ours", "ours-default-pinned", "ours-pinned")
LABELS = {
    "reference": "(a) reference (FederatedScope FlexLoRA)",
    "dense": "(b) dense baseline (addmm + thin SVD)",
    "ours-default": "(c0) ours, default call (no max_rank, ranks smallest first)",
    "ours": "(c) ours, as the hosts call it (max_rank)",
    "transfer": "(t) transfer alone: every factor host -> device (pinned)",
    "ours-default-pinned": "(c0p) (c0), factors received into pinned memory",
    "ours-pinned": "(cp) (c), factors received into pinned memory",
}
TARGETS = {"speed_vs_dense_80": 1.5, "mem_vs_reference_80": 10.0, "speed_vs_dense_small": 20.0, "exact": 1e-5}
Pair = tuple[Tensor, Tensor]  # (A : (r, d_in), B : (d_out, r))


# --------------------------------------------------------------------------- federation


@dataclass(frozen=True)
class Setting:
    """One benchmark setting; serialised to JSON for the variant subprocesses."""

    name: str
    n_clients: int
    n_modules: int
    hidden: int  # d of the attention projections (d x d)
    inter: int  # MLP width: gate/up are (inter, hidden), down is (hidden, inter)
    ranks: str  # "profile:<name>" (sample_ranks) or "choice:4,8,16" (one rank per client)
    seed: int = 0
    device: str = "cpu"
    scale: float = 0.02
    reps: int = 3
    threads: int = 2
    check: tuple[str, ...] = field(default=())
    rank_table: tuple[tuple[int, ...], ...] = field(default=())  # client x module, filled by with_ranks()

    def modules(self) -> list[tuple[str, tuple[int, int]]]:
        """Full peft module names with ``(d_out, d_in)``: q,k,v,o,gate,up,down of layer 0, 1, ..."""
        h, i = self.hidden, self.inter
        shapes = {**dict.fromkeys(ATTN, (h, h)), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        out: list[tuple[str, tuple[int, int]]] = []
        for layer in range(-(-self.n_modules // len(shapes))):
            for short, shape in shapes.items():
                block = "self_attn" if short in ATTN else "mlp"
                out.append((f"base_model.model.model.layers.{layer}.{block}.{short}", shape))
        return out[: self.n_modules]

    def sample_modules(self) -> list[str]:
        """The two modules of the exactness check: the first q_proj (square) and gate_proj (tall)."""
        names = [m for m, _ in self.modules()]
        picks = [next((m for m in names if m.endswith(s)), None) for s in ("q_proj", "gate_proj")]
        chosen = [m for m in picks if m is not None]
        return chosen if len(chosen) == 2 else [names[0], names[-1]]


def with_ranks(setting: Setting) -> Setting:
    """``setting`` with its rank table (drawn in the parent, so the variant subprocesses of
    (a) and (b) never import the package) and its two exactness-check modules."""
    from flexlora_plugin.core import sample_ranks

    modules = setting.modules()
    kind, _, arg = setting.ranks.partition(":")
    table = []
    for k in range(setting.n_clients):
        if kind == "profile":  # the profile's pattern map, resolved and clamped onto these modules
            table.append(tuple(sample_ranks(arg, k, seed=0, shapes=dict(modules)).values()))
        elif kind == "choice":
            r = random.Random(f"rank:{setting.seed}:{k}").choice([int(x) for x in arg.split(",")])
            table.append(tuple(min(r, min(shape)) for _, shape in modules))
        else:
            raise ValueError(f"unknown rank rule {setting.ranks!r}")
    return Setting(**{**asdict(setting), "rank_table": tuple(table), "check": tuple(setting.sample_modules())})


def client_ranks(setting: Setting, k: int) -> dict[str, int]:
    """Client ``k``'s rank per full module name (clamped to ``min(d_out, d_in)``)."""
    return {m: r for (m, _), r in zip(setting.modules(), setting.rank_table[k], strict=True)}


def client_weight(setting: Setting, k: int) -> float:
    """A random sample count in [100, 5000], fixed by (seed, client)."""
    return float(random.Random(f"weight:{setting.seed}:{k}").randint(100, 5000))


def client_factors(setting: Setting, k: int, only: Sequence[str] | None = None) -> dict[str, Pair]:
    """Client ``k``'s ``(A, B)`` per module, N(0, scale²) entries, seeded per (seed, client, module)."""
    ranks = client_ranks(setting, k)
    out: dict[str, Pair] = {}
    for j, (module, (d_out, d_in)) in enumerate(setting.modules()):
        if only is not None and module not in only:
            continue
        g = torch.Generator().manual_seed(setting.seed * 1_000_003 + k * 1009 + j)
        A = torch.randn(ranks[module], d_in, generator=g).mul_(setting.scale)
        B = torch.randn(d_out, ranks[module], generator=g).mul_(setting.scale)
        out[module] = (A, B)
    return out


def make_federation(setting: Setting) -> tuple[list[dict[str, Tensor]], list[float], list[dict[str, int]]]:
    """Peft-format state dicts, weights and rank maps of every client."""
    states, weights, rank_maps = [], [], []
    for k in range(setting.n_clients):
        state: dict[str, Tensor] = {}
        for module, (A, B) in client_factors(setting, k).items():
            state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = A, B
        states.append(state)
        weights.append(client_weight(setting, k))
        rank_maps.append(client_ranks(setting, k))
    return states, weights, rank_maps


def distinct_rank_maps(rank_maps: Sequence[dict[str, int]]) -> list[dict[str, int]]:
    seen: dict[tuple[tuple[str, int], ...], dict[str, int]] = {}
    for rm in rank_maps:
        seen.setdefault(tuple(sorted(rm.items())), rm)
    return list(seen.values())


# --------------------------------------------------------------------------- the three variants
# Each returns (kept, table): ``kept`` is everything the variant holds at its end (results
# included); ``table`` maps (module, rank) -> (A, B) for the exactness check.


def run_reference(states: Sequence[dict[str, Tensor]], weights: Sequence[float], phases: dict[str, float]) -> tuple[Any, Any]:
    """FederatedScope FlexLoRA(): dense running sums of all modules, then distribute_weight_fast()."""
    t0 = time.perf_counter()
    p = [w / sum(weights) for w in weights]  # the original: normalize(weights, p=1)
    weighted_single_weights: dict[str, Tensor] = {}
    rank_dict: dict[str, list[int]] = {}
    with torch.no_grad():
        for k, single_weights in enumerate(states):
            for key in single_weights:
                if "lora_A" not in key:
                    continue
                B_key = key.replace("lora_A", "lora_B")
                rank = single_weights[B_key].shape[1]
                merge_rate = ALPHA / rank
                new_key = key.split(".lora_A")[0]
                merged_weight = (single_weights[B_key] @ single_weights[key]) * merge_rate * p[k]
                if new_key in weighted_single_weights:
                    weighted_single_weights[new_key] += merged_weight
                else:  # the original starts from the int 0: `0 + merged` is a new tensor too
                    weighted_single_weights[new_key] = merged_weight
                del merged_weight
                rank_dict.setdefault(new_key, []).append(rank)  # the config's per-client rank list
        t1 = time.perf_counter()
        weight_dict: dict[tuple[str, int], Pair] = {}
        for key, delta in weighted_single_weights.items():
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # original: torch.svd (deprecated)
            for rank in rank_dict[key]:  # one entry per client, not deduplicated
                lora_B = (u[:, :rank] @ torch.diag(s[:rank])) / (ALPHA / rank)
                lora_A = vh[:rank, :]  # a view of vh, as v.T[:rank, :] in the original
                weight_dict[(key, rank)] = (lora_A, lora_B)
    phases["accumulate"] = t1 - t0
    phases["svd+project"] = time.perf_counter() - t1
    return (weighted_single_weights, weight_dict), weight_dict


def run_dense(
    states: Sequence[dict[str, Tensor]], weights: Sequence[float], phases: dict[str, float], device: str = "cpu"
) -> tuple[Any, Any]:
    """One dense ΔW at a time (addmm_), thin SVD, one projection per distinct rank; on ``device``
    each factor is copied there as it is used and the results come back to the host."""
    t_acc = t_svd = 0.0
    t0 = time.perf_counter()
    terms: dict[str, list[tuple[float, Tensor, Tensor]]] = {}
    for w, state in zip(weights, states, strict=True):
        for key, A in state.items():
            if key.endswith(".lora_A.weight"):
                module = key[: -len(".lora_A.weight")]
                terms.setdefault(module, []).append((w, A, state[f"{module}.lora_B.weight"]))
    out: dict[tuple[str, int], Pair] = {}
    with torch.no_grad():
        for module, held in terms.items():
            t1 = time.perf_counter()
            total = sum(w for w, _, _ in held)
            delta = torch.zeros(held[0][2].shape[0], held[0][1].shape[1], device=device)
            for w, A, B in held:
                delta.addmm_(B.to(device), A.to(device), alpha=w / total * ALPHA / A.shape[0])
            sync(device)
            t2 = time.perf_counter()
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            del delta
            for r in sorted({A.shape[0] for _, A, _ in held}):
                out[(module, r)] = (Vh[:r].cpu(), (U[:, :r] * (S[:r] / (ALPHA / r))).cpu())
            del U, S, Vh
            t_acc, t_svd = t_acc + (t2 - t1), t_svd + (time.perf_counter() - t2)
    phases["accumulate"], phases["svd+project"] = t_acc, t_svd
    phases["parse"] = time.perf_counter() - t0 - t_acc - t_svd
    return out, out


def run_ours(
    states: Sequence[dict[str, Tensor]],
    weights: Sequence[float],
    rank_maps: Sequence[dict[str, int]],
    phases: dict[str, float],
    device: str = "cpu",
    default_call: bool = False,
) -> tuple[Any, Any]:
    """``aggregate(max_rank=r_max)`` then ``project`` once per distinct rank map; with
    ``default_call`` as a user calls it: no ``max_rank``, rank maps smallest first."""
    from flexlora_plugin.core import aggregate

    t0 = time.perf_counter()
    maps = distinct_rank_maps(rank_maps)
    r_max = max(max(rm.values()) for rm in maps)
    on = None if device == "cpu" else device
    spans: list[tuple[float, float]] = []
    with worker_spans(spans):
        if default_call:
            maps = sorted(maps, key=lambda rm: (max(rm.values()), sum(rm.values())))
            update = aggregate(states, weights, lora_alpha=ALPHA, device=on)
        else:
            update = aggregate(states, weights, lora_alpha=ALPHA, max_rank=r_max, device=on)
    sync(device)
    t1 = time.perf_counter()
    outs = [update.project(rm, lora_alpha=ALPHA) for rm in maps]
    phases["aggregate (validate" + (", stage" if on else "") + ")"] = t1 - t0
    phases["project (ΔW + spectrum + factors)"] = time.perf_counter() - t1
    if spans:  # CUDA: when the modules were handed to the worker threads, and when the last one finished
        phases["workers: first start"] = min(a for a, _ in spans) - t0
        phases["workers: last start"] = max(a for a, _ in spans) - t0
        phases["workers: last end"] = max(e for _, e in spans) - t0
    table = {
        (m, rm[m]): (out[f"{m}.lora_A.weight"], out[f"{m}.lora_B.weight"]) for rm, out in zip(maps, outs, strict=True) for m in rm
    }
    return (update, outs), table


@contextlib.contextmanager
def worker_spans(into: list[tuple[float, float]]) -> Iterator[None]:
    """Append ``(start, end)`` of every module's worker job inside ``aggregate`` (the CUDA path's
    ``_ModuleRunner``) to ``into``: the timeline behind the GPU ratios. Records nothing on the CPU,
    where modules run inline, or if the core no longer has that hook."""
    from flexlora_plugin.core import aggregation

    runner = getattr(aggregation, "_ModuleRunner", None)
    real = getattr(runner, "_on_stream", None)
    if real is None:
        yield
        return

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return real(self, *args, **kwargs)
        finally:
            into.append((start, time.perf_counter()))

    runner._on_stream = timed  # type: ignore[union-attr]
    try:
        yield
    finally:
        runner._on_stream = real  # type: ignore[union-attr]


# --------------------------------------------------------------------------- the variant subprocess


def proc_status(field_name: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current VmRSS


def warm_up_libraries(device: str = "cpu", core: bool = False) -> None:
    """Touch every BLAS/LAPACK routine once on tiny inputs, so their code pages (and on CUDA the
    context, cuBLAS and cuSOLVER handles) are in the baseline. With ``core``, also the core's own
    top-k eigensolvers (scipy's LAPACK ``syevr``, and ``sspevx`` on a packed Gram matrix from
    slabs: their imports and their BLAS's thread buffers)."""
    x = torch.randn(64, 48, device=device)
    if core:
        from flexlora_plugin.core.projection import gram_basis, gram_of
        from flexlora_plugin.core.terms import TermList

        gram_basis(gram_of(x.cpu()), 4)
        gram_basis(TermList([(0.5, x[:, :8].cpu(), x[:8].cpu())], (64, 48)).gram(torch.float32, None), 4)
    torch.zeros(64, 48, device=device).addmm_(x[:, :8], x[:8], alpha=0.5)
    torch.linalg.svd(x, full_matrices=False)
    torch.linalg.svd(x.T, full_matrices=False)
    torch.linalg.qr(x)
    torch.linalg.eigh(x.T @ x)
    torch.linalg.svdvals(x.double())
    if core:  # the filtered solver's small float64 steps (core/topk.py)
        g = (x.T @ x).double()
        torch.linalg.eigh(g)
        torch.linalg.solve_triangular(torch.linalg.cholesky_ex(g)[0], g, upper=False)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_transfer(
    states: Sequence[dict[str, Tensor]], pinned: Sequence[Tensor], phases: dict[str, float], device: str
) -> tuple[Any, Any]:
    """The bound: every factor's bytes from pinned host memory to ``device``, asynchronous, one sync.
    Also timed: the same from the pageable tensors (as a server receives them), for reference."""
    t0 = time.perf_counter()
    on_device = [t.to(device, non_blocking=True) for t in pinned]
    sync(device)
    t1 = time.perf_counter()
    del on_device
    pageable = [t.to(device, non_blocking=True) for s in states for t in s.values()]
    sync(device)
    phases["pinned -> device"] = t1 - t0
    phases["pageable -> device"] = time.perf_counter() - t1
    del pageable
    return None, {}


def run_variant(
    variant: str, states: Any, weights: Any, rank_maps: Any, phases: dict[str, float], device: str = "cpu", pinned: Any = None
) -> tuple[Any, Any]:
    """One run of ``variant``; ``*-pinned`` variants are given states whose tensors are page-locked (see child_main)."""
    if variant == "reference":
        return run_reference(states, weights, phases)
    if variant == "dense":
        return run_dense(states, weights, phases, device)
    if variant == "transfer":
        return run_transfer(states, pinned, phases, device)
    return run_ours(states, weights, rank_maps, phases, device, default_call=variant.startswith("ours-default"))


def child_main(variant: str, spec_path: str, out_path: str) -> None:
    """Generate the inputs, measure one run's memory, then time ``reps`` runs; write JSON + factors."""
    from safetensors.torch import save_file

    spec = json.loads(Path(spec_path).read_text())
    setting = Setting(**{**spec, "check": tuple(spec["check"]), "rank_table": tuple(map(tuple, spec["rank_table"]))})
    torch.set_num_threads(setting.threads)
    device = setting.device
    if variant.startswith("ours"):
        import flexlora_plugin.core  # noqa: F401  (imported before the baseline, as (a)/(b) import nothing)
    t_gen = time.perf_counter()
    states, weights, rank_maps = make_federation(setting)
    t_gen = time.perf_counter() - t_gen
    warm_up_libraries(device, core=variant.startswith("ours"))
    pinned = [t.pin_memory() for s in states for t in s.values()] if variant == "transfer" else None
    if variant.endswith("-pinned"):  # as a server that copies each reply into page-locked memory on arrival
        states = [{k: t.pin_memory() for k, t in s.items()} for s in states]
    gc.collect()
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    device_base = torch.cuda.memory_allocated() if device != "cpu" else 0
    reset_peak()
    baseline = proc_status("VmRSS")
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    kept, table = run_variant(variant, states, weights, rank_maps, phases, device, pinned)
    first = time.perf_counter() - t0
    hwm = proc_status("VmHWM")
    device_peak = torch.cuda.max_memory_allocated() - device_base if device != "cpu" else 0
    save_file(sample_factors(setting, table), out_path + ".safetensors")
    del kept, table
    gc.collect()
    times, rep_phases = [], []
    for _ in range(setting.reps):
        ph: dict[str, float] = {}
        t0 = time.perf_counter()
        kept, table = run_variant(variant, states, weights, rank_maps, ph, device, pinned)
        times.append(ph["pinned -> device"] if variant == "transfer" else time.perf_counter() - t0)
        rep_phases.append(ph)
        del kept, table
        gc.collect()
    result = {
        "variant": variant,
        "times": times,
        "median": statistics.median(times),
        "first_run": first,
        "phases_first": phases,
        "phases_median": {k: statistics.median(p[k] for p in rep_phases) for k in rep_phases[0]} if rep_phases else {},
        "baseline_rss": baseline,
        "hwm": hwm,
        "extra_peak": hwm - baseline,
        "hwm_end": proc_status("VmHWM"),
        "input_bytes": sum(t.numel() * t.element_size() for s in states for t in s.values()),
        "generate_s": t_gen,
        "threads": torch.get_num_threads(),
        "device": device,
        "device_extra_peak": device_peak,
    }
    if variant == "ours" and device == "cpu":
        result.update(time_delta_phase(setting, states, weights, rank_maps))
    Path(out_path + ".json").write_text(json.dumps(result))


def time_delta_phase(setting: Setting, states: Any, weights: Any, rank_maps: Any) -> dict[str, Any]:
    """Extra measurement: ``update.delta(m)`` (the dense path's ΔW accumulation) timed on its own,
    right after this process's own GEMM throughput measurement."""
    from flexlora_plugin.core import aggregate

    r_max = max(max(rm.values()) for rm in rank_maps)
    update = aggregate(states, weights, lora_alpha=ALPHA, max_rank=r_max)
    dense = [m for m in update.modules if not update.uses_factored_path(m)]
    gemm = gemm_peak(setting.threads, gemm_shape(setting.hidden, setting.inter), reps=3)
    flops, seconds = 0.0, 0.0
    for m in dense:
        d_out, d_in = update.info[m].shape
        flops += 2.0 * d_out * d_in * update.stacked_rank(m)
        t0 = time.perf_counter()
        delta = update.delta(m)
        seconds += time.perf_counter() - t0
        del delta
    return {
        "dense_modules": len(dense),
        "factored_modules": len(update.modules) - len(dense),
        "delta_flops": flops,
        "delta_s": seconds,
        "gemm_here": gemm,
    }


# --------------------------------------------------------------------------- parent: orchestration


def core_version() -> str:
    """``git`` HEAD of the checkout and any uncommitted change under flexlora_plugin/core/."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "flexlora_plugin/core"], cwd=root, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    changed = [line[3:] for line in dirty.stdout.splitlines()]
    return f"{head}" + (f" with uncommitted changes to {', '.join(changed)}" if changed else " (flexlora_plugin/core clean)")


def gemm_shape(hidden: int, inter: int) -> tuple[int, int, int]:
    """The GEMM of the throughput reference: ``(hidden, 2·hidden) @ (2·hidden, inter)``."""
    return hidden, 2 * hidden, inter


def gemm_peak(threads: int, shape: tuple[int, int, int], reps: int = 5) -> dict[str, float]:
    """fp32 GEMM throughput ``(m, k) @ (k, n)`` in GFLOP/s: best and median of ``reps`` after a warm-up."""
    torch.set_num_threads(threads)
    m, k, n = shape
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        rates.append(2.0 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return {"best": max(rates), "median": statistics.median(rates)}


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine incl. steal, CPU seconds of this process and its waited children)."""
    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:9]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    own = sum(
        resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return busy, own


def spawn(variant: str, setting: Setting, tmp: Path, timeout: float) -> dict[str, Any]:
    """Run one variant in its own subprocess; also record the CPU that *other* processes used meanwhile."""
    spec = tmp / f"{setting.name}.spec.json"
    spec.write_text(json.dumps(asdict(setting)))
    out = str(tmp / f"{setting.name}.{variant}")
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--spec", str(spec), "--out", out]
    (busy0, own0), t0 = cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    (busy1, own1), wall = cpu_seconds(), time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant} ({setting.name}) exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    result = json.loads(Path(out + ".json").read_text())
    result["factors"] = out + ".safetensors"
    result["other_load"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / wall  # cores busy with other processes
    return result


def sample_factors(setting: Setting, table: dict[tuple[str, int], Pair]) -> dict[str, Tensor]:
    """The check modules' factors of ``table`` as ``{"module|r|A": A, …}``, on the CPU, contiguous clones
    (factors may be views of one another)."""
    return {
        f"{m}|{r}|{n}": t.detach().cpu().clone(memory_format=torch.contiguous_format)
        for (m, r), pair in table.items()
        if m in setting.check
        for n, t in zip("AB", pair, strict=True)
    }


def exactness(setting: Setting, results: dict[str, dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Per variant and rank, the max over the sample modules of the float64 exactness gap."""
    from safetensors.torch import load_file

    return exactness_of(setting, {v: load_file(res["factors"]) for v, res in results.items()})


def exactness_of(setting: Setting, loaded: dict[str, dict[str, Tensor]]) -> dict[str, dict[int, float]]:
    """:func:`exactness` of factors in memory: per variant ``{"module|r|A": A, "module|r|B": B}``."""
    modules = dict(setting.modules())
    gaps: dict[str, dict[int, float]] = {v: {} for v in loaded}
    weights = [client_weight(setting, k) for k in range(setting.n_clients)]
    for module in setting.check:
        delta = torch.zeros(modules[module], dtype=torch.float64)
        for k in range(setting.n_clients):
            A, B = client_factors(setting, k, only=[module])[module]
            delta.addmm_(B.double(), A.double(), alpha=weights[k] / sum(weights) * ALPHA / A.shape[0])
        sv2 = torch.linalg.svdvals(delta) ** 2
        norm = float(sv2.sum().sqrt())
        for v, factors in loaded.items():
            for key in factors:
                m, r, name = key.split("|")
                if m != module or name != "A":
                    continue
                A, B = factors[key].double(), factors[f"{m}|{r}|B"].double()
                err = float(torch.linalg.matrix_norm(delta - (ALPHA / int(r)) * (B @ A)))
                opt = float(sv2[int(r) :].sum().sqrt())
                gaps[v][int(r)] = max(gaps[v].get(int(r), -math.inf), (err - opt) / norm)
    return gaps


def run_setting(
    setting: Setting, variants: Sequence[str], tmp: Path, timeout: float, log: Callable[[str], None]
) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {}
    for v in variants:
        t0 = time.perf_counter()
        results[v] = spawn(v, setting, tmp, timeout)
        log(
            f"[{setting.name}] {v}: median {results[v]['median']:.2f} s, extra peak {results[v]['extra_peak'] / 2**20:.0f} MiB "
            f"(subprocess {time.perf_counter() - t0:.0f} s)"
        )
    t0 = time.perf_counter()
    gaps = exactness(setting, results)
    log(f"[{setting.name}] exactness check: {time.perf_counter() - t0:.0f} s")
    ranks = [client_ranks(setting, k) for k in range(setting.n_clients)]
    stacked = [sum(rm[m] for rm in ranks) for m, _ in setting.modules()]
    distinct = sorted({r for rm in ranks for r in rm.values()})
    out_floats = sum((d_out + d_in) * sum(sorted({rm[m] for rm in ranks})) for m, (d_out, d_in) in setting.modules())
    rmax_floats = sum((d_out + d_in) * max(rm[m] for rm in ranks) for m, (d_out, d_in) in setting.modules())
    return {
        "setting": asdict(setting),
        "results": results,
        "gaps": gaps,
        "stacked_rank": [min(stacked), max(stacked)],
        "distinct_ranks": distinct,
        "output_bytes": 4 * out_floats,
        "rmax_bytes": 4 * rmax_floats,
    }


# --------------------------------------------------------------------------- report


def mib(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def setting_table(name: str, run: dict[str, Any]) -> list[str]:
    s, res, gaps = run["setting"], run["results"], run["gaps"]
    on_gpu = s.get("device", "cpu") != "cpu"
    lines = [
        f"### Setting `{name}`: {s['n_clients']} clients, {s['n_modules']} modules "
        f"(hidden {s['hidden']}, MLP {s['inter']}), ranks `{s['ranks']}`, device `{s.get('device', 'cpu')}`",
        "",
        f"Stacked rank R = Σ r_k per module: {run['stacked_rank'][0]}–{run['stacked_rank'][1]}; distinct ranks "
        f"{run['distinct_ranks']}; client factors in memory: {mib(next(iter(res.values()))['input_bytes'])} MiB.",
        "",
        "| variant | median time [s] | runs [s] | extra peak [MiB] | VmHWM [MiB] | baseline RSS [MiB] | max exactness gap | other load [cores] |"
        + (" device extra peak [MiB] |" if on_gpu else ""),
        "|---|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if on_gpu else ""),
    ]
    for v, r in res.items():
        runs = ", ".join(f"{t:.3f}" if on_gpu else f"{t:.2f}" for t in r["times"])
        gap = f"{max(gaps[v].values()):.1e}" if gaps[v] else "-"
        median = f"{r['median']:.3f}" if on_gpu else f"{r['median']:.2f}"
        lines.append(
            f"| {LABELS[v]} | {median} | {runs} | {mib(r['extra_peak'])} | {mib(r['hwm'])} | "
            f"{mib(r['baseline_rss'])} | {gap} | {r['other_load']:.2f} |"
            + (f" {mib(r.get('device_extra_peak', 0))} |" if on_gpu else "")
        )
    gaps = {v: g for v, g in gaps.items() if g}
    ranks = sorted({r for g in gaps.values() for r in g})
    lines += [
        "",
        "Exactness gap per rank (max over the sample modules "
        + ", ".join(f"`{m.split('model.')[-1]}`" for m in s["check"])
        + "):",
        "",
    ]
    lines += ["| variant | " + " | ".join(f"r={r}" for r in ranks) + " |", "|---|" + "---:|" * len(ranks)]
    lines += [f"| {LABELS[v]} | " + " | ".join(f"{g[r]:.1e}" for r in ranks) + " |" for v, g in gaps.items()]
    lines += [
        "",
        "Phases (median of the timed runs, s): "
        + "; ".join(f"{v}: " + ", ".join(f"{k} {t:.3f}" for k, t in r["phases_median"].items()) for v, r in res.items()),
    ]
    return lines


def ratios(run: dict[str, Any]) -> dict[str, float]:
    res = run["results"]
    out: dict[str, float] = {}
    for ours in OURS:
        if ours not in res:
            continue
        for v in ("reference", "dense"):
            if v in res:
                out[f"speed {v}/{ours}"] = res[v]["median"] / res[ours]["median"]
                out[f"extra peak {v}/{ours}"] = res[v]["extra_peak"] / max(res[ours]["extra_peak"], 1)
        if "transfer" in res:
            out[f"time {ours}/transfer bound"] = res[ours]["median"] / res["transfer"]["median"]
    if "reference" in res and "ours" in res:
        out["bound: extra peak reference / r_max factors"] = res["reference"]["extra_peak"] / run["rmax_bytes"]
        out["bound: extra peak reference / all kept factors"] = res["reference"]["extra_peak"] / run["output_bytes"]
    return out


def target_lines(runs: dict[str, dict[str, Any]], quick: bool) -> list[str]:
    rows = []
    big, small = runs.get("80-clients"), runs.get("small-rank")
    if big is not None:
        r = ratios(big)
        on_gpu = big["setting"].get("device", "cpu") != "cpu"
        where = " (GPU)" if on_gpu else ""
        if "speed dense/ours-default" in r:
            v = r["speed dense/ours-default"]
            rows.append(
                (f"80 clients{where}: default call ≥ 1.5× faster than (b)", f"{v:.2f}×", v >= TARGETS["speed_vs_dense_80"])
            )
        for ours in OURS:
            if f"time {ours}/transfer bound" in r:
                v = r[f"time {ours}/transfer bound"]
                rows.append((f"80 clients (GPU): {LABELS[ours].split(' ')[0]} ≤ 2× the transfer bound", f"{v:.2f}×", v <= 2.0))
        if "speed dense/ours" in r and not on_gpu:
            rows.append(
                (
                    "80 clients: ≥ 1.5× faster than (b)",
                    f"{r['speed dense/ours']:.2f}×",
                    r["speed dense/ours"] >= TARGETS["speed_vs_dense_80"],
                )
            )
        if "extra peak reference/ours" in r and not on_gpu:
            v = r["extra peak reference/ours"]
            rows.append(("80 clients: ≥ 10× less extra peak memory than (a)", f"{v:.2f}×", v >= TARGETS["mem_vs_reference_80"]))
    if small is not None:
        r = ratios(small)
        if "speed dense/ours" in r:
            rows.append(
                (
                    "small-rank: ≥ 20× faster than (b)",
                    f"{r['speed dense/ours']:.1f}×",
                    r["speed dense/ours"] >= TARGETS["speed_vs_dense_small"],
                )
            )
    worst = max((g for run in runs.values() for gv in run["gaps"].values() for g in gv.values()), default=0.0)
    rows.append(("all variants exact to 1e-5", f"max gap {worst:.1e}", worst <= TARGETS["exact"]))
    lines = ["| target | measured | met? |", "|---|---:|---|"]
    lines += [f"| {t} | {m} | {'met' if ok else 'MISSED'} |" for t, m, ok in rows]
    if quick:
        lines += ["", "(--quick: small shapes; the targets apply to the full run only.)"]
    return lines


def report(
    runs: dict[str, dict[str, Any]], peak: dict[str, float], shape: tuple[int, int, int], wall: float, quick: bool, core: str
) -> str:
    lines = [
        f"## FlexLoRA aggregation benchmark ({'quick' if quick else 'full'} run)",
        "",
        f"Core: {core}; torch {torch.__version__}; {os.cpu_count()} CPUs.",
        "",
    ]
    for name, run in runs.items():
        lines += setting_table(name, run) + [""]
        lines += ["Ratios: " + "; ".join(f"{k} = {v:.2f}×" for k, v in ratios(run).items()), ""]
    m, k, n = shape
    lines.append(
        f"fp32 GEMM ({m}×{k} @ {k}×{n}, threads={torch.get_num_threads()}): best {peak['best']:.0f} GFLOP/s, median {peak['median']:.0f}."
    )
    for name, run in runs.items():
        o = run["results"].get("ours")
        if o is None or "dense_modules" not in o:
            continue
        if o["dense_modules"]:
            rate, best = o["delta_flops"] / o["delta_s"] / 1e9, max(peak["best"], o["gemm_here"]["best"])
            lines.append(
                f"{name}: (c) dense-path ΔW accumulation ({o['dense_modules']} modules, {o['delta_flops'] / 1e9:.0f} GFLOP "
                f"in {o['delta_s']:.2f} s): {rate:.0f} GFLOP/s = {rate / best:.0%} of the GEMM peak ({best:.0f} GFLOP/s, the best of "
                f"the parent's and the (c) subprocess's own measurement, {o['gemm_here']['best']:.0f}, taken just before)."
            )
        else:
            lines.append(f"{name}: (c) every module took the factored path (no dense ΔW formed).")
    lines += ["", *target_lines(runs, quick), "", f"Total wall time: {wall:.0f} s."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def settings_from(args: argparse.Namespace) -> list[Setting]:
    if args.quick:
        hidden, inter, big_n, small_n, mods, reps = 256, 688, 12, 4, 7, 3
    else:
        hidden, inter, big_n, small_n, mods, reps = (
            args.hidden,
            args.inter,
            args.clients,
            args.small_clients,
            args.modules,
            args.reps,
        )
    common = {
        "n_modules": mods,
        "hidden": hidden,
        "inter": inter,
        "seed": args.seed,
        "reps": reps,
        "threads": args.threads,
        "device": args.device,
    }
    out = []
    for name in args.settings.split(","):
        if name == "80-clients":
            out.append(Setting(name="80-clients", n_clients=big_n, ranks=f"profile:{args.profile}", **common))
        elif name == "small-rank":
            out.append(Setting(name="small-rank", n_clients=small_n, ranks="choice:4,8,16", **common))
        else:
            raise SystemExit(f"unknown setting {name!r}; choose from 80-clients, small-rank")
    return [with_ranks(s) for s in out]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (small shapes, few clients), < 30 s")
    p.add_argument("--settings", help="comma list of 80-clients, small-rank (default: both; --device cuda: 80-clients)")
    p.add_argument(
        "--variants",
        help=f"comma list of {', '.join(VARIANTS)} (default: {', '.join(DEFAULT_VARIANTS)}; --device cuda: {', '.join(CUDA_VARIANTS)})",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where (b), (c0), (c) compute; cuda also times (t), the transfer bound (default: cpu)",
    )
    p.add_argument("--clients", type=int, default=80, help="clients of the 80-clients setting (default: 80)")
    p.add_argument("--small-clients", type=int, default=10, help="clients of the small-rank setting (default: 10)")
    p.add_argument(
        "--modules", type=int, default=10, help="adapted modules: q,k,v,o,gate,up,down, layer after layer (default: 10)"
    )
    p.add_argument("--hidden", type=int, default=2048, help="attention width d (default: 2048, LLaMA-1B-like)")
    p.add_argument("--inter", type=int, default=5504, help="MLP width (default: 5504)")
    p.add_argument(
        "--profile", default="heavy_tail_strong", help="rank profile of the 80-clients setting (default: heavy_tail_strong)"
    )
    p.add_argument("--reps", type=int, default=3, help="timed runs after the warm-up run (default: 3)")
    p.add_argument(
        "--threads", type=int, help="torch threads in every variant (default: 2; --quick: 1, so a busy machine cannot stall it)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the client adapters (default: 0)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per variant subprocess (default: 1800)")
    p.add_argument("--json", help="also write every measurement to this JSON file")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    cuda = args.device == "cuda"
    if args.settings is None:
        args.settings = "80-clients" if cuda else "80-clients,small-rank"
    if args.variants is None:
        args.variants = ",".join(CUDA_VARIANTS if cuda else DEFAULT_VARIANTS)
    if cuda and not args.variant and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    if "transfer" in args.variants.split(",") and not cuda:
        raise SystemExit("(t) transfer times host -> GPU copies: it needs --device cuda")
    if "reference" in args.variants.split(",") and cuda:
        raise SystemExit("--device cuda: (a) reference is the published CPU code; leave it out of --variants")
    if args.variant:
        child_main(args.variant, args.spec, args.out)
        return
    variants = [v for v in args.variants.split(",") if v]
    if not set(variants) <= set(VARIANTS):
        raise SystemExit(f"unknown variant in {args.variants!r}; choose from {', '.join(VARIANTS)}")
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    core = core_version()  # at the start: the code the variant subprocesses import
    shape = gemm_shape(256, 688) if args.quick else gemm_shape(args.hidden, args.inter)
    peak = gemm_peak(args.threads, shape)
    log(f"fp32 GEMM {shape}: best {peak['best']:.0f} GFLOP/s")
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_aggregation_") as tmp:
        for setting in settings_from(args):
            runs[setting.name] = run_setting(setting, variants, Path(tmp), args.timeout, log)
    wall = time.perf_counter() - t_start
    print(report(runs, peak, shape, wall, args.quick, core))
    if args.json:
        Path(args.json).write_text(json.dumps({"core": core, "gemm": peak, "wall_s": wall, "runs": runs}, indent=1, default=str))


if __name__ == "__main__":
    main()
