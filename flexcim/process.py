"""Child processes (compilers, simulators, synthesis) that end with the command.

:func:`run` is :func:`subprocess.run` with the child in a process group of its own: on any
exception while it runs (Ctrl-C, SIGTERM turned into KeyboardInterrupt by the CLI, a timeout)
the whole group -- ``make`` and every ``c++``/``cc1plus`` it started -- gets SIGTERM, then
SIGKILL after a grace period, before the exception goes on.  A terminal's Ctrl-C reaches only
the foreground group, ours; the children hear of it from here, so none is left running.
When this process is killed outright (SIGKILL: nothing runs), the kernel sends the direct child
SIGTERM (``PR_SET_PDEATHSIG``), and ``make`` passes it on to its compilers.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Sequence

GRACE_S = 2.0
_PR_SET_PDEATHSIG = 1
try:  # resolved here, not in the forked child (no dynamic loading between fork and exec)
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: Ctrl-C and SIGTERM are still handled
    _prctl = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_group(proc: subprocess.Popen, grace: float = GRACE_S) -> None:
    """End ``proc``'s process group: SIGTERM, up to ``grace`` seconds, then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    # make may be gone while its compilers are not: the group outlives its leader.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run(cmd: Sequence[str], *, input: str | bytes | None = None, capture_output: bool = False,
        timeout: float | None = None, **popen) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion in its own process group (see the module docstring).

    Arguments are those of :func:`subprocess.run` (``cwd``, ``env``, ``stdout``, ``stderr``,
    ``text``); ``check`` is not supported: the caller reads ``returncode``.
    """
    if capture_output:
        popen.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input is not None:
        popen["stdin"] = subprocess.PIPE
    with subprocess.Popen(list(cmd), start_new_session=True, preexec_fn=_die_with_parent,
                          **popen) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except BaseException:
            stop_group(proc)
            raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)
