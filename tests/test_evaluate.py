"""`python -m rlhf_diffusion.evaluate`: the table / CSVs / grid, base and LoRA rows, exact reproduction of a trained
run's evaluation, MLflow logging, and one clear message (exit code 2) for bad input.

One CLI call (module fixture `cli_run`) evaluates four rows on the tiny SD1.5 pipeline, 2 prompts × 2 seeds × 2
DDIM steps: the base model, a random LoRA (α != r, extra target modules), the same LoRA file without its metadata,
and the LoRA a LocalTrainer run just trained (evaluated last, so its adapter replaces two others first).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rlhf_diffusion.config import parse_config
from rlhf_diffusion.evaluate import main, resolve_prompts
from rlhf_diffusion.models.loading import (
    attach_lora,
    export_lora,
    get_lora_state_dict,
    load_diffusion_model,
    set_lora_state_dict,
)
from rlhf_diffusion.models.lora import LoraFormatError, read_lora_file
from rlhf_diffusion.testing import build_tiny_aesthetic
from rlhf_diffusion.trainer import LocalTrainer, eval_grid_row

PROMPTS = ["a cat", "a dog"]
SEEDS = 2
SAMPLING = ["--steps", "2", "--guidance", "2.0", "--eta", "1.0", "--seeds", str(SEEDS)]
CELL = 64 + 2  # save_grid: 64 px images, 2 px padding


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every test of this module on one torch thread (the shared `one_torch_thread` fixture)."""


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _random_lora(model_dir: Path, out_dir: Path) -> Path:
    model = load_diffusion_model(str(model_dir))
    attach_lora(model.unet, rank=2, alpha=6.0, target_modules=["to_k", "to_out.0", "proj_in"])
    g = torch.Generator().manual_seed(7)
    state = get_lora_state_dict(model.unet)
    set_lora_state_dict(model.unet, {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in state.items()})
    return export_lora(model, out_dir)


@pytest.fixture(scope="module")
def trained(tiny_sd15_dir, tmp_path_factory):
    """One LocalTrainer iteration (D3PO, brightness) on PROMPTS; its eval uses the same prompts and seeds."""
    root = tmp_path_factory.mktemp("trained")
    data = {
        "run_name": "run",
        "output_dir": str(root),
        "device": "cpu",
        "model": {"pretrained": str(tiny_sd15_dir)},
        "sampling": {"num_steps": 2, "guidance_scale": 2.0, "eta": 1.0, "batch_size": 2},
        "algorithm": {"name": "d3po"},
        "rewards": [{"name": "brightness"}],
        "train": {"iterations": 1, "learning_rate": 1e-2, "train_batch_size": 4},
        "prompts": {"train": {"inline": PROMPTS}, "eval_seeds": SEEDS},
        "tracking": {"enabled": False},
        "checkpoint": {"every": 0},
    }
    result = LocalTrainer(parse_config(data), log=lambda line: None).fit()
    return result


