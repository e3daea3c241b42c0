#!/usr/bin/env python
"""One FlexLoRA client round through the plugin's own path vs a plain peft LoRA training loop.

Both run in one process, on one device, on the same model, the same partition's tokenised
examples and the same batches in the same order:

- ``client``: one round of the Flower client as ``flower_app`` runs it: ``record_to_state`` (the
  server's ArrayRecord) -> ``task.train_partition`` (load the factors into the cached
  ``ClientModel``'s adapter for this rank map, ``local-steps`` AdamW steps, extract the state)
  -> ``state_to_record`` (the reply).
- ``plain``: what a competent peft user writes: one ``get_peft_model`` at the same ranks (the
  same clamped rank map, through ``lora_config_for``) on its own copy of the base, built once;
  one AdamW over its trainable parameters; the loop forward / backward / step / zero_grad.
- ``client, 0 steps``: the client round with ``local-steps = 0``: the fixed per-round overhead
  (conversion, factor loading, optimizer, state extraction, encoding).

Defaults follow the reproduce ``paper`` profile (benchmarks/reproduce.py): 10 local steps,
batch 4, max length 512, lr 3e-4, all 7 target modules, a partition's 64 examples; SmolLM2-135M.
The server's message is a realistic later-round one: the round-1 common A and a dense, nonzero B.
Each variant: 1 warm-up round, then ``--repeats`` timed rounds (median); the variants alternate
round by round. Throughput counts the non-pad tokens trained. The last line printed is
``client/plain throughput ratio: X (rank 8), Y (rank 200)`` (plain round time / client round time).

Usage::

    python benchmarks/bench_client.py                                   # CPU, float32 (~18 min on 2 idle cores)
    python benchmarks/bench_client.py --device cuda --dtype bfloat16    # on a GPU
    python benchmarks/bench_client.py --quick                           # smoke test, tiny model (< 60 s)

Results: docs/performance.md, "Client throughput".
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import tomllib
import torch
from torch import Tensor

from flexlora_plugin.data import default_data

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "flower_app"
DATA = default_data()
ALL7 = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# the reproduce "paper" profile (benchmarks/reproduce.py PROFILES["paper"])
PAPER = {"local-steps": 10, "batch-size": 4, "max-length": 512, "max-train-examples": 0, "lr": 3e-4, "target-modules": ALL7}
SERVER_ROUND = 2  # every timed round replays this round: the same batch draw each time


@dataclass
class Variant:
    """Timings of one variant at one rank: warm-up, timed rounds and the other processes' load."""

    label: str
    warmup: float = float("nan")
    runs: list[float] = field(default_factory=list)
    other: list[float] = field(default_factory=list)
    loss: float = float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else float("nan")


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, this process's CPU seconds)."""
    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:9]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    use = resource.getrusage(resource.RUSAGE_SELF)
    return busy, use.ru_utime + use.ru_stime


