"""benchmarks/methods.py's budget accounting: the reward-scored images per iteration it computes from a config are
what the samplers measure (`rollout/reward_images_count`), for every method, so equal budgets are really equal."""

import sys
from pathlib import Path

import pytest

from rlhf_diffusion.config import load_config
from rlhf_diffusion.trainer import LocalTrainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from methods import METHODS, reward_images_per_iteration, unet_rows_per_iteration  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_reward_images_per_iteration_is_what_the_samplers_measure(method, tiny_sd15_dir, tmp_path):
    config = load_config(
        ROOT / "configs" / "tiny_learning.yaml",
        [
            f"model.pretrained={tiny_sd15_dir}",
            f"algorithm={{name: {method}}}",
            "rewards=[{name: saturation}]",
            "train.iterations=2",
            "sampling.batch_size=3",
            "sampling.num_steps=3",
            "resources.num_samplers=2",
            f"output_dir={tmp_path}",
            "prompts.eval.inline=[a fox]",
            "prompts.eval_seeds=1",
            "tracking.enabled=false",
            "checkpoint.every=0",
            "tracking.image_grid_every=0",
        ],
    )
    result = LocalTrainer(config, log=lambda *_: None).fit()
    expected = reward_images_per_iteration(config)
    assert [row["rollout/reward_images_count"] for row in result.history] == [expected, expected]
    assert all(
        row["driver_cpu_seconds"] > 0 for row in result.history
    )  # in process: the run's compute (equal_seconds.py)
    # 3 prompts x 2 samplers: two final images per prompt (DDPO, DRaFT: 1, GRPO: its group of 16), or n candidates
    # (+ TailorPO-G's guided winner) per step
    per_prompt = {"ddpo": 1, "draft": 1, "grpo": 16}.get(method, 2)
    assert expected == {"tailorpo": 6 * 3 * 2, "tailorpo_g": 6 * 3 * 3}.get(method, per_prompt * 6)
    assert unet_rows_per_iteration(config) == (
        {"tailorpo": 6 * (1 + 2 * 2), "tailorpo_g": 6 * (1 + 2 * 2)}.get(method, per_prompt * 6 * 3)
    )


def _finished_run(method: str, seed: int, settings: dict, run_dir: Path) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text('{"train/optimizer_steps": 1.0}\n{"train/optimizer_steps": 1.0}\n')
    checker = {"background": 1.0, "all": 0.5}
    return {
        "method": method,
        "seed": seed,
        "iterations": 2,
        "reward_images": 400,
        "reward_images_per_iteration": 200,
        "unet_rows": 40,
        "seconds": 1.0,
        "reward_before": 70.0,
        "reward_after": 71.0,
        "checker_before": checker,
        "checker_after": checker,
        "checker_flips": {"fixed": 3, "broken": 1},
        "curve": {"images": [200, 400], "reward": [70.0, 71.0]},
        "run_dir": str(run_dir),
        "settings": settings,
        "heldout_before": {"checker": 0.8, "clip": 60.0},
        "heldout_after": {"checker": 0.9, "clip": 62.5},
    }


def test_finished_runs_are_reused_only_with_the_same_settings(tmp_path, monkeypatch):
    """`--out` may hold runs of other budgets or overrides: only runs with these exact settings are reused and
    tabled; the others are run again (here: recorded, not trained) and the old ones are kept in results.json."""
    import json

    import methods

    config = str(ROOT / "configs" / "tiny.yaml")
    same = methods.run_settings(config, 400, [])
    other = methods.run_settings(config, 400, ["train.learning_rate=3e-4"])
    (tmp_path / "results.json").write_text(
        json.dumps([_finished_run("d3po", 0, same, tmp_path / "a"), _finished_run("dde", 0, other, tmp_path / "b")])
    )
    ran = []

    def run_one(base, method, seed, budget, out, extra):
        ran.append((method, seed, budget, extra))
        return _finished_run(method, seed, {}, tmp_path / f"new_{method}")

    monkeypatch.setattr(methods, "run_one", run_one)
    assert (
        methods.main(
            ["--config", config, "--methods", "d3po", "dde", "--seeds", "0", "--budget", "400", "--out", str(tmp_path)]
        )
        == 0
    )
    assert ran == [("dde", 0, 400, [])]  # d3po reused; dde's run had another learning rate
    kept = json.loads((tmp_path / "results.json").read_text())
    assert sorted((r["method"], r["settings"] == same) for r in kept) == [("d3po", True), ("dde", False), ("dde", True)]
    table = (tmp_path / "table.md").read_text()
    assert "| d3po |" in table and "| dde |" in table and "overrides of tiny.yaml: none" in table
    assert "| 3 / 1 (0.62) |" in table  # one seed's flips: p = 2 x (1 + 4) / 16
    assert "| d3po | 2 | 40 | 2 | 71.000 |" in table  # iterations, UNet rows, optimizer steps (metrics.jsonl), reward
    assert table.splitlines()[4].endswith("| Δ held-out clip |") and "| 2.500 |" in table  # a guard besides the checker


