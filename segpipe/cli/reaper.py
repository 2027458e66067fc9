"""No process outlives its run: a small watchdog that kills what a ``segpipe`` command started once the command is
gone, however it went (success, error, SIGTERM, SIGKILL, the OOM killer).

The command starts the watchdog (:func:`start_reaper`) with a pipe on its standard input and keeps the pipe's
other end open for its whole life; the kernel closes it when the command dies. The watchdog notes the command's
descendants every :data:`INTERVAL` seconds (from /proc: process id and start time, so a reused process id is never
mistaken for one of them) and, when its input closes, sends SIGTERM to those still alive, then SIGKILL to those
that remain after :data:`GRACE` seconds: Prefect's temporary API server, a local Ray instance (GCS, raylet, workers,
agents), anything else. It runs in a session of its own, so a signal to the command's process group does not reach
it first. Linux only (elsewhere :func:`start_reaper` does nothing); only the standard library is imported.

A descendant started less than :data:`INTERVAL` seconds before the command died can be missed.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

INTERVAL = 0.5
GRACE = 3.0


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks), for every process /proc shows."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(entry)] = (int(fields[1]), int(fields[19]))
    return found


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live descendant of ``root``."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found: dict[int, int] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        if pid in found or pid == os.getpid():
            continue
        found[pid] = table[pid][1]
        stack.extend(children.get(pid, []))
    return found


def _alive(pid: int, started: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return int(fields[19]) == started and fields[0] != "Z"


def watch(root: int) -> None:
    """Note ``root``'s descendants until standard input closes, then end those still alive."""
    seen: dict[int, int] = {}
    while True:
        seen.update(descendants(root))
        ready, _, _ = select.select([sys.stdin], [], [], INTERVAL)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
    targets = {pid: started for pid, started in seen.items() if _alive(pid, started)}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, started in targets.items():
            if _alive(pid, started):
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + GRACE
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in targets.items()):
            time.sleep(0.05)


def start_reaper() -> int | None:
    """Start the watchdog for this process; returns the pipe's write end (kept open until this process ends), or
    None where there is no /proc."""
    if not Path("/proc/self/stat").exists():
        return None
    read, write = os.pipe()
    subprocess.Popen(
        [sys.executable, "-m", "segpipe.cli.reaper", str(os.getpid())],
        stdin=read,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.close(read)
    return write


if __name__ == "__main__":
    watch(int(sys.argv[1]))
