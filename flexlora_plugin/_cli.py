"""What every command line of the plugin shares: ``--help`` that shows each default."""

from __future__ import annotations

import argparse

__all__ = ["DefaultsHelp", "flexlora_fs"]


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after every option that has one; nothing after flags (store_true/false) or empty defaults."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "") or isinstance(action, (argparse._HelpAction, argparse._StoreConstAction)):
            return action.help
        if isinstance(action.default, list) and not action.default:
            return action.help
        return super()._get_help_string(action)


def flexlora_fs() -> int:
    """The ``flexlora-fs`` console script: FederatedScope's ``main.py`` with the plugin; one line, exit 2, where FS is missing."""
    import sys

    try:
        from flexlora_plugin.federatedscope.cli import main
    except ImportError as err:  # the Flower environment: FederatedScope cannot be installed beside Flower
        print(f"flexlora-fs: {err}", file=sys.stderr)
        return 2
    return main()
