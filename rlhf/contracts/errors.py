"""Errors whose message says everything a user needs: what went wrong and what to do.

A command prints one of these as one line, `<command>: <message>`, never with a traceback:
the frames of the library would bury the cause. `Refused` is an input that cannot be used (a
checkpoint that does not fit, none that loads): the run has not gone on, so nothing of it is
rewritten. Any other `OneLine` ends a run that had started (a NaN reward): its error.txt
holds the message.
"""

from __future__ import annotations


class OneLine(Exception):
    """The message is the whole story; a command prints it as one line."""


class Refused(OneLine):
    """An input (a checkpoint, a file, a setting) cannot be used; nothing was changed."""
