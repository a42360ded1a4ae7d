"""benchmarks/best_of_n.py: best of n candidates by one reward, judged by another, against candidate 0."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from best_of_n import main, select_best, table  # noqa: E402

from rlhf_diffusion.stats import sign_test_p  # noqa: E402


def test_select_best_keeps_the_selectors_first_maximum_among_the_first_n():
    # 3 candidates (rows) x 4 slots (columns)
    select = torch.tensor([[0.5, 0.9, 0.2, 0.7], [0.6, 0.1, 0.2, 0.7], [0.9, 0.0, 0.9, 0.1]])
    judge = torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    chosen, selector = select_best(select, judge, 1)
    assert chosen.tolist() == [0.0, 1.0, 0.0, 1.0] and selector.tolist() == pytest.approx([0.5, 0.9, 0.2, 0.7])
    chosen, _ = select_best(select, judge, 2)  # slot 2 ties (0.2, 0.2): the earliest, candidate 0; slot 3 too
    assert chosen.tolist() == [1.0, 1.0, 0.0, 1.0]
    chosen, selector = select_best(select, judge, 3)
    assert chosen.tolist() == [0.0, 1.0, 1.0, 1.0] and selector.tolist() == pytest.approx([0.9, 0.9, 0.9, 0.7])


def test_table_reports_best_of_n_and_the_oracle_against_candidate_zero():
    select = torch.tensor([[0.1, 0.1, 0.9, 0.5], [0.9, 0.2, 0.1, 0.4], [0.3, 0.8, 0.2, 0.1], [0.2, 0.7, 0.3, 0.9]])
    judge = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    rows = table({"base": {"r": select, "c": judge}}, "r", "c", 4)["base"]
    assert [r["n"] for r in rows] == [1, 2, 4]
    one, two, four = rows
    assert one["by_select"] == {"mean": 0.5, "delta": 0.0, "up": 0, "down": 0, "p": 1.0}
    # best of 2 by r: candidates 1, 1, 0, 0 -> judge 1, 0, 1, 1: slot 0 fixed
    assert (two["by_select"]["up"], two["by_select"]["down"], two["by_select"]["mean"]) == (1, 0, 0.75)
    # best of 4 by r: candidates 1, 2, 0, 3 -> judge 1, 0, 1, 0: slot 0 fixed, slot 3 broken
    assert (four["by_select"]["up"], four["by_select"]["down"]) == (1, 1)
    assert four["by_select"]["delta"] == pytest.approx(0.0) and four["by_select"]["p"] == sign_test_p(1, 1)
    assert four["select_mean"] == pytest.approx((0.9 + 0.8 + 0.9 + 0.9) / 4)
    # the oracle keeps any candidate the judge accepts: slots 0, 1, 2, 3 all have one
    assert four["oracle"]["mean"] == 1.0 and (four["oracle"]["up"], four["oracle"]["down"]) == (2, 0)


def test_best_of_n_on_the_testbed_pipeline_matches_evaluate_for_candidate_zero(tmp_path, capsys):
    from rlhf_diffusion.evaluate import main as evaluate_main

    checker = str(Path(__file__).resolve().parents[1] / "configs/eval/testbed_checker.yaml")
    common = ["--limit", "2", "--steps", "2", "--guidance", "4", "--seeds", "2", "--first-seed", "3"]
    out = tmp_path / "bon.json"
    assert main(["--n", "2", *common, "--rewards-yaml", checker, "--out", str(out)]) == 0
    assert "| base | 2 |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["slots"] == 4 and [r["n"] for r in result["rows"]["base"]] == [1, 2]
    one, two = result["rows"]["base"]
    assert two["select_mean"] >= one["select_mean"]  # the better of two never scores less by its selector
    assert two["oracle"]["mean"] >= two["by_select"]["mean"]

    # candidate 0 is the evaluation's own held-out image: the same mean testbed reward as evaluate --first-seed 3
    evaluated = ["--model", "testbed:pipeline", "--prompts", "testbed_heldout", "--eta", "1", "--grid-prompts", "0"]
    rewards = ["--rewards-yaml", checker, "--reward", "testbed_reward"]
    assert evaluate_main([*evaluated, *common, *rewards, "--out", str(tmp_path / "ev")]) == 0
    with open(tmp_path / "ev" / "results.csv", encoding="utf-8") as f:
        header, base = f.readline().strip().split(","), f.readline().strip().split(",")
    assert one["select_mean"] == pytest.approx(float(base[header.index("testbed_reward_mean")]), abs=1e-6)
