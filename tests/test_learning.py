"""Every method, 15 iterations on the tiny SDXL-shaped pipeline: the held-out reward rises.

SDXL is the path with the most parts (two text encoders, pooled embeddings, added time ids); the SD1.5-shaped path
trains end to end in the embedded default's two-seed test (tests/test_default_aligns.py: the testbed pipeline is
SD1.5-shaped) and every method's rollout and one descent step on the tiny SD1.5 pipeline are checked in
tests/algorithms/test_methods.py. The SD1.5 cases of this file (`benchmarks/tiny_learning.py --kinds sd15`) were cut
to keep CI under 25 minutes: they took about 4.5 CPU-minutes.

The reward is the differentiable `saturation` pixel statistic (TailorPO-G needs a gradient; one reward keeps the
table comparable). Evaluation uses 4 held-out prompts × 4 fixed seeds, so "before" is the same number for every
method of a pipeline and the comparison is deterministic for the fixed run seed. Figures: benchmarks/tiny_learning.py.

The runs go two at a time through a pool of two worker processes at one torch thread each (on the 2-core CI
machine that is about twice as fast as one after another at two threads: the tiny models barely use a second
thread); each case's test then checks its own run's figures.
"""

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from tiny_learning import METHODS, run_case  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_learning.yaml"


CASES = [("sdxl", method) for method in METHODS]

# About how long a case runs on one thread (CI machine), so the pool starts the longest first.
SECONDS = {"d3po": 110, "tailorpo_g": 85, "tailorpo": 75}
# 15, not 30 (CI time): held-out saturation 0.3629 before; after 15 iterations D3PO +0.0056, TailorPO +0.0127,
# TailorPO-G +0.0505, DDE +0.0023, DDE-Single +0.0023, Diffusion-DPO +0.0007, DRaFT (DRaFT-1) +0.0251
# (`python benchmarks/tiny_learning.py --kinds sdxl --iterations 15 --rewards saturation`; after 20: +0.0043, +0.0203,
# +0.0623, +0.0026, +0.0026, +0.0012, +0.0381). The module took 108 s on 2 cores (205 CPU-seconds) at 15.
ITERATIONS = 15


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case's figures (or the exception its run raised), computed two at a time."""
    out = tmp_path_factory.mktemp("learning")
    slowest_first = sorted(CASES, key=lambda case: SECONDS.get(case[1], 30), reverse=True)
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {
            case: pool.submit(run_case, str(CONFIG), *case, "saturation", ITERATIONS, str(out / "_".join(case)), 1)
            for case in slowest_first
        }
        return {case: future.exception() or future.result() for case, future in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "method"), CASES)
def test_fifteen_iterations_raise_held_out_reward(kind, method, runs):
    run = runs[(kind, method)]
    if isinstance(run, BaseException):
        raise run
    assert run["iterations"] == ITERATIONS
    assert run["every_iteration_stepped"]
    assert run["lora_b_moved"]
    assert run["after"] > run["before"], (
        f"{kind}/{method}: held-out saturation {run['before']:.5f} -> {run['after']:.5f}"
    )
    assert run["lora_exported"]
