"""benchmarks/equal_seconds.py: which checkpoint of a run matches a CPU-seconds budget, from metrics.jsonl."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from equal_seconds import closest_iteration, cumulative_seconds, main  # noqa: E402


def _run(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    run = tmp_path / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_cpu_seconds_are_summed_and_wall_time_is_the_fallback(tmp_path):
    cpu = _run(
        tmp_path, "cpu", [{"seconds": 9.0, "driver_cpu_seconds": 5.0}, {"seconds": 9.0, "driver_cpu_seconds": 4.0}]
    )
    old = _run(tmp_path, "old", [{"seconds": 9.0, "driver_cpu_seconds": 5.0}, {"seconds": 7.0}])  # mixed: wall
    assert cumulative_seconds(cpu) == [5.0, 9.0]
    assert cumulative_seconds(cpu, wall=True) == [9.0, 18.0]
    assert cumulative_seconds(old) == [9.0, 16.0]


def test_the_closest_iteration_wins_and_the_earlier_on_a_tie():
    assert closest_iteration([10.0, 20.0, 30.0], 24.0) == 2
    assert closest_iteration([10.0, 20.0, 30.0], 26.0) == 3
    assert closest_iteration([10.0, 20.0, 30.0], 25.0) == 2
    assert closest_iteration([10.0, 20.0, 30.0], 100.0) == 3


def test_lora_args_name_the_checkpoint_of_the_target_from_reference_runs(tmp_path, capsys):
    reference = _run(tmp_path, "ref", [{"seconds": 1.0, "driver_cpu_seconds": 30.0}] * 2)  # 60 s in all
    run = _run(tmp_path, "d3po_s0", [{"seconds": 1.0, "driver_cpu_seconds": 25.0}] * 4)  # 25, 50, 75, 100
    (run / "checkpoints" / "iter_000002").mkdir()
    assert main([str(run), "--target-from", str(reference), "--lora-args"]) == 0
    assert capsys.readouterr().out.split() == ["--lora", f"d3po_s0_i2={run / 'checkpoints' / 'iter_000002'}"]