@pytest.fixture(scope="module")
def cli_run(tiny_sd15_dir, trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    other = _random_lora(tiny_sd15_dir, root / "other")
    (root / "nometa").mkdir()
    nometa = root / "nometa" / "weights.safetensors"
    save_file(load_file(other), nometa)  # the same tensors, no LoraConfig metadata
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("# eval prompts\n" + "\n".join(PROMPTS) + "\n", encoding="utf-8")
    rewards_yaml = root / "rewards.yaml"
    rewards_yaml.write_text(
        yaml.safe_dump([{"name": "aesthetic", "weight": 0.5, "path": str(build_tiny_aesthetic(root / "aesthetic"))}])
    )
    out = root / "out"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    code = main(
        [
            "--model",
            str(tiny_sd15_dir),
            "--prompts",
            str(prompt_file),
            *SAMPLING,
            "--rewards-yaml",
            str(rewards_yaml),
            "--reward",
            "brightness",
            "--lora",
            str(other.parent),
            "--lora",
            f"nometa={nometa}",
            "--lora",
            str(trained.run_dir),
            "--save-images",
            "--out",
            str(out),
            "--mlflow-uri",
            uri,
            "--experiment",
            "eval-test",
        ]
    )
    assert code == 0
    return {"out": out, "uri": uri, "other": other, "nometa": nometa, "trained": trained}


def test_cli_writes_table_csvs_and_grid(cli_run, capsys):
    out = cli_run["out"]
    labels = ["base", str(cli_run["other"].parent), "nometa", str(cli_run["trained"].run_dir)]
    rows = _read_csv(out / "results.csv")
    assert [r["model"] for r in rows] == labels
    assert list(rows[0]) == [
        "model",
        "lora",
        "images",
        "aesthetic_mean",
        "aesthetic_std",
        "brightness_mean",
        "brightness_std",
        "total_mean",
        "total_std",
    ]
    assert rows[0]["lora"] == "" and rows[3]["lora"].endswith("run/lora/pytorch_lora_weights.safetensors")
    assert all(r["images"] == str(len(PROMPTS) * SEEDS) for r in rows)
    for r in rows:  # total = 0.5 · aesthetic + brightness, per image, so also in the mean
        assert float(r["total_mean"]) == pytest.approx(
            0.5 * float(r["aesthetic_mean"]) + float(r["brightness_mean"]), rel=1e-5
        )
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| model | aesthetic | brightness | weighted total |" in table
    assert "2 prompts × 2 seeds 0–1 = 4 images per row" in table and "DDIM 2 steps" in table
    for label, r in zip(labels, rows):
        line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        assert f"{float(r['brightness_mean']):.4f} ± {float(r['brightness_std']):.4f}" in line

    per_prompt = _read_csv(out / "per_prompt.csv")
    assert [(r["model"], r["prompt"]) for r in per_prompt] == [(m, p) for m in labels for p in PROMPTS]
    assert all(r["seeds"] == "2" for r in per_prompt)

    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 + len(PROMPTS) * CELL, 2 + len(labels) * SEEDS * CELL, 3)
    assert len(list((out / "images").rglob("*.png"))) == len(labels) * len(PROMPTS) * SEEDS


def test_lora_rows_differ_from_base_and_metadata_free_file_loads_the_same(cli_run):
    by_model = {}
    for r in _read_csv(cli_run["out"] / "per_prompt.csv"):
        by_model.setdefault(r["model"], []).append((r["aesthetic"], r["brightness"]))
    base, other, nometa, trained = by_model.values()
    assert other != base and trained != base and other != trained
    assert nometa == other  # α = r inferred without metadata: exact, because export_lora folds α / r into lora_B

    with_meta, without = read_lora_file(cli_run["other"]), read_lora_file(cli_run["nometa"])
    assert with_meta.from_metadata and not without.from_metadata
    assert with_meta.config["r"] == 2 and with_meta.config["lora_alpha"] == 2
    assert with_meta.config["target_modules"] == ["proj_in", "to_k", "to_out.0"]
    assert without.config["r"] == 2 and without.config["lora_alpha"] == 2
    assert with_meta.state.keys() == without.state.keys()
    assert all(not k.startswith("unet.") for k in with_meta.state)


