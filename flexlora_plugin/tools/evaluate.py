"""Score a model (optionally with a peft adapter) on held-out tasks: generated Rouge-L.

The paper's headline metric: Rouge-L (``rouge-score``, ``rougeL``, stemming on) of the
*greedy-generated* answers of the global model on unseen tasks, batched, with a fixed maximum of
new tokens; per-task means and a task-clustered paired bootstrap CI for differences.

Command line (prints JSON)::

    python -m flexlora_plugin.evaluate --adapter DIR --data FILE [--base MODEL_DIR]
        [--max-new-tokens 64] [--batch-size 8] [--max-per-task N] [--out FILE.json]
        [--device auto|cpu|cuda|cuda:N] [--dtype float32|bfloat16] [--no-sort]

``--adapter none`` scores the base model (zero-shot floor); without ``--base`` the base model is
the adapter's ``base_model_name_or_path``. Prompts are generated in batches of similar length
(longest first; ``--no-sort`` keeps file order) and the answers reported in file order.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._cli import DefaultsHelp
from ..data import SAMPLE_DATA, build_prompt, load_examples, select_examples

__all__ = [
    "EvalResult",
    "Difference",
    "bootstrap_mean",
    "evaluate_model",
    "generate_answers",
    "load_for_eval",
    "paired_bootstrap",
    "rouge_l",
]

logger = logging.getLogger(__name__)
PROG = "python -m flexlora_plugin.evaluate"


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-example Rouge-L F-measure (``rouge-score``, stemming on)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]


def _eos_ids(model: Any, tokenizer: Any) -> int | list[int]:
    """Where generation stops: the tokenizer's eos, then any other eos the model's generation config lists."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; load it with flexlora_plugin.tools.models.load_tokenizer")
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = [int(i) for i in listed if int(i) != eos] if isinstance(listed, (list, tuple)) else []
    return [int(eos), *extra] if extra else int(eos)


def _length_order(tokenizer: Any, prompts: Sequence[str], max_prompt_tokens: int) -> list[int]:
    """Prompt indices, longest tokenised prompt (after truncation) first; ties keep their order."""
    lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=True, max_length=max_prompt_tokens)["input_ids"]]
    return sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_prompt_tokens: int = 768,
    threads: int | None = 1,
    sort_by_length: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy answers, in the order of ``prompts``, batched with left padding on the model's device.

    Parameters
    ----------
    model : transformers causal LM (or peft model)
        Generates on the device of its first parameter; the batches are moved there.
    tokenizer : transformers tokenizer
        Its ``eos_token_id`` (plus any other eos of the model's generation config) stops generation
        and its pad token (eos when unset) pads.
    prompts : sequence of str
        Truncated from the left to ``max_prompt_tokens`` tokens. (default max_prompt_tokens: 768)
    max_new_tokens, batch_size : int
        Per answer, per ``generate`` call. (default: 64, 8)
    threads : int or None
        On the CPU, torch threads while generating (the previous count is restored). The default is
        1: decoding is many small matmuls, and on the 2-core machines here SmolLM2-135M generated
        21.5 tokens/s on 1 thread but 3.2 tokens/s on 2. None keeps torch's setting; ignored on CUDA.
        (default: 1)
    sort_by_length : bool
        Batch the prompts longest first, so a batch pads little and stops early; the answers are
        still returned in the original order. False batches in the given order. (default: True)
    progress : callable or None
        Called with ``(answers done, total)`` after each batch. (default: None)
    """
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = _eos_ids(model, tokenizer)
    model.eval()
    device = next(model.parameters()).device
    order = _length_order(tokenizer, prompts, max_prompt_tokens) if sort_by_length else list(range(len(prompts)))
    answers: list[str] = [""] * len(prompts)
    set_threads = threads is not None and device.type == "cpu"
    previous = torch.get_num_threads()
    if set_threads:
        torch.set_num_threads(threads)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = tokenizer(
                [prompts[i] for i in chunk], return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_tokens
            ).to(device)
            # only ids and mask: some tokenizers (the tiny one, under transformers 4.x) add token_type_ids
            out = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            for i, text in zip(chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
                answers[i] = text.strip()
            if progress is not None:
                progress(start + len(chunk), len(prompts))
    finally:
        if set_threads:
            torch.set_num_threads(previous)
    return answers


@dataclass(frozen=True)
class EvalResult:
    """Scores of one model on one file: per example (in file order) and per task."""

    scores: list[float]
    tasks: list[str]
    predictions: list[str]

    @property
    def per_task(self) -> dict[str, float]:
        groups: dict[str, list[float]] = defaultdict(list)
        for task, s in zip(self.tasks, self.scores, strict=True):
            groups[task].append(s)
        return {t: sum(v) / len(v) for t, v in sorted(groups.items())}

    def summary(self) -> dict[str, Any]:
        per_task = self.per_task
        return {
            "rougeL": sum(self.scores) / max(1, len(self.scores)),
            "rougeL_task_mean": sum(per_task.values()) / max(1, len(per_task)),
            "n_examples": len(self.scores),
            "n_tasks": len(per_task),
            "per_task": per_task,
            "examples": [
                {"task": t, "rougeL": s, "prediction": p}
                for t, s, p in zip(self.tasks, self.scores, self.predictions, strict=True)
            ],
        }


def evaluate_model(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    threads: int | None = 1,
    sort_by_length: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Generate for every example and score against its ``output`` (see :func:`generate_answers`); file order kept."""
    preds = generate_answers(
        model,
        tokenizer,
        [build_prompt(ex) for ex in examples],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        threads=threads,
        sort_by_length=sort_by_length,
        progress=progress,
    )
    tasks = [str(ex.get("task_id", ex.get("category", ""))) for ex in examples]
    return EvalResult(scores=rouge_l(preds, [ex["output"] for ex in examples]), tasks=tasks, predictions=preds)


@dataclass(frozen=True)
class Difference:
    """A per-task mean (or mean difference ``a − b``) with its task-clustered bootstrap CI."""

    diff: float
    low: float
    high: float

    @property
    def conclusive(self) -> bool:
        """False when the CI covers 0."""
        return not (self.low <= 0.0 <= self.high)


def _cluster_bootstrap(values: Sequence[float], *, n_boot: int, seed: int, level: float) -> Difference:
    """Mean of ``values`` (one per task) and the percentile CI of that mean over task resamples."""
    rng = random.Random(seed)
    stats = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(n_boot))
    tail = (1 - level) / 2
    low, high = stats[int(tail * n_boot)], stats[min(n_boot - 1, int((1 - tail) * n_boot))]
    return Difference(diff=sum(values) / len(values), low=low, high=high)


