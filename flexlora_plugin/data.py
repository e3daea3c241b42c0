"""Natural Instructions client data: files, prompt template, causal-LM features, padding collator.

Host-agnostic (Flower and FederatedScope both call it); torch and a Hugging Face tokenizer only.

Folder layout (:data:`SAMPLE_DATA`, the sample shipped in the package, and any fuller copy, see
their README): ``local_training_{i}.json``, ``local_eval_{i}.json``, ``local_test_{i}.json`` per
client ``i`` and ``heldout_test.json``; each file is a JSON list of ``{"instruction", "input",
"output", "category"}``. :func:`default_data` is the folder every runner, test and config uses
unless told otherwise: ``$FLEXLORA_DATA``, else the shipped sample. ``python -m
flexlora_plugin.data sample SRC DST`` writes such a sample (the first examples of each file) with a
manifest of sha256 hashes.

Prompt template
---------------
The Alpaca template used by the FlexLoRA reference code (FederatedScope branch ``FlexLoRA``,
itself from Stanford Alpaca): with a non-empty ``input``::

    Below is an instruction that describes a task, paired with an input that provides further
    context. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:

and without one::

    Below is an instruction that describes a task. Write a response that appropriately
    completes the request.

    ### Instruction:
    {instruction}

    ### Response:

The target is ``{output}`` followed by the tokenizer's EOS token. Only target tokens are
supervised: prompt positions carry label ``-100`` (ignored by the causal-LM loss).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_INPUT",
    "PROMPT_NO_INPUT",
    "PaddingCollator",
    "build_prompt",
    "missing_clients",
    "client_file",
    "SAMPLE_DATA",
    "default_data",
    "load_client_split",
    "write_sample",
    "build_split",
    "coarse_category",
    "HELDOUT_CATEGORIES",
    "load_examples",
    "sample_texts",
    "select_examples",
    "task_of",
    "tokenize_example",
    "tokenize_examples",
]

logger = logging.getLogger(__name__)

SAMPLE_DATA = Path(__file__).resolve().with_name("sample_data") / "natural_instructions"
"""The federated Natural Instructions sample shipped as package data: 256 client tasks, held-out tasks."""


def default_data() -> Path:
    """The Natural Instructions folder used unless one is given: ``$FLEXLORA_DATA``, else :data:`SAMPLE_DATA`."""
    env = os.environ.get("FLEXLORA_DATA", "").strip()
    return Path(env).expanduser() if env else SAMPLE_DATA


IGNORE_INDEX = -100
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
Split = Literal["train", "eval", "test"]
_SPLIT_FILES = {"train": "local_training_{i}.json", "eval": "local_eval_{i}.json", "test": "local_test_{i}.json"}
_FIELDS = ("instruction", "input", "output")


def client_file(folder: str | os.PathLike[str], client_id: int, split: Split = "train") -> Path:
    """Path of one client's split file, e.g. ``folder/local_training_3.json``.

    Raises
    ------
    ValueError
        On an unknown split or a negative client id.
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_FILES)}, got {split!r}")
    if isinstance(client_id, bool) or not isinstance(client_id, int) or client_id < 0:
        raise ValueError(f"client_id must be a non-negative int, got {client_id!r}")
    return Path(folder) / _SPLIT_FILES[split].format(i=client_id)


def missing_clients(folder: str | os.PathLike[str], num_clients: int, split: Split = "train") -> list[int]:
    """Client ids ``0..num_clients-1`` whose split file is absent from ``folder`` (what runners check before starting)."""
    return [i for i in range(num_clients) if not client_file(folder, i, split).is_file()]


