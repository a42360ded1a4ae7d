"""benchmarks/pool_runs.py pools held-out paired comparisons over runs: run directories (eval.json) and evaluate
--out directories (paired.json, one run per LoRA), with the sign test on the summed flips."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from pool_runs import main  # noqa: E402

from rlhf_diffusion.stats import sign_test_p  # noqa: E402


def _comparison(delta: float, up: int, down: int, binary: bool = True) -> dict:
    keys = ("fixed", "broken") if binary else ("rose", "fell")
    return {"delta": delta, keys[0]: float(up), keys[1]: float(down), "paired_se": 0.01, "images": 100.0}


def test_run_directories_and_evaluate_outputs_pool_into_one_row(tmp_path, capsys):
    run = tmp_path / "run_a"
    run.mkdir()
    run.joinpath("eval.json").write_text(
        json.dumps({"paired": {"checker_all": _comparison(0.04, 6, 2), "reward": _comparison(0.01, 60, 40, False)}})
    )
    evaluated = tmp_path / "eval8"
    evaluated.mkdir()
    evaluated.joinpath("paired.json").write_text(
        json.dumps(
            {
                "runs/b": {"checker_all": _comparison(0.02, 5, 3), "checker": _comparison(0.01, 9, 4, False)},
                "runs/c": {"checker_all": _comparison(0.06, 7, 1), "checker": _comparison(0.02, 8, 2, False)},
            }
        )
    )
    assert main([f"m={run},{evaluated}"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:2] == ["m", "3"]
    assert cells[2] == "+0.040 (6/2), +0.020 (5/3), +0.060 (7/1)"
    assert cells[3].startswith("+0.040 ± 0.012")  # stdev(0.04, 0.02, 0.06) / √3 = 0.0115
    assert cells[4] == "18 / 6"
    assert cells[5] == f"{sign_test_p(18, 6):.2g}"
    assert cells[6] == "+0.0100"  # the training reward is only in the run directory's eval.json

    assert main([f"m={evaluated}", "--key", "checker"]) == 0
    cells = [c.strip() for c in capsys.readouterr().out.splitlines()[-1].strip("|").split("|")]
    assert cells[2] == "+0.010 (9/4), +0.020 (8/2)" and cells[4] == "17 / 6"

    assert main([f"m={evaluated}@runs/c"]) == 0  # only the LoRAs whose label starts with the prefix
    cells = [c.strip() for c in capsys.readouterr().out.splitlines()[-1].strip("|").split("|")]
    assert cells[1:3] == ["1", "+0.060 (7/1)"]


def test_a_missing_comparison_names_the_file(tmp_path):
    evaluated = tmp_path / "eval8"
    evaluated.mkdir()
    evaluated.joinpath("paired.json").write_text(json.dumps({"runs/b": {"checker": _comparison(0.01, 9, 4, False)}}))
    try:
        main([f"m={evaluated}"])
    except SystemExit as stop:
        assert "paired.json" in str(stop) and "checker_all" in str(stop)
    else:
        raise AssertionError("no error for a missing comparison")
