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

from flexlora_plugin.federatedscope.shim import fs_package_dir

__all__ = ["fs_main_path", "main"]


def fs_main_path() -> Path:
    """Path of the installed ``federatedscope/main.py``.

    Raises
    ------
    FileNotFoundError
        When the installed FederatedScope has no ``main.py`` (e.g. a wheel without it).
    """
    path = fs_package_dir() / "main.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: FederatedScope must be installed from source (pip install -e) for flexlora-fs"
        )
    return path


def main(argv: list[str] | None = None) -> int:
    """Run FS's ``main.py`` with ``argv`` (default: ``sys.argv[1:]``); return 0 when it finishes."""
    import flexlora_plugin.federatedscope  # noqa: F401  registers config, workers, trainer, data

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        main_py = fs_main_path()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        print(f"flexlora-fs: {err}", file=sys.stderr)
        return 2
    sys.argv = [str(main_py), *args]
    runpy.run_path(str(main_py), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