def test_lora_row_reproduces_the_trained_runs_evaluation_exactly(cli_run):
    trained = cli_run["trained"]
    out, label = cli_run["out"], str(trained.run_dir)
    eval_json = json.loads((trained.run_dir / "eval.json").read_text())
    row = next(r for r in _read_csv(out / "results.csv") if r["model"] == label)
    assert float(row["brightness_mean"]) == eval_json["per_reward_after"]["brightness"]  # bit for bit
    assert float(row["brightness_mean"]) == trained.eval_after.mean
    per_image = trained.eval_after.rewards.view(len(PROMPTS), SEEDS)  # brightness (weight 1) per image
    ours = [float(r["brightness"]) for r in _read_csv(out / "per_prompt.csv") if r["model"] == label]
    assert ours == [per_image[j].mean().item() for j in range(len(PROMPTS))]
    base = next(r for r in _read_csv(out / "results.csv") if r["model"] == "base")
    assert float(base["brightness_mean"]) == trained.eval_before.mean  # and the base row = the run's eval before

    # the images: the run's grid_after.png (prompts in order, `eval_grid_row` images a row) equals our trained-LoRA
    # columns
    theirs = np.asarray(Image.open(trained.run_dir / "grid_after.png"))
    grid = np.asarray(Image.open(out / "grid.png"))
    column0 = 3 * SEEDS  # 4th row of the table
    for j in range(len(PROMPTS)):
        for s in range(SEEDS):
            cell = grid[2 + j * CELL : j * CELL + CELL, 2 + (column0 + s) * CELL : (column0 + s) * CELL + CELL]
            r, c = divmod(j * SEEDS + s, eval_grid_row(SEEDS))  # the run's grid wraps whole prompts, >= 8 a row
            expected = theirs[2 + r * CELL : r * CELL + CELL, 2 + c * CELL : c * CELL + CELL]
            np.testing.assert_array_equal(cell, expected)
            image = np.asarray(
                Image.open(out / "images" / f"03_{label.strip('/').replace('/', '_')}" / f"p{j:05d}_s{s}.png")
            )
            np.testing.assert_array_equal(image, expected)


def test_each_lora_is_compared_with_base_image_by_image_as_the_run_compares_before_and_after(cli_run):
    trained, out = cli_run["trained"], cli_run["out"]
    paired = json.loads((out / "paired.json").read_text())
    assert list(paired) == [str(cli_run["other"].parent), "nometa", str(trained.run_dir)]
    assert all(list(columns) == ["aesthetic", "brightness", "total"] for columns in paired.values())
    # the trained LoRA against base is the run's own before / after comparison of the same images (brightness is
    # the run's only reward, weight 1)
    ours, runs = paired[str(trained.run_dir)]["brightness"], json.loads((trained.run_dir / "eval.json").read_text())
    theirs = runs["paired"]["reward"]
    for key in ("before", "after", "delta", "paired_se", "images", "rose", "fell", "sign_test_p"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), key
    per_prompt = _read_csv(out / "per_prompt.csv")
    mean = {
        m: sum(float(r["brightness"]) for r in per_prompt if r["model"] == m) / len(PROMPTS) for m in ("base", "nometa")
    }
    assert paired["nometa"]["brightness"]["delta"] == pytest.approx(mean["nometa"] - mean["base"], abs=1e-6)
    table = (out / "results.md").read_text(encoding="utf-8")
    line = next(x for x in table.splitlines() if x.startswith(f"| {trained.run_dir} | brightness |"))
    assert f"{ours['delta']:+.4f} ± {ours['paired_se']:.4f} | {int(ours['rose'])} / {int(ours['fell'])}" in line


