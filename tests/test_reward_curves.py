"""benchmarks/reward_curves.py: checkpoints judged on the same images, placed at their training CPU-seconds and
averaged over runs per method (the evaluations themselves are planted: evaluate's paired.json format)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from reward_curves import group_curve, kept_checkpoints, main, run_points  # noqa: E402


def _run(tmp_path: Path, name: str, cpu: list[float], rewards: list[float], kept: list[int]) -> Path:
    run = tmp_path / name
    run.mkdir()
    for i in kept:
        (run / "checkpoints" / f"iter_{i:06d}").mkdir(parents=True)
    rows = [{"seconds": 1.0, "driver_cpu_seconds": c, "reward_mean": r} for c, r in zip(cpu, rewards)]
    rows.insert(1, {"eval/reward_mean": 0.5})  # an evaluation line has no "seconds": not an iteration
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _paired(out: Path, deltas: dict[int, float]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    paired = {
        f"i{i}": {"checker_all": {"before": 0.5, "after": 0.5 + d, "delta": d, "paired_se": 0.01, "images": 82.0}}
        for i, d in deltas.items()
    }
    (out / "paired.json").write_text(json.dumps(paired))


def test_points_sit_at_the_cumulative_cpu_seconds_of_their_iteration(tmp_path):
    run = _run(tmp_path, "a", [10.0, 20.0, 30.0, 40.0], [0.1, 0.2, 0.3, 0.4], kept=[2, 4])
    assert list(kept_checkpoints(run)) == [2, 4]
    paired = {"i4": {"r": {"delta": 0.2, "paired_se": 0.1}}, "i2": {"r": {"delta": 0.1, "paired_se": 0.1}}}
    points = run_points(run, paired)
    assert [(p["iteration"], p["cpu_seconds"]) for p in points] == [(2, 30.0), (4, 100.0)]
    assert points[1]["rewards"]["r"] == {"delta": 0.2, "paired_se": 0.1}


def test_a_group_averages_runs_at_the_iterations_every_run_kept():
    runs = {
        "s0": [
            {"iteration": 2, "cpu_seconds": 30.0, "rewards": {"r": {"delta": 0.1}}},
            {"iteration": 4, "cpu_seconds": 100.0, "rewards": {"r": {"delta": 0.3}}},
        ],
        "s1": [{"iteration": 4, "cpu_seconds": 80.0, "rewards": {"r": {"delta": 0.1}}}],
    }
    curve = group_curve(runs)
    assert [p["iteration"] for p in curve] == [0, 4]  # the base model at 0 s, then the common iteration
    assert curve[0]["rewards"]["r"]["delta"] == 0.0
    assert curve[1]["cpu_seconds"] == pytest.approx(90.0)
    assert curve[1]["rewards"]["r"]["delta"] == pytest.approx(0.2)
    assert curve[1]["rewards"]["r"]["se"] == pytest.approx(0.1)  # stdev 0.1414 / sqrt 2


def test_main_writes_the_curves_from_kept_evaluations(tmp_path, capsys):
    a = _run(tmp_path, "m_s0", [10.0, 10.0], [0.5, 0.6], kept=[1, 2])
    b = _run(tmp_path, "m_s1", [12.0, 12.0], [0.4, 0.4], kept=[1, 2])
    out = tmp_path / "curves"
    _paired(out / "m" / "m_s0", {1: 0.02, 2: 0.06})
    _paired(out / "m" / "m_s1", {1: 0.00, 2: 0.02})
    assert main([f"m={a},{b}", "--out", str(out)]) == 0
    data = json.loads((out / "curves.json").read_text())
    last = data["curves"]["m"][-1]
    assert (last["iteration"], last["cpu_seconds"]) == (2, 22.0)
    assert last["rewards"]["checker_all"]["delta"] == pytest.approx(0.04)
    assert data["logged"]["m"] == {"m_s0": [0.5, 0.6], "m_s1": [0.4, 0.4]}
    assert (out / "curves.png").stat().st_size > 1000
    text = capsys.readouterr().out
    assert "| m | 2 | 22 | +0.040 ± 0.020 | +0.060, +0.020 |" in text
    assert "| m | 0.4500 | 0.5000 | +0.0500 |" in text


def test_every_keeps_the_multiples_and_reuses_a_wider_evaluation(tmp_path):
    a = _run(tmp_path, "m_s0", [10.0] * 4, [0.5] * 4, kept=[1, 2, 3, 4])
    out = tmp_path / "curves"
    _paired(out / "m" / "m_s0", {1: 0.01, 2: 0.02, 3: 0.03, 4: 0.04})
    assert main([f"m={a}", "--out", str(out), "--every", "m=2"]) == 0
    curve = json.loads((out / "curves.json").read_text())["curves"]["m"]
    assert [p["iteration"] for p in curve] == [0, 2, 4]
    with pytest.raises(SystemExit, match="--every 'x=2'"):
        main([f"m={a}", "--out", str(out), "--every", "x=2"])


def test_a_run_without_checkpoints_is_named(tmp_path):
    run = _run(tmp_path, "bare", [1.0], [0.1], kept=[])
    with pytest.raises(SystemExit, match="bare/checkpoints: no checkpoint kept"):
        main([f"m={run}", "--out", str(tmp_path / "o")])
