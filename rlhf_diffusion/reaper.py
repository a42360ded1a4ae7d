"""Leaves nothing running after a launcher that started a local Ray instance dies, however it dies.

`ray.init(address="local")` starts the GCS server and the raylet as the launcher's children, and the raylet starts
the dashboard agent, the runtime-env agent and the workers (the actors). When the launcher ends normally,
`ray.shutdown()` stops them all. When it is killed with -9, Ray's own fate-sharing stops the GCS, the raylet and the
workers within seconds, but the two agents only notice that their raylet is gone after trying to report its logs to
the dead GCS: measured here, they kept listening for 60-90 s.

`start_reaper()` (called by launch.py right after it started the local instance) spawns this module as a separate
process in its own session. It polls the launcher every half second, remembering every process below it; once the
launcher is gone it gives Ray `GRACE_SECONDS` to stop its own processes and kills the rest. The processes it
remembers are psutil handles, so a PID reused by an unrelated process is never killed. It only ever acts on the
launcher's own descendants: a cluster joined through RAY_ADDRESS is never touched (launch.py does not start a
reaper for it).

    python -m rlhf_diffusion.reaper PID     # what start_reaper runs
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_SECONDS = 0.5
GRACE_SECONDS = 3.0


def start_reaper(owner_pid: int | None = None) -> subprocess.Popen:
    """Starts the reaper for `owner_pid` (default: this process) and returns it (it ends on its own)."""
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf_diffusion.reaper", str(owner_pid or os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not in the launcher's process group: a Ctrl-C there does not stop it first
        close_fds=True,
    )


def reap(owner_pid: int, poll_seconds: float = POLL_SECONDS, grace_seconds: float = GRACE_SECONDS) -> int:
    """Waits for `owner_pid` to end, then kills its remembered descendants that are still alive. Returns how many
    it killed."""
    import psutil

    try:
        owner = psutil.Process(owner_pid)
    except psutil.NoSuchProcess:
        return 0
    me = os.getpid()
    known: dict[int, psutil.Process] = {}
    while _alive(owner):
        try:
            for child in owner.children(recursive=True):
                if child.pid != me:
                    known.setdefault(child.pid, child)
        except psutil.Error:
            pass
        time.sleep(poll_seconds)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(_alive(p) for p in known.values()):
        time.sleep(0.1)
    killed = 0
    for process in known.values():
        if _alive(process):  # is_running() also checks the creation time: a reused PID is another process
            try:
                process.kill()
                killed += 1
            except psutil.Error:
                pass
    return killed


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


if __name__ == "__main__":
    reap(int(sys.argv[1]))