def test_mlflow_has_a_parent_run_with_artifacts_and_one_child_per_row(cli_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cli_run["uri"])
    experiment = client.get_experiment_by_name("eval-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.params["num_prompts"] == "2" and parent.data.params["steps"] == "2"
    assert json.loads(parent.data.params["rewards"])[0].startswith("aesthetic:0.5@")
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "results.md",
        "results.csv",
        "per_prompt.csv",
        "grid.png",
        "paired.json",
    }
    children = {
        r.data.tags["mlflow.runName"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    table = {r["model"]: r for r in _read_csv(cli_run["out"] / "results.csv")}
    assert children.keys() == table.keys()
    for label, child in children.items():
        metrics = child.data.metrics
        assert metrics["eval/brightness"] == float(table[label]["brightness_mean"])
        assert metrics["eval/aesthetic_std"] == float(table[label]["aesthetic_std"])
        assert metrics["eval/reward_mean"] == float(table[label]["total_mean"])
        assert child.data.params["label"] == label


def test_inline_and_limited_prompts():
    assert resolve_prompts(None, ["a", "b"]).prompts == ["a", "b"]
    animals = resolve_prompts("partiprompts:animals", limit=3)
    assert len(animals.prompts) == 3 and animals.extra["category"] == ["Animals"] * 3
    assert len(resolve_prompts("partiprompts").prompts) == 1632


# ---------------------------------------------------------------------------------------------------------------
# Bad input: exit code 2, one message naming the thing, no traceback
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tiny_sd15_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = _random_lora(tiny_sd15_dir, root / "good")
    with safe_open(str(good), "pt") as f:
        metadata = f.metadata()
    renamed = {k.replace(".to_k.", ".to_kk."): v for k, v in load_file(good).items()}
    save_file(renamed, root / "wrong_keys.safetensors", metadata=metadata)
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 4)}, root / "kohya.safetensors")
    (root / "garbage.safetensors").write_bytes(b"not a safetensors file")
    return root


def _run_bad(args, tiny_sd15_dir, tmp_path, capsys):
    argv = ["--model", str(tiny_sd15_dir), "--seeds", "1", "--steps", "1", "--out", str(tmp_path / "out")]
    if "--prompts" not in args:
        argv += ["--prompt", "a cat"]
    code = main(argv + args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--reward", "brightness", "--lora", "{tmp}/missing_lora"], "missing_lora: no such LoRA file or directory"),
        (["--reward", "brightness", "--lora", "{tmp}"], "no pytorch_lora_weights.safetensors in this directory"),
        (["--reward", "sharpness"], "--reward sharpness: unknown reward 'sharpness'; valid rewards: jpeg_compress"),
        (["--reward", "aesthetic"], "--reward aesthetic: reward 'aesthetic' loads a model and needs its weights'"),
        (["--reward", "pickscore@{tmp}/nope"], "reward 'pickscore': no such file or directory: {tmp}/nope"),
        (["--reward", "brightness@{tmp}"], "reward 'brightness' loads no weights and takes no path"),
        (["--reward", "brightness:heavy"], "weight 'heavy' is not a number"),
        (["--reward", "brightness:0"], "--reward brightness:0: weight: Value error, must be non-zero"),
        ([], "no rewards: give at least one --reward"),
        (["--reward", "brightness", "--prompts", "partiprompts:cats"], "--prompts 'partiprompts:cats': no such"),
        (["--reward", "brightness", "--rewards-yaml", "{tmp}/r.yaml"], "--rewards-yaml {tmp}/r.yaml: no such file"),
        (["--reward", "brightness", "--model", "{tmp}/no_model"], "--model {tmp}/no_model: no such pipeline"),
    ],
)
def test_bad_input_exits_2_with_one_message(args, expected, tiny_sd15_dir, tmp_path, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    line = _run_bad(args, tiny_sd15_dir, tmp_path, capsys)
    assert line.startswith("error: ") and expected.replace("{tmp}", str(tmp_path)) in line


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "wrong_keys.safetensors",
            "its LoRA does not fit this UNet: LoRA state dict does not match adapter 'eval_lora'",
        ),
        ("kohya.safetensors", "not a UNet LoRA in diffusers/peft format: 1 of 1 keys are not"),
        ("garbage.safetensors", "not a readable safetensors file"),
    ],
)
def test_bad_lora_file_exits_2_naming_the_file(name, expected, bad_files, tiny_sd15_dir, tmp_path, capsys):
    path = bad_files / name
    line = _run_bad(["--reward", "brightness", "--lora", str(path)], tiny_sd15_dir, tmp_path, capsys)
    assert line.startswith(f"error: {path}: ") and expected in line
    if name != "wrong_keys.safetensors":
        with pytest.raises(LoraFormatError, match=name):
            read_lora_file(path)


