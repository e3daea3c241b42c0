"""Install / remove the one-module shim that makes FS's own ``main.py`` load the plugin.

``python -m flexlora_plugin.federatedscope.shim install|remove|status [--fs-dir DIR]`` manages
``<federatedscope>/contrib/configs/flexlora_plugin.py``. FS imports every module of
``federatedscope/contrib/configs`` while it builds its global config, so with the shim in place
``python federatedscope/main.py --cfg yaml_configs/flexlora.yaml`` registers FlexLoRA before the
config is built. The shim turns a missing ``flexlora_plugin`` into a ``RuntimeError`` (FS swallows
``ImportError`` from some contrib packages, which would otherwise hide it).

This module imports nothing from FederatedScope (it only locates the package), so its logic is
testable without FS; it uses absolute imports so that tests may load it by file path.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Literal

__all__ = ["SHIM_NAME", "SHIM_SOURCE", "fs_package_dir", "install", "main", "remove", "shim_path", "status"]

SHIM_NAME = "flexlora_plugin.py"
MARKER = "# flexlora-plugin shim"
SHIM_SOURCE = f"""{MARKER}: written by `python -m flexlora_plugin.federatedscope.shim install`; delete with `... shim remove`.
try:
    import flexlora_plugin.federatedscope  # noqa: F401  registers FlexLoRA (config, workers, trainer, data) with FS
except ImportError as err:  # FS swallows ImportError from some contrib packages: fail loudly instead
    raise RuntimeError(
        f"{{__file__}}: cannot import flexlora_plugin.federatedscope ({{err}}). Install flexlora-plugin into this "
        "environment, or remove this file (python -m flexlora_plugin.federatedscope.shim remove)"
    ) from err
"""
State = Literal["installed", "absent", "foreign"]


def fs_package_dir() -> Path:
    """The installed ``federatedscope`` package folder, located without importing it.

    Raises
    ------
    ModuleNotFoundError
        When FederatedScope is not installed in this environment.
    """
    spec = importlib.util.find_spec("federatedscope")
    if spec is None or spec.origin is None or not spec.submodule_search_locations:  # origin None: a namespace package
        raise ModuleNotFoundError("FederatedScope (package 'federatedscope') is not importable in this environment")
    return Path(next(iter(spec.submodule_search_locations)))


def shim_path(fs_dir: str | os.PathLike[str]) -> Path:
    """``<fs_dir>/contrib/configs/flexlora_plugin.py``; ``fs_dir`` must be an FS package folder.

    Raises
    ------
    FileNotFoundError
        When ``fs_dir/contrib/configs`` does not exist.
    """
    configs = Path(fs_dir) / "contrib" / "configs"
    if not configs.is_dir():
        raise FileNotFoundError(f"{configs} does not exist: {fs_dir} is not a FederatedScope package folder")
    return configs / SHIM_NAME


def status(fs_dir: str | os.PathLike[str]) -> State:
    """``installed`` (our shim), ``absent``, or ``foreign`` (another file with the shim's name)."""
    path = shim_path(fs_dir)
    if not path.exists():
        return "absent"
    return "installed" if path.read_text(encoding="utf-8").startswith(MARKER) else "foreign"


def install(fs_dir: str | os.PathLike[str]) -> Path:
    """Write the shim (atomically) and return its path; rewrites an older shim of ours.

    Raises
    ------
    FileExistsError
        When a file that is not our shim has the shim's name.
    """
    path = shim_path(fs_dir)
    if status(fs_dir) == "foreign":
        raise FileExistsError(f"{path} exists and is not the flexlora-plugin shim; not overwriting it")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(SHIM_SOURCE, encoding="utf-8")
    os.replace(tmp, path)
    return path


def remove(fs_dir: str | os.PathLike[str]) -> bool:
    """Delete our shim; return False when there was none.

    Raises
    ------
    FileExistsError
        When the file with the shim's name is not ours.
    """
    path = shim_path(fs_dir)
    state = status(fs_dir)
    if state == "foreign":
        raise FileExistsError(f"{path} is not the flexlora-plugin shim; not removing it")
    if state == "absent":
        return False
    path.unlink()
    stale = path.parent / "__pycache__"
    for cached in stale.glob("flexlora_plugin.*.pyc") if stale.is_dir() else ():
        cached.unlink()
    return True


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flexlora_plugin.federatedscope.shim``."""
    parser = argparse.ArgumentParser(prog="python -m flexlora_plugin.federatedscope.shim", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["install", "remove", "status"])
    parser.add_argument("--fs-dir", help="federatedscope package folder (default: the installed one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line: ``install``, ``remove`` or ``status``; prints one line, returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        fs_dir = Path(args.fs_dir) if args.fs_dir else fs_package_dir()
        if args.command == "install":
            print(f"installed {install(fs_dir)}")
        elif args.command == "remove":
            print(f"removed {shim_path(fs_dir)}" if remove(fs_dir) else f"no shim at {shim_path(fs_dir)}")
        else:
            print(f"{status(fs_dir)}: {shim_path(fs_dir)}")
    except (ModuleNotFoundError, FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
