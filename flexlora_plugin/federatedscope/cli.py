"""``flexlora-fs``: FederatedScope's own ``main.py`` with the plugin registered first.

``flexlora-fs --cfg yaml_configs/flexlora.yaml [--client_cfg C.yaml] [key value ...]`` passes
its arguments to ``federatedscope/main.py`` unchanged (run with ``runpy`` as ``__main__``).
Importing this module imports :mod:`flexlora_plugin.federatedscope`, which registers the plugin
(and raises a clear ``ImportError`` when FederatedScope / FS-LLM is missing).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

PROG = "flexlora-fs"

__all__ = ["check_args", "fs_main_path", "main"]


def fs_main_path() -> Path:
    """Path of the installed ``federatedscope/main.py``.

    Raises
    ------
    FileNotFoundError
        When the installed FederatedScope has no ``main.py`` (e.g. a wheel without it).
    """
    from flexlora_plugin.federatedscope.shim import fs_package_dir  # here: importing the package needs FederatedScope

    path = fs_package_dir() / "main.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: FederatedScope must be installed from source (pip install -e) for flexlora-fs"
        )
    return path


def check_args(args: list[str]) -> list[str]:
    """Check a ``flexlora-fs`` command line before FederatedScope loads data or a model.

    Merges ``--cfg`` and the ``key value`` pairs into a copy of FS's global config exactly as
    ``main.py`` does, then runs the plugin's config check and the checks FS would only reach
    after building the data: rounds, the Natural Instructions folder, a local model folder.

    Returns
    -------
    list[str]
        Notes worth a line (e.g. a model name FS will look up on the Hugging Face hub).

    Raises
    ------
    ValueError
        One line naming the key or file.
    """
    from federatedscope.core.cmd_args import parse_args, parse_client_cfg
    from federatedscope.core.configs.config import global_cfg

    from flexlora_plugin.data import missing_clients
    from flexlora_plugin.federatedscope.config import assert_flexlora_cfg, cfg_value, using_cfg_file
    from flexlora_plugin.federatedscope.data import DATA_TYPE

    parsed = parse_args(args)
    if not parsed.cfg_file:
        raise ValueError("--cfg FILE.yaml is required (e.g. --cfg yaml_configs/tiny_cpu.yaml)")
    for flag, path in (("--cfg", parsed.cfg_file), ("--client_cfg", parsed.client_cfg_file)):
        if path and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file (paths are relative to {Path.cwd()})")
    if len(parsed.opts) % 2:
        raise ValueError(f"options must be 'key value' pairs, got an odd number: {parsed.opts}")
    cfg: Any = global_cfg.clone()
    try:
        with using_cfg_file(parsed.cfg_file):  # relative inputs may be relative to the yaml's folder
            cfg.merge_from_file(parsed.cfg_file)
            cfg.merge_from_list(parse_client_cfg(parsed.opts)[0])
            assert_flexlora_cfg(cfg)
    except (KeyError, ValueError, AssertionError, TypeError) as err:
        raise ValueError(str(err).strip("'\"")) from err
    notes: list[str] = []
    if int(cfg_value(cfg.federate.total_round_num)) < 1:
        raise ValueError(f"federate.total_round_num must be >= 1, got {cfg_value(cfg.federate.total_round_num)}")
    if str(cfg_value(cfg.data.type)).lower() == DATA_TYPE:
        root, clients = Path(str(cfg_value(cfg.data.root))), int(cfg_value(cfg.federate.client_num))
        missing = missing_clients(root, clients)
        if missing:
            raise ValueError(
                f"data.root {root}: no local_training_<i>.json for client(s) {[i + 1 for i in missing[:5]]} "
                f"of federate.client_num {clients}"
            )
    name, _, hub = str(cfg_value(cfg.model.type)).partition("@")
    if hub == "huggingface_llm" and not Path(name).exists():
        if Path(name).is_absolute() or name.startswith(".") or name.count("/") != 1:
            raise ValueError(f"model.type {name}: no such folder")
        notes.append(
            f"model.type {name} is not a local folder: FederatedScope will look it up on the Hugging Face hub "
            "(for the tiny model, build it first: see docs/tutorials/federatedscope.md)"
        )
    return notes


def main(argv: list[str] | None = None) -> int:
    """Run FS's ``main.py`` with ``argv`` (default: ``sys.argv[1:]``); 0 when it finishes, 2 on a bad option."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        import flexlora_plugin.federatedscope  # noqa: F401  registers config, workers, trainer, data

        main_py = fs_main_path()
    except (ImportError, FileNotFoundError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    if args and args[0] not in ("-h", "--help"):
        try:
            for note in check_args(args):
                print(f"{PROG}: note: {note}", file=sys.stderr)
        except ValueError as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 2
    sys.argv = [str(main_py), *args]
    runpy.run_path(str(main_py), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