@pytest.mark.parametrize(
    "flag, value, message",
    [("--seeds", "0", "--seeds: must be >= 1"), ("--first-seed", "-1", "--first-seed: must be >= 0")],
)
def test_argparse_rejects_out_of_range_counts(flag, value, message, tiny_sd15_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--model",
                str(tiny_sd15_dir),
                "--prompt",
                "a",
                "--reward",
                "brightness",
                flag,
                value,
                "--out",
                str(tmp_path),
            ]
        )
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_shipped_testbed_checker_rewards_load_and_judge_a_testbed_image():
    """configs/eval/testbed_checker.yaml (the held-out judges for re-evaluating testbed runs) builds through the
    CLI's own checks and factory, and judges a grey image wrong."""
    import torch

    from rlhf_diffusion.evaluate import _build_rewards, _read_rewards_yaml, check_rewards
    from rlhf_diffusion.prompts import load_builtin

    path = Path(__file__).resolve().parents[1] / "configs" / "eval" / "testbed_checker.yaml"
    entries = _read_rewards_yaml(str(path))
    specs = check_rewards(entries, [f"entry {i}" for i in range(len(entries))])
    assert [spec.key for spec in specs] == ["checker_all", "checker"]
    caption = load_builtin("testbed_heldout")[0]
    result = _build_rewards(specs, torch.device("cpu")).score(torch.full((1, 3, 64, 64), 0.5), [caption])
    assert result.per_reward["checker_all"].tolist() == [0.0]
    assert 0.0 <= result.per_reward["checker"].item() < 1.0


def test_the_testbed_reward_needs_no_path_as_in_a_run_config():
    """`--reward testbed_reward` takes the shipped `testbed:reward`, as `rewards: [{name: testbed_reward}]` does in a
    run config (it was refused as "needs its weights' location"); a path still overrides it."""
    import torch

    from rlhf_diffusion.evaluate import _build_rewards, check_rewards, parse_reward_spec
    from rlhf_diffusion.prompts import load_builtin

    entries = [parse_reward_spec("testbed_reward"), parse_reward_spec("testbed_reward@testbed:reward")]
    entries[1]["label"] = "explicit"
    specs = check_rewards(entries, ["--reward testbed_reward", "--reward testbed_reward@testbed:reward"])
    caption = load_builtin("testbed_heldout")[0]
    images = torch.rand((2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    result = _build_rewards(specs, torch.device("cpu")).score(images, [caption, caption])
    assert torch.equal(result.per_reward["testbed_reward"], result.per_reward["explicit"])


def test_first_seed_gives_the_later_seeds_images_and_names_them(tiny_sd15_dir, tmp_path):
    """`--first-seed K` samples the images of seeds K.. of a longer evaluation (fresh images for settings chosen on
    seeds 0..K-1), and the saved files and the report name those seeds."""
    common = ["--model", str(tiny_sd15_dir), "--prompt", "a cat", "--reward", "brightness", "--steps", "2"]
    assert main([*common, "--seeds", "3", "--save-images", "--out", str(tmp_path / "all")]) == 0
    assert main([*common, "--seeds", "2", "--first-seed", "1", "--save-images", "--out", str(tmp_path / "late")]) == 0
    late = sorted(p.relative_to(tmp_path / "late") for p in (tmp_path / "late").glob("images/*/*.png"))
    assert [p.name for p in late] == ["p00000_s1.png", "p00000_s2.png"]

    def pixels(path):
        return np.asarray(Image.open(path), dtype=np.int16)

    for path in late:  # the same image (a batch of 2 instead of 3 may round a pixel differently)
        assert np.abs(pixels(tmp_path / "late" / path) - pixels(tmp_path / "all" / path)).max() <= 1
    first = pixels(tmp_path / "all" / late[0].with_name("p00000_s0.png"))
    assert np.abs(first - pixels(tmp_path / "late" / late[0])).max() > 10  # seed 0 is another image
    assert "1 prompts × 2 seeds 1–2 = 2 images" in (tmp_path / "late" / "results.md").read_text()
