"""``python -m flexlora_plugin.tools.api_index DOC [--write]``: the index of public names in DOC, from the docstrings.

Every name a user may import (``__all__`` of :mod:`flexlora_plugin.core` and
:mod:`flexlora_plugin.flower`) with the first line of its docstring, written between two markers
of ``docs/api.md``. Without ``--write`` it checks: exit 1 and a diff when the page is out of date.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import sys
from pathlib import Path

MODULES = ("flexlora_plugin.core", "flexlora_plugin.flower")
BEGIN = "<!-- api-index: generated from the docstrings by `python -m flexlora_plugin.tools.api_index docs/api.md --write` -->"
END = "<!-- /api-index -->"


def summary(obj: object) -> str:
    """The first line of ``obj``'s docstring; for a constant, its value."""
    if inspect.isclass(obj) or inspect.isroutine(obj):
        doc = inspect.getdoc(obj) or ""
        if not doc.strip():
            raise ValueError(f"{getattr(obj, '__qualname__', obj)} has no docstring")
        return doc.strip().splitlines()[0].replace("|", "\\|")
    text = repr(obj)
    return f"`{text if len(text) <= 60 else text[:57] + '...'}`".replace("|", "\\|")


def kind(obj: object) -> str:
    return "class" if inspect.isclass(obj) else "function" if inspect.isroutine(obj) else "constant"


def index() -> str:
    """The generated section: one table per module, names sorted."""
    parts = [BEGIN]
    for name in MODULES:
        module = importlib.import_module(name)
        parts += ["", f"### `{name}`", "", "| name | kind | summary |", "|---|---|---|"]
        for public in sorted(module.__all__, key=str.lower):
            obj = getattr(module, public)
            parts.append(f"| `{public}` | {kind(obj)} | {summary(obj)} |")
    parts += ["", END]
    return "\n".join(parts)


def updated(text: str) -> str:
    """``text`` with its section between the markers replaced by :func:`index`."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the page has no {BEGIN!r} ... {END!r} section")
    return text[:start] + index() + text[end + len(END) :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexlora_plugin.tools.api_index", description=__doc__.splitlines()[0])
    parser.add_argument("doc", type=Path, help="the page holding the index (docs/api.md)")
    parser.add_argument("--write", action="store_true", help="rewrite the section instead of checking it")
    args = parser.parse_args(argv)
    text = args.doc.read_text(encoding="utf-8")
    new = updated(text)
    if args.write:
        args.doc.write_text(new, encoding="utf-8")
        return 0
    if new != text:
        sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), str(args.doc), "generated"))
        print(f"{args.doc} is out of date: python -m flexlora_plugin.tools.api_index {args.doc} --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
