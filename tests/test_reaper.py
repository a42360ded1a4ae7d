"""The reaper (rlhf_diffusion/reaper.py) on real processes: after its owner is killed with -9 it kills the owner's
descendants that outlived it (as Ray's agents do for 60-90 s), and nothing else. The launch-level check, a local
Ray instance's processes on loopback and gone after the launcher, is in tests/test_launch.py."""

import signal
import subprocess
import sys
import time

import psutil

from rlhf_diffusion.reaper import GRACE_SECONDS, start_reaper

# The owner starts a grandchild in its own session (so a signal to the owner's group does not reach it) and waits.
OWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(300)
"""


def wait_gone(process: psutil.Process, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


def test_after_its_owner_is_killed_the_reaper_kills_the_owners_descendants_only():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    grandchild = psutil.Process(int(owner.stdout.readline()))
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # not the owner's
    reaper = start_reaper(owner.pid)
    try:
        time.sleep(1.5)  # the reaper has seen the owner's tree
        assert reaper.poll() is None  # it waits while the owner lives
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert grandchild.is_running()  # the owner's death alone leaves it running
        assert wait_gone(grandchild, GRACE_SECONDS + 10), "the owner's grandchild outlived the reaper's grace period"
        assert reaper.wait(timeout=10) == 0  # and the reaper ends by itself
        assert bystander.poll() is None
    finally:
        for process in (bystander, reaper):
            process.kill()
            process.wait()
        if grandchild.is_running():
            grandchild.kill()


def test_a_reaper_for_a_process_that_is_gone_ends_at_once():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    reaper = start_reaper(gone.pid)
    assert reaper.wait(timeout=30) == 0