def clock(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """Run ``fn``: (wall seconds, cores other processes used meanwhile, its result)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    busy0, own0 = cpu_seconds()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    busy1, own1 = cpu_seconds()
    return wall, max(0.0, (busy1 - busy0) - (own1 - own0)) / wall, out


def load_task() -> ModuleType:
    """``flexlora_app.task`` from flower_app/ (the app is not installed as a package here)."""
    sys.path.insert(0, str(APP))
    try:
        import flexlora_app.task as task
    finally:
        sys.path.remove(str(APP))
    return task


def make_settings(task: ModuleType, args: argparse.Namespace, model: Path, out: Path) -> Any:
    """The app's ``Settings``: pyproject's ``[tool.flwr.app.config]`` with the paper profile and the CLI on top."""
    config = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    config.update(PAPER)
    config.update(
        {
            "model-path": str(model),
            "data-path": str(args.data),
            "output-dir": str(out),
            "local-steps": args.steps,
            "batch-size": args.batch_size,
            "max-length": args.max_length,
            "max-train-examples": args.max_train_examples,
            "torch-threads": args.threads,
            "device": args.device,
            "dtype": args.dtype,
        }
    )
    return task.Settings.from_context(config, run_id=0)


def server_factors(shapes: Mapping[str, tuple[int, int]], rank_map: Mapping[str, int], lora_alpha: float) -> dict[str, Tensor]:
    """A later-round message: the round-1 common A (``initial_update``) and a dense B ~ N(0, 0.01²), seeded."""
    from flexlora_plugin.core import initial_update, module_infos

    state = initial_update(module_infos(shapes), [rank_map], seed=0).project(rank_map, lora_alpha=lora_alpha)
    gen = torch.Generator().manual_seed(1)
    return {k: (torch.randn(v.shape, generator=gen) * 0.01 if ".lora_B." in k else v).float() for k, v in state.items()}


def plugin_batches(settings: Any, partition_id: int, server_round: int, n: int) -> list[list[int]]:
    """The example indices of each step, drawn exactly as ``task.train_partition`` draws them."""
    rng = random.Random(f"{settings.seed}:{partition_id}:{server_round}")
    order: list[int] = []
    batches = []
    for _ in range(settings.local_steps):
        if len(order) < settings.batch_size:
            order += rng.sample(range(n), n)
        batches.append(order[: settings.batch_size])
        order = order[settings.batch_size :]
    return batches


@dataclass
class Plain:
    """The plain peft baseline: one peft model at one rank map, its AdamW, the fixed batches."""

    model: Any
    optimizer: torch.optim.Optimizer
    batches: list[dict[str, Tensor]]
    device: torch.device

    def round(self) -> float:
        """``len(batches)`` training steps; returns the mean loss."""
        self.model.train()
        losses = []
        for batch in self.batches:
            loss = self.model(**{k: v.to(self.device) for k, v in batch.items()}).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        return float(torch.stack(losses).float().mean())


def build_plain(
    settings: Any, rank_map: Mapping[str, int], received: Mapping[str, Tensor], batches: list[dict[str, Tensor]]
) -> Plain:
    """Its own base copy (loaded like the client's), ``get_peft_model`` once, the server's factors, AdamW."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from flexlora_plugin.core.client import resolve_device, resolve_dtype
    from flexlora_plugin.core.peft_io import load_adapter_state, lora_config_for

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    base = AutoModelForCausalLM.from_pretrained(str(settings.model_path), dtype=dtype).to(device)
    model = get_peft_model(base, lora_config_for(rank_map, lora_alpha=settings.lora_alpha))
    load_adapter_state(model, received)  # the same start as the client: the losses must agree
    params = [p for p in model.parameters() if p.requires_grad]
    return Plain(model, torch.optim.AdamW(params, lr=settings.lr), batches, device)


def client_round(task: ModuleType, settings: Any, pid: int, rank_map: Mapping[str, int], message: tuple[Any, Any]) -> float:
    """One client round: decode the server's record, ``train_partition``, encode the reply; the mean loss."""
    from flexlora_plugin.flower.records import record_to_state, state_to_record

    received = record_to_state(*message)
    state, _, loss = task.train_partition(settings, pid, rank_map, received, SERVER_ROUND)
    state_to_record(state)
    return float(loss)


def phases(task: ModuleType, settings: Any, rank_map: Mapping[str, int], message: tuple[Any, Any], reps: int) -> dict[str, float]:
    """Median seconds of each fixed-cost step of a client round, each timed on its own."""
    from flexlora_plugin.flower.records import record_to_state, state_to_record

    cm, _ = task.client_model(settings)
    received = record_to_state(*message)
    state = cm.state()
    steps: dict[str, Callable[[], Any]] = {
        "record_to_state": lambda: record_to_state(*message),
        "activate (load factors)": lambda: cm.activate(rank_map, received),
        "AdamW + trainable()": lambda: torch.optim.AdamW([p for _, p in cm.trainable()], lr=settings.lr),
        "state() (extract)": cm.state,
        "state_to_record": lambda: state_to_record(state),
    }
    out = {}
    for name, fn in steps.items():
        fn()
        out[name] = statistics.median(clock(fn, cm.device)[0] for _ in range(max(reps, 3)))
    return out


def bench_rank(task: ModuleType, settings: Any, pid: int, rank: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every variant at one rank (every module at ``rank``, clamped): timings, phases, checks."""
    from flexlora_plugin.data import PaddingCollator
    from flexlora_plugin.flower.records import state_to_record

    cm, tokenizer = task.client_model(settings)
    rank_map = task.node_rank_map(settings, {"rank": rank}, pid)
    feats = task.partition_features(settings, pid, tokenizer)
    collate = PaddingCollator(int(tokenizer.pad_token_id))
    batches = [collate([feats[i] for i in idx]) for idx in plugin_batches(settings, pid, SERVER_ROUND, len(feats))]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    received = server_factors(cm.shapes, rank_map, settings.lora_alpha)
    message = state_to_record(received)  # the server's side: not timed
    load_s, _, plain = clock(lambda: build_plain(settings, rank_map, received, batches), cm.device)
    zero = replace(settings, local_steps=0)
    runs = {
        "client": (
            Variant("client round (record -> train_partition -> record)"),
            lambda: client_round(task, settings, pid, rank_map, message),
        ),
        "plain": (Variant("plain peft loop"), plain.round),
        "zero": (Variant("client round, 0 steps (fixed overhead)"), lambda: client_round(task, zero, pid, rank_map, message)),
    }
    for i in range(1 + args.repeats):
        names = list(runs) if i % 2 == 0 else ["plain", "client", "zero"]
        for name in names:
            variant, fn = runs[name]
            wall, other, loss = clock(fn, cm.device)
            print(
                f"rank {rank}, round {i} ({'warm-up' if i == 0 else 'timed'}): {name} {wall:.2f} s, other load {other:.2f} cores",
                file=sys.stderr,
                flush=True,
            )
            if i == 0:
                variant.warmup, variant.loss = wall, loss
            else:
                variant.runs.append(wall)
                variant.other.append(other)
    result = {
        "rank": rank,
        "rank_map": rank_map,
        "tokens": tokens,
        "plain_build_s": load_s,
        "variants": {k: v for k, (v, _) in runs.items()},
        "phases": phases(task, settings, rank_map, message, args.repeats),
        "factor_mib": sum(v.numel() * 4 for v in received.values()) / 2**20,
    }
    del plain, runs
    gc.collect()
    return result


def machine() -> str:
    """CPU model, cores and memory (and the GPU when CUDA is visible)."""
    cpu = "?"
    if Path("/proc/cpuinfo").is_file():
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
            "?",
        )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), {mem:.0f} GiB RAM{gpu}; {platform.platform()}"


def header(settings: Any, args: argparse.Namespace, device: torch.device, load: Mapping[str, float]) -> list[str]:
    import peft
    import transformers

    return [
        "# Client throughput: plugin client round vs plain peft loop",
        "",
        f"device {device}, base dtype {settings.dtype} (LoRA factors float32), torch threads {torch.get_num_threads()}",
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"Python {platform.python_version()}",
        f"machine: {machine()}",
        f"load average (1 min) at the start: {load['before']:.2f} on {len(os.sched_getaffinity(0))} usable cores",
        f"model {settings.model_path} (one-off base load for the client: {load['client_load_s']:.2f} s; "
        f"tokenising partition {args.partition}: {load['tokenize_s']:.2f} s)",
        f"per round: {settings.local_steps} steps x batch {settings.batch_size}, max length {settings.max_length}, "
        f"lr {settings.lr}, partition {args.partition} ({load['examples']} examples), "
        f"{args.repeats} timed rounds after 1 warm-up, median",
    ]


def rank_table(res: Mapping[str, Any]) -> list[str]:
    """The markdown table of one rank, then its overhead and phase lines."""
    ranks = sorted(set(res["rank_map"].values()))
    v = res["variants"]
    lines = [
        "",
        f"## rank {res['rank']} (module ranks {ranks}; {res['factor_mib']:.1f} MiB of factors; {res['tokens']} tokens per round)",
        "",
        "| variant | median round [s] | runs [s] | warm-up [s] | tokens/s | mean loss (warm-up) | other load [cores] |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for var in v.values():
        tps = f"{res['tokens'] / var.median:,.0f}" if var.label.startswith(("client round (", "plain")) else "-"
        loss = f"{var.loss:.5f}" if var.loss == var.loss else "-"
        runs = ", ".join(f"{t:.2f}" for t in var.runs)
        other = f"{max(var.other):.2f}" if var.other else "-"
        lines.append(f"| {var.label} | {var.median:.3f} | {runs} | {var.warmup:.2f} | {tps} | {loss} | {other} |")
    overhead, gap = v["zero"].median, v["client"].median - v["plain"].median
    lines += [
        "",
        f"fixed per-round overhead: {overhead:.3f} s (0-step round); client - plain: {gap:+.3f} s; "
        f"plain model build (base load + get_peft_model, one-off): {res['plain_build_s']:.2f} s",
        "phases (median, s): " + ", ".join(f"{k} {t:.4f}" for k, t in res["phases"].items()),
    ]
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="transformers folder (default: SmolLM2-135M-Instruct, prepared once)"
    )
    parser.add_argument(
        "--data", type=Path, default=DATA, help="Natural Instructions folder (default: $FLEXLORA_DATA, else the shipped sample)"
    )
    parser.add_argument("--partition", type=int, default=0, help="the partition whose examples train (default: 0)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="base model dtype (default: float32)")
    parser.add_argument("--steps", type=int, default=PAPER["local-steps"], help="local steps per round (default: 10)")
    parser.add_argument("--batch-size", type=int, default=PAPER["batch-size"], help="(default: 4)")
    parser.add_argument("--max-length", type=int, default=PAPER["max-length"], help="(default: 512)")
    parser.add_argument("--max-train-examples", type=int, default=0, help="0 = the whole partition (default: 0)")
    parser.add_argument("--ranks", default="8,200", help="comma list; each is every module's rank, clamped (default: 8,200)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per variant after 1 warm-up (default: 3)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny random LLaMA, 2 steps of batch 2, 1 repeat")
    args = parser.parse_args(argv)
    args.ranks = [int(r) for r in str(args.ranks).split(",") if r.strip()]
    if args.quick:
        args.steps, args.batch_size, args.max_length, args.max_train_examples, args.repeats = 2, 2, 1024, 8, 1
    if args.steps < 1 or args.repeats < 1 or not args.ranks or min(args.ranks) < 1:
        parser.error("--steps, --repeats and every rank must be >= 1")
    return args


def resolve_model(args: argparse.Namespace, tmp: Path) -> Path:
    """``--model``, the tiny random LLaMA (``--quick``), or SmolLM2-135M-Instruct prepared once."""
    if args.model is not None:
        return Path(args.model)
    if args.quick:
        from flexlora_plugin.data import sample_texts
        from flexlora_plugin.tools.tiny import build_tiny_llama

        return build_tiny_llama(tmp / "tiny-llama", texts=sample_texts(args.data), max_length=1024)
    from flexlora_plugin.tools.models import prepare_smollm2

    return prepare_smollm2()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    load: dict[str, float] = {"before": os.getloadavg()[0]}
    start = time.perf_counter()
    task = load_task()
    with tempfile.TemporaryDirectory(prefix="bench_client-") as tmp:
        settings = make_settings(task, args, resolve_model(args, Path(tmp)), Path(tmp) / "out")
        load["client_load_s"], _, (cm, tokenizer) = clock(lambda: task.client_model(settings), torch.device("cpu"))
        load["tokenize_s"], _, feats = clock(lambda: task.partition_features(settings, args.partition, tokenizer), cm.device)
        load["examples"] = len(feats)
        print("\n".join(header(settings, args, cm.device, load)), flush=True)
        results = []
        for rank in args.ranks:  # each table as soon as its rank is measured
            results.append(bench_rank(task, settings, args.partition, rank, args))
            print("\n".join(rank_table(results[-1])), flush=True)
    ratios = [(res["rank"], res["variants"]["plain"].median / res["variants"]["client"].median) for res in results]
    print(
        f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f}; total wall time {time.perf_counter() - start:.0f} s; "
        "target: ratio >= 0.8 at every rank\n"
    )
    print("client/plain throughput ratio: " + ", ".join(f"{x:.2f} (rank {r})" for r, x in ratios), flush=True)


if __name__ == "__main__":
    main()