def bootstrap_mean(per_task: Mapping[str, float], *, n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> Difference:
    """Task-clustered bootstrap CI of the mean per-task score (tasks resampled with replacement)."""
    if not per_task:
        raise ValueError("bootstrap needs at least one task")
    return _cluster_bootstrap([per_task[t] for t in sorted(per_task)], n_boot=n_boot, seed=seed, level=level)


def paired_bootstrap(
    a: Mapping[str, float], b: Mapping[str, float], *, n_boot: int = 10_000, seed: int = 0, level: float = 0.95
) -> Difference:
    """Task-clustered paired bootstrap of the mean per-task score difference.

    Tasks (the clusters) are resampled with replacement; each resample's statistic is the mean
    over its tasks of ``a[task] − b[task]``. Both mappings must cover the same tasks.
    """
    if set(a) != set(b) or not a:
        raise ValueError(f"paired bootstrap needs the same non-empty task set, got {sorted(a)[:3]}… vs {sorted(b)[:3]}…")
    return _cluster_bootstrap([a[t] - b[t] for t in sorted(a)], n_boot=n_boot, seed=seed, level=level)


def base_of(adapter: str | None, base: str | None) -> str:
    """The base model folder: ``base``, else the adapter's ``base_model_name_or_path``.

    Raises
    ------
    ValueError
        Neither is given (``--adapter none`` needs ``--base``).
    """
    if base is not None:
        return base
    if adapter is None:
        raise ValueError("--adapter none needs --base MODEL_FOLDER")
    return str(json.loads((Path(adapter) / "adapter_config.json").read_text())["base_model_name_or_path"])


def load_for_eval(
    adapter: str | None, base: str | None, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"
) -> tuple[Any, Any]:
    """Base model (+ adapter, unmerged) in ``dtype`` on ``device``, and its checked tokenizer.

    Parameters
    ----------
    adapter : str or None
        A peft adapter folder; None scores the base model.
    base : str or None
        The base model folder; None takes the adapter's ``base_model_name_or_path``.
    device : str or torch.device
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (see :func:`~flexlora_plugin.core.client.resolve_device`).
        (default: "cpu")
    dtype : str or torch.dtype
        ``float32``, ``bfloat16`` or ``float16``, the base model's weights; a peft adapter keeps
        float32 factors. (default: "float32")

    Raises
    ------
    ValueError
        No base model named, an unusable device or dtype, or a tokenizer whose eos is not the
        generation config's (:func:`~flexlora_plugin.tools.models.load_tokenizer`).
    """
    from transformers import AutoModelForCausalLM

    from ..core import resolve_device, resolve_dtype
    from .models import load_tokenizer

    base = base_of(adapter, base)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    tokenizer = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.to(dev), tokenizer


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flexlora_plugin.evaluate``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=DefaultsHelp,
        description="Generated Rouge-L of a model (+ peft adapter) on a held-out file; prints JSON.",
        epilog="Exit status: 0 scored, 2 bad option (checked before any model loads).",
    )
    parser.add_argument("--adapter", required=True, help="peft adapter folder, or 'none' for the base model")
    parser.add_argument("--data", required=True, type=Path, help="JSON list of {instruction, input, output[, task_id]}")
    parser.add_argument("--base", default=None, help="base model folder (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens generated per answer")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated at once")
    parser.add_argument(
        "--max-per-task", type=int, default=None, help="score only the first N examples of each task (default: all)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads for CPU generation (1 is fastest here)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: CUDA when available)")
    parser.add_argument("--dtype", default="float32", help="the base model's dtype: float32 | bfloat16")
    parser.add_argument(
        "--no-sort",
        dest="sort_by_length",
        action="store_false",
        help="generate in file order, not batched by prompt length (answers: file order either way)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return parser


def check_options(args: argparse.Namespace) -> tuple[str | None, str]:
    """``(adapter or None, base model folder)``, checked without loading a model.

    Raises
    ------
    ValueError
        A missing file or folder, a number out of range, or an unusable device or dtype, in one line.
    """
    from ..core import resolve_device, resolve_dtype

    adapter = None if args.adapter.lower() == "none" else args.adapter
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(
            f"--adapter {adapter} is not a peft adapter folder (no adapter_config.json); "
            "a run writes one to <output-dir>/adapter, or use --adapter none with --base"
        )
    if not args.data.is_file():
        raise ValueError(f"--data {args.data} does not exist (e.g. {SAMPLE_DATA / 'heldout_test.json'})")
    base = base_of(adapter, args.base)
    local = Path(base).exists() or Path(base).is_absolute() or base.startswith(".") or base.count("/") != 1
    if local and not (Path(base) / "config.json").is_file():  # "org/name" may be a hub id
        raise ValueError(f"base model {base} is not a transformers folder (no config.json); pass --base")
    for name, value in (
        ("--max-new-tokens", args.max_new_tokens),
        ("--batch-size", args.batch_size),
        ("--threads", args.threads),
        ("--max-per-task", args.max_per_task or 1),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    device = resolve_device(args.device)  # a device this machine has: "cuda" without CUDA fails here, in one line
    resolve_dtype(args.dtype, device)
    return adapter, str(base)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        adapter, base = check_options(args)
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    from .tiny import is_tiny_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    tiny = is_tiny_model(base)
    if tiny:
        print(
            f"{PROG}: note: {base} is the tiny random LLaMA of flexlora's tests: the score below is a plumbing check "
            "and says nothing about quality (SmolLM2: docs/reproduction.md)",
            file=sys.stderr,
        )
    examples = select_examples(load_examples(args.data), args.max_per_task)
    model, tokenizer = load_for_eval(adapter, base, device=args.device, dtype=args.dtype)
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        rate = done / max(1e-9, time.perf_counter() - start)
        logger.info("evaluated %d/%d examples, ETA %.0f s", done, total, (total - done) / max(rate, 1e-9))

    result = evaluate_model(
        model,
        tokenizer,
        examples,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        threads=args.threads,
        sort_by_length=args.sort_by_length,
        progress=progress,
    )
    device = next(model.parameters()).device
    report = {
        "adapter": args.adapter,
        "data": str(args.data),
        "max_new_tokens": args.max_new_tokens,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "sort_by_length": args.sort_by_length,
        "seconds": round(time.perf_counter() - start, 1),
        **({"note": "tiny random model: a plumbing check, not a quality score"} if tiny else {}),
        **result.summary(),
    }
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
