"""The one exception a launch reports before the router serves."""

from __future__ import annotations


class LaunchError(Exception):
    """The pool cannot be brought up; the message is written for the operator.

    Raised by `run_pool` before it reports itself started (not enough GPUs, a busy port, a
    command that does not exist, a worker that exits or stays unready during its first
    start). By then every child it spawned has been stopped, so the caller only has to print
    the message and exit non-zero.
    """