def load_examples(path: str | os.PathLike[str], max_examples: int | None = None) -> list[dict[str, str]]:
    """Read a JSON list of examples, checking every example has instruction/input/output strings.

    Parameters
    ----------
    path : path
        A ``local_*_{i}.json`` or ``heldout_test.json`` file.
    max_examples : int, optional
        Keep the first ``max_examples`` (default: all).

    Raises
    ------
    FileNotFoundError
        Naming the missing file (and whether its folder exists).
    ValueError
        When the file is not a list of examples with the three string fields.
    """
    path = Path(path)
    if not path.is_file():
        where = "folder exists" if path.parent.is_dir() else "folder does not exist either"
        raise FileNotFoundError(f"Natural Instructions file not found: {path} ({where})")
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of examples, got {type(data).__name__}")
    for n, ex in enumerate(data):
        bad = [k for k in _FIELDS if not isinstance(ex, Mapping) or not isinstance(ex.get(k), str)]
        if bad:
            raise ValueError(f"{path}: example {n} lacks string field(s) {bad}")
    return data[:max_examples] if max_examples is not None else data


def load_client_split(
    folder: str | os.PathLike[str], client_id: int, split: Split = "train", max_examples: int | None = None
) -> list[dict[str, str]]:
    """Examples of one client's split; a missing folder or file raises ``FileNotFoundError`` naming it."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"Natural Instructions folder not found: {folder}")
    return load_examples(client_file(folder, client_id, split), max_examples)


def build_prompt(example: Mapping[str, Any]) -> str:
    """The Alpaca prompt of an example (without its answer); see the module docstring."""
    if example.get("input"):
        return PROMPT_INPUT.format(instruction=example["instruction"], input=example["input"])
    return PROMPT_NO_INPUT.format(instruction=example["instruction"])


def task_of(example: Mapping[str, Any]) -> str:
    """The task an example belongs to: its ``task_id`` (held-out files), else its ``category``."""
    return str(example.get("task_id", example.get("category", "")))


def select_examples(examples: Sequence[Mapping[str, Any]], max_per_task: int | None) -> list[Mapping[str, Any]]:
    """The first ``max_per_task`` examples of each task (:func:`task_of`), file order kept; None keeps all."""
    if max_per_task is None:
        return list(examples)
    seen: dict[str, int] = {}
    out = []
    for ex in examples:
        task = task_of(ex)
        if seen.get(task, 0) < max_per_task:
            seen[task] = seen.get(task, 0) + 1
            out.append(ex)
    return out


def sample_texts(folder: str | os.PathLike[str], clients: Sequence[int] = tuple(range(8)), split: Split = "train") -> list[str]:
    """Prompt + answer texts of a few clients, e.g. to train a small test tokenizer on."""
    return [build_prompt(ex) + ex["output"] for c in clients for ex in load_client_split(folder, c, split)]


def tokenize_example(example: Mapping[str, Any], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Causal-LM features of one example: prompt + output + EOS, prompt labels masked.

    Parameters
    ----------
    example : Mapping
        ``{"instruction", "input", "output"}``.
    tokenizer : transformers tokenizer
        Needs ``eos_token_id``.
    max_length : int
        Sequences are truncated to this many tokens (the EOS is lost when truncated).

    Returns
    -------
    dict
        ``input_ids``, ``attention_mask`` and ``labels``, lists of equal length ``<= max_length``;
        ``labels`` is ``-100`` on prompt tokens and equals ``input_ids`` elsewhere.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; set one before tokenizing")
    prompt_ids = tokenizer(build_prompt(example), add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(str(example["output"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_examples(examples: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int) -> list[dict[str, list[int]]]:
    """:func:`tokenize_example` on each example; examples whose answer is truncated away are dropped."""
    feats = [tokenize_example(ex, tokenizer, max_length) for ex in examples]
    kept = [f for f in feats if any(label != IGNORE_INDEX for label in f["labels"])]
    if len(kept) < len(feats):
        logger.info("%d of %d examples dropped: prompt longer than max_length=%d", len(feats) - len(kept), len(feats), max_length)
    return kept


@dataclass(frozen=True)
class PaddingCollator:
    """Right-pad a batch of features to its longest sequence.

    Attributes
    ----------
    pad_token_id : int
        Fills ``input_ids``; ``attention_mask`` is padded with 0 and ``labels`` with -100.

    Returns (on call)
    -----------------
    dict[str, Tensor]
        ``input_ids``, ``attention_mask``, ``labels``: each int64, shape (batch, max_len).
    """

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, Tensor]:
        if not features:
            raise ValueError("PaddingCollator needs at least one feature")
        width = max(len(f["input_ids"]) for f in features)
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor([list(f[key]) + [pad] * (width - len(f[key])) for f in features], dtype=torch.long)
            for key, pad in pads.items()
        }


def _write_examples(path: Path, examples: list[dict[str, Any]]) -> str:
    """Write ``examples`` as JSON (one file of a split); its sha256, for the manifest."""
    import hashlib

    text = json.dumps(examples, ensure_ascii=False, indent=0) + "\n"
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_sample(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    train: int = 8,
    eval: int = 2,
    test: int = 2,
    heldout_per_task: int = 4,
) -> dict[str, Any]:
    """Write a small copy of a federated split: the first examples of every client file and of each held-out task.

    Every client of ``source`` is kept (``local_*_{i}.json`` for i = 0, 1, ... while present), so
    runs over all partitions work on the sample; ``heldout_test.json`` keeps its first
    ``heldout_per_task`` examples of each ``task_id``. Writes ``manifest.json``: the counts, the
    sha256 of every file written and of the source's own manifest. Returns the manifest.
    """
    import hashlib

    source, dest = Path(source), Path(dest)
    n_clients = 0
    while client_file(source, n_clients, "train").is_file():
        n_clients += 1
    if n_clients == 0:
        raise FileNotFoundError(f"{source} holds no local_training_0.json: not a federated Natural Instructions folder")
    dest.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    counts = {"train": train, "eval": eval, "test": test}

    def put(name: str, examples: list[dict[str, Any]]) -> None:
        files[name] = _write_examples(dest / name, examples)

    for i in range(n_clients):
        for split, n in counts.items():
            put(client_file(dest, i, split).name, load_client_split(source, i, split, n))  # type: ignore[arg-type]
    heldout = [dict(ex) for ex in select_examples(load_examples(source / "heldout_test.json"), heldout_per_task)]
    put("heldout_test.json", heldout)
    origin = source / "manifest.json"
    manifest = {
        "clients": n_clients,
        "examples_per_client": counts,
        "heldout_tasks": len({task_of(ex) for ex in heldout}),
        "heldout_examples": len(heldout),
        "source_manifest_sha256": hashlib.sha256(origin.read_bytes()).hexdigest() if origin.is_file() else None,
        "sha256": files,
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


#: Super-NaturalInstructions' 12 evaluation categories: tasks of these categories are never clients.
HELDOUT_CATEGORIES = (
    "Textual Entailment",
    "Cause Effect Classification",
    "Coreference Resolution",
    "Dialogue Act Recognition",
    "Answerability Classification",
    "Word Analogy",
    "Overlap Extraction",
    "Keyword Tagging",
    "Question Rewriting",
    "Title Generation",
    "Data to Text",
    "Grammar Error Correction",
)


def coarse_category(label: str) -> str:
    """``"Question Generation 676.json"`` -> ``"Question Generation"`` (the release's label without its task number)."""
    return re.sub(r"\s*\d+\.json$", "", label).strip()


def _english(examples: Sequence[Mapping[str, Any]], share: float = 0.9) -> bool:
    """Whether the letters of the first examples' texts are at least ``share`` ASCII (the release carries no language field)."""
    text = "".join(str(ex.get(k, "")) for ex in examples[:8] for k in _FIELDS)
    letters = [c for c in text if c.isalpha()]
    return not letters or sum(c.isascii() for c in letters) >= share * len(letters)


def build_split(
    release: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    clients: int = 256,
    heldout_tasks: int = 24,
    seed: int = 0,
    max_train: int = 64,
    max_eval: int = 16,
    max_test: int = 16,
    max_heldout: int = 20,
    max_prompt_chars: int = 1536,
    max_output_chars: int = 512,
    min_train: int = 16,
    min_test: int = 4,
    heldout_categories: Sequence[str] = HELDOUT_CATEGORIES,
) -> dict[str, Any]:
    """Build a federated split, one task per client, from the FlexLoRA release (``data/1613``).

    ``release`` holds ``local_{training,eval,test}_{i}.json`` for its tasks ``i`` (the data published
    with the FlexLoRA reference code: alibaba/FederatedScope, branch ``FlexLoRA``, folder
    ``data/1613``, from allenai/natural-instructions, Apache-2.0). The rules, in order:

    1. Each example is kept when ``len(instruction) + len(input) <= max_prompt_chars`` and
       ``len(output) <= max_output_chars``.
    2. A task is left out when it is a translation task, not English (under 90% ASCII letters),
       has fewer than ``min_train`` training or ``min_test`` test examples left, or repeats an
       earlier task's category label.
    3. Tasks of ``heldout_categories`` (Super-NaturalInstructions' evaluation categories) are
       never clients: ``heldout_tasks`` of them, drawn with ``seed``, give ``heldout_test.json``
       (up to ``max_heldout`` test examples each, with their ``task_id``).
    4. ``clients`` of the other tasks, drawn with ``seed``, become clients ``0..clients-1`` in the
       order drawn (the first ``K`` are a fair sample of ``K`` tasks); each keeps up to
       ``max_train`` / ``max_eval`` / ``max_test`` examples, drawn with ``seed`` and the task.

    Writes ``dest/manifest.json`` (the rules, every exclusion by reason, each client's source
    task and counts, the sha256 of every file written) and returns it. The same release and
    arguments give the same bytes.
    """
    release, dest = Path(release), Path(dest)
    if clients < 1 or heldout_tasks < 0:
        raise ValueError(f"clients must be >= 1 and heldout_tasks >= 0, got {clients}, {heldout_tasks}")
    ids = sorted(
        int(m.group(1))
        for p in release.glob("local_training_*.json")
        if (m := re.fullmatch(r"local_training_(\d+)\.json", p.name))
    )
    if not ids:
        raise FileNotFoundError(f"{release} holds no local_training_<i>.json: not the FlexLoRA release folder (data/1613)")

    def fits(ex: Mapping[str, Any]) -> bool:
        prompt = len(str(ex.get("instruction", ""))) + len(str(ex.get("input", "")))
        return prompt <= max_prompt_chars and len(str(ex.get("output", ""))) <= max_output_chars

    excluded: dict[str, int] = {}
    tasks: dict[int, dict[str, Any]] = {}
    labels: dict[str, int] = {}
    for i in ids:
        split = {
            s: load_examples(client_file(release, i, s)) if client_file(release, i, s).is_file() else [] for s in _SPLIT_FILES
        }
        label = str(next((ex.get("category", "") for ex in split["train"]), ""))
        coarse = coarse_category(label)
        kept = {s: [ex for ex in exs if fits(ex)] for s, exs in split.items()}
        if "translation" in coarse.lower() or not _english(split["train"]):
            reason = "non-English / translation"
        elif len(kept["train"]) < min_train or len(kept["test"]) < min_test:
            reason = "too few examples after the length filter"
        elif label in labels:
            reason = "duplicate task (the category label of an earlier task)"
        else:
            labels[label] = i
            tasks[i] = {"category": label, "coarse_category": coarse, "examples": kept}
            continue
        excluded[reason] = excluded.get(reason, 0) + 1
    heldout_set = set(heldout_categories)
    held_pool = sorted(i for i, t in tasks.items() if t["coarse_category"] in heldout_set)
    train_pool = sorted(i for i, t in tasks.items() if t["coarse_category"] not in heldout_set)
    if clients > len(train_pool) or heldout_tasks > len(held_pool):
        raise ValueError(
            f"{release}: {len(train_pool)} eligible client tasks and {len(held_pool)} held-out tasks, "
            f"asked for {clients} and {heldout_tasks} (left out: {excluded or 'none'})"
        )

    dest.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}

    def put(name: str, examples: list[dict[str, Any]]) -> None:
        files[name] = _write_examples(dest / name, examples)

    def draw(examples: list[dict[str, Any]], n: int, key: str) -> list[dict[str, Any]]:
        """``n`` examples drawn with the seed and ``key``, in the release's order."""
        chosen = sorted(random.Random(f"{seed}:{key}").sample(range(len(examples)), min(n, len(examples))))
        return [examples[j] for j in chosen]

    caps = {"train": max_train, "eval": max_eval, "test": max_test}
    listed = []
    for client, orig in enumerate(random.Random(f"{seed}:clients").sample(train_pool, clients)):
        task = tasks[orig]
        counts = {}
        for split, cap in caps.items():
            examples = draw(task["examples"][split], cap, f"{orig}:{split}")
            put(client_file(dest, client, split).name, examples)  # type: ignore[arg-type]
            counts[split] = len(examples)
        listed.append({"client": client, "orig_client": orig, "category": task["category"], "n": counts})
    heldout, held_listed = [], []
    for orig in sorted(random.Random(f"{seed}:heldout").sample(held_pool, heldout_tasks)):
        examples = draw(tasks[orig]["examples"]["test"], max_heldout, f"{orig}:heldout")
        heldout += [{**ex, "task_id": orig} for ex in examples]
        held_listed.append({"orig_client": orig, "category": tasks[orig]["category"], "n": len(examples)})
    put("heldout_test.json", heldout)
    manifest = {
        "source": {"release": release.name, "tasks": len(ids)},
        "args": {
            "clients": clients,
            "heldout_tasks": heldout_tasks,
            "seed": seed,
            "max_train": max_train,
            "max_eval": max_eval,
            "max_test": max_test,
            "max_heldout": max_heldout,
            "max_prompt_chars": max_prompt_chars,
            "max_output_chars": max_output_chars,
            "min_train": min_train,
            "min_test": min_test,
            "heldout_categories": list(heldout_categories),
        },
        "excluded": excluded,
        "eligible": {"clients": len(train_pool), "heldout": len(held_pool)},
        "clients": listed,
        "heldout": held_listed,
        "sha256": files,
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def build_parser() -> Any:
    """The command line of ``python -m flexlora_plugin.data``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m flexlora_plugin.data", description="Build a federated Natural Instructions split, or a sample of one."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the federated split from the FlexLoRA release folder (data/1613) into DST")
    build.add_argument("release", type=Path, help="the release folder: local_training_<i>.json, ... for its tasks")
    build.add_argument("dest", type=Path)
    for name, default in (("clients", 256), ("heldout-tasks", 24), ("seed", 0), ("max-train", 64)):
        build.add_argument(f"--{name}", type=int, default=default, help=f"(default: {default})")
    cmd = sub.add_parser("sample", help="write the first examples of every client and held-out task to DST")
    cmd.add_argument("source", type=Path, help="a federated Natural Instructions folder (local_training_0.json, ...)")
    cmd.add_argument("dest", type=Path)
    for name, default in (("train", 8), ("eval", 2), ("test", 2), ("heldout-per-task", 4)):
        cmd.add_argument(f"--{name}", type=int, default=default, help=f"(default: {default})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flexlora_plugin.data {build,sample} SRC DST [...]``: build a federated split, or a sample of one."""
    parser = build_parser()
    args = parser.parse_args(argv)
    src = args.release if args.command == "build" else args.source
    if not src.is_dir():
        parser.error(f"{src} is not a folder")
    if args.command == "build":
        try:
            manifest = build_split(
                args.release,
                args.dest,
                clients=args.clients,
                heldout_tasks=args.heldout_tasks,
                seed=args.seed,
                max_train=args.max_train,
            )
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))
        print(
            f"{args.dest}: {len(manifest['clients'])} clients, {len(manifest['heldout'])} held-out tasks "
            f"({sum(h['n'] for h in manifest['heldout'])} examples); left out: {manifest['excluded'] or 'none'}"
        )
        return 0
    manifest = write_sample(
        args.source, args.dest, train=args.train, eval=args.eval, test=args.test, heldout_per_task=args.heldout_per_task
    )
    print(f"{args.dest}: {manifest['clients']} clients, {manifest['heldout_examples']} held-out examples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
