"""Error types. A :class:`UserError` is a problem with the user's input: the CLI prints its
one-line message and exits with code 2 (a traceback only with ``--debug``)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a file, a flag, a config value. The message names the problem."""