def test_sign_test_against_hand_values():
    import methods

    assert methods.sign_test_p(0, 0) == 1.0
    assert methods.sign_test_p(3, 3) == 1.0
    assert methods.sign_test_p(5, 0) == pytest.approx(2 / 32)  # all 5 one way: 2 x (1/2)^5
    assert methods.sign_test_p(1, 9) == pytest.approx(2 * 11 / 1024)  # 2 x (C(10,0) + C(10,1)) / 2^10
    assert methods.sign_test_p(9, 1) == methods.sign_test_p(1, 9)


def test_checker_flips_count_paired_changes():
    import methods

    from rlhf_diffusion.testbed.world import check, parse_caption, render

    captions = ["a red circle on the left on a white background", "a blue triangle on the left on a black background"]
    right = [render(parse_caption(c), rng=0) for c in captions]
    wrong = [render(parse_caption(c), rng=0) for c in reversed(captions)]  # the other caption's image

    def flips(before, after):
        return methods.checker_flips(
            [check(i, c) for i, c in zip(before, captions)], [check(i, c) for i, c in zip(after, captions)]
        )

    assert flips(right, right) == {"fixed": 0, "broken": 0}
    assert flips(wrong, right) == {"fixed": 2, "broken": 0}
    assert flips(right, [right[0], wrong[1]]) == {"fixed": 0, "broken": 1}


def test_per_method_overrides_are_part_of_the_settings(tmp_path, monkeypatch):
    import json

    import methods

    config = str(ROOT / "configs" / "tiny.yaml")
    (tmp_path / "results.json").write_text(
        json.dumps(
            [
                _finished_run("d3po", 0, methods.run_settings(config, 400, ["seed=1"]), tmp_path / "a"),
                _finished_run(
                    "dde", 0, methods.run_settings(config, 400, ["seed=1", "train.num_inner_epochs=10"]), tmp_path / "b"
                ),
            ]
        )
    )
    ran = []
    monkeypatch.setattr(methods, "run_one", lambda *args: ran.append(args) or {})
    argv = ["--config", config, "--methods", "d3po", "dde", "--seeds", "0", "--out", str(tmp_path), "--set", "seed=1"]
    assert methods.main([*argv, "--method-set", "dde:train.num_inner_epochs=10"]) == 0
    assert ran == []  # both reused: dde's own override is part of its settings
    table = (tmp_path / "table.md").read_text()
    assert "overrides of tiny.yaml: seed=1; dde also train.num_inner_epochs=10." in table
    with pytest.raises(SystemExit):
        methods.main([*argv, "--method-set", "spo:train.num_inner_epochs=10"])  # not a method here


def test_reward_label_names_the_training_reward():
    import methods

    assert methods.reward_label(load_config(ROOT / "configs" / "tiny.yaml")) == "testbed_reward"
    checker = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            'rewards=[{name: custom, target: "rlhf_diffusion.testbed.reward:CheckerReward", label: checker}]',
            'guards.heldout_rewards=[{name: clip_score, path: "testbed:clip"}]',
        ],
    )
    assert methods.reward_label(checker) == "checker"


def test_paired_standard_error_by_hand():
    import methods

    # differences 1, 2, 3: sample std 1, SE 1 / sqrt(3)
    assert methods.paired_standard_error([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]) == pytest.approx(1 / 3**0.5)
    assert methods.paired_standard_error([5.0, 1.0], [6.0, 2.0]) == 0.0  # the same shift on every image
