"""benchmarks/reliability_probe.py's verdicts on a refused launch and its report table (the probe itself is a
benchmark, run by hand: docs/reliability.md)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from reliability_probe import Result, Run, all_probes, error_problems, markdown_report  # noqa: E402


def refused(rc: int, stderr: str, stdout: str = "") -> Run:
    return Run(args=[], rc=rc, stdout=stdout, stderr=stderr, seconds=1.0, max_rss_mb=100.0)


def test_a_refusal_is_one_error_line_naming_the_field_and_the_report_counts_failed_probes():
    ok = refused(2, "warning: 3 corrupt rows skipped\nerror: data.path: /x.parquet yields no pair\n")
    assert error_problems(ok, "data.path", "/x.parquet") == []
    assert error_problems(refused(1, "Traceback (most recent call last):\n  ...\nRecursionError: deep\n")) == [
        "exit code 1, expected 2",
        "a traceback on stderr",
        "0 'error: ' lines (last stderr line: 'RecursionError: deep')",
    ]
    twice = refused(2, "error: one\nerror: two\n", stdout="[launch] started a local Ray instance\n")
    assert error_problems(twice, "three") == [
        "2 'error: ' lines (last stderr line: 'error: two')",
        "message does not name 'three'",
        "Ray started before the refusal",
    ]
    results = [
        Result("yaml", "alias_bomb", True, [], 1.0, []),
        Result("yaml", "deep", False, ["a traceback on stderr"], 1.0, []),
        Result("ray", "loopback", True, [], 1.0, []),
    ]
    report = markdown_report(results, 120.0, "python benchmarks/reliability_probe.py --jobs 1")
    assert "| yaml | 2 | 1 | 1 |\n| ray | 1 | 1 | 0 |\n| **all** | **3** | **2** | **1** |" in report
    assert "- yaml/deep: a traceback on stderr" in report and ": 2.0 min." in report
    probes = all_probes()
    assert len({(p.category, p.name) for p in probes}) == len(probes) >= 87
    assert sum(p.category == "bad_config" for p in probes) == 39
