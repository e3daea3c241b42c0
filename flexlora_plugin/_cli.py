"""What every command line of the plugin shares: ``--help`` that shows each default."""

from __future__ import annotations

import argparse

__all__ = ["DefaultsHelp"]


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after every option that has one; nothing after flags (store_true/false) or empty defaults."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "") or isinstance(action, (argparse._HelpAction, argparse._StoreConstAction)):
            return action.help
        if isinstance(action.default, list) and not action.default:
            return action.help
        return super()._get_help_string(action)
