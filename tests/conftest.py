"""Shared fixtures: tiny random-weight SD1.5 / SDXL pipeline directories, built once per test session.

Every test that needs a model loads it from one of these directories through the production loader
(`rlhf_diffusion.models.load_diffusion_model`), so tests exercise the same code path as real checkpoints.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

# Every Ray instance of the session is local and reached through loopback: with this set before ray is imported, Ray
# takes 127.0.0.1 as the node address in this process (the drivers), in the `ray start` heads and in every launch the
# tests start, as rlhf_diffusion/launch.py does for its own local instance. Without it a driver here would look for
# the GCS at the machine's network address, where a loopback-bound head does not listen.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# One math thread per process, here and in every process the tests start (launches, benchmark workers): the suite
# runs as 2 workers on a 2-core machine, and a process at 2 threads on cores the other worker keeps busy spends its
# time in OpenMP's waiting threads (the testbed's miniature training run took 100-270 s at 2 threads, 27 s at 1).
# Set before torch is imported; a test that wants more sets it itself.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from rlhf_diffusion.models.tiny import build_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and two threads crawl when the machine's cores are busy: a module
    that uses this runs its tests on one torch thread and restores the count afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory) -> Path:
    """A tiny SD1.5 pipeline directory (64x64 images, 4x16x16 latents, text width 32)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd15"), "sd15")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny SDXL pipeline directory (64x64 images, 4x16x16 latents, text width 32 + 32, pooled 32)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sdxl"), "sdxl")


# ---------------------------------------------------------------------------------------------------------------
# A real local Ray cluster on 127.0.0.1 (head node with the job server), started once for the tests that need it
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RayCluster:
    """A `ray start --head --block` process we own: its GCS address (for ray.init / RAY_ADDRESS) and its job server
    URL (for `ray job submit --address`)."""

    gcs_address: str
    dashboard_url: str
    ray_bin: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A head node shared by the session's Ray tests (see `_ray_head`)."""
    yield from _ray_head(tmp_path_factory)


@pytest.fixture(scope="module")
def own_ray_cluster(tmp_path_factory):
    """A head node for one test module only: the `ray job submit` tests, kept apart from the session cluster's
    actor-kill tests."""
    yield from _ray_head(tmp_path_factory)


def _ray_head(tmp_path_factory):
    """Starts a head node bound to loopback (8 logical CPUs, no GPU) and stops it, and only it, at the end."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    # Every port is chosen free: the dashboard agent's HTTP port (which serves `ray job submit`) otherwise defaults to
    # 52365 on every node, so a second Ray instance on the machine (the other xdist worker's head, or a local
    # `ray.init` in a launch test) leaves this head with no job agent ("No available agent to submit job").
    port, dashboard_port, agent_port = _free_port(), _free_port(), _free_port()
    log = open(tmp_path_factory.mktemp("ray") / "ray_start.log", "w")
    # os.environ carries RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (top of this file): head and drivers agree on loopback
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard_port),
            "--dashboard-agent-listen-port",
            str(agent_port),
            "--num-cpus",
            "8",
            "--num-gpus",
            "0",
            "--include-dashboard",
            "true",
            "--disable-usage-stats",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    cluster = RayCluster(
        gcs_address=f"127.0.0.1:{port}", dashboard_url=f"http://127.0.0.1:{dashboard_port}", ray_bin=ray_bin
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ray start exited with {process.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(f"{cluster.dashboard_url}/api/version", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not come up in 120 s; see {log.name}")
            time.sleep(1)
        yield cluster
    finally:
        import ray

        # only a driver connected to this head: a module's own head (own_ray_cluster) ending must not disconnect this
        # worker process from the session cluster that ray_connected joined for the rest of the session (it did, and
        # the next module's ray.remote auto-started a local Ray and hung)
        if ray.is_initialized() and ray.get_runtime_context().gcs_address.endswith(f":{port}"):
            ray.shutdown()
        if process.poll() is None:
            import psutil

            tree = psutil.Process(process.pid).children(recursive=True)
            os.killpg(process.pid, signal.SIGTERM)  # `ray start --block` stops its own processes on SIGTERM ...
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # ... but took 34 s to (its agents wait on the dead GCS)
                process.wait()
            for child in tree:  # whatever of this head outlived it, and only that
                if child.is_running():
                    try:
                        child.kill()
                    except psutil.Error:
                        pass
        log.close()


@pytest.fixture(scope="session")
def ray_connected(ray_cluster):
    """This test process connected to the shared cluster as a driver (for the rest of the session)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster.gcs_address, logging_level="WARNING")
    yield ray_cluster
