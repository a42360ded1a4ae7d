"""Tests for rlhf_diffusion/config.py: the run schema, YAML loading, `--set` overrides and error messages."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path

import pydantic
import pytest
import yaml

from rlhf_diffusion import config as config_module
from rlhf_diffusion.config import (
    ALGORITHM_NAMES,
    NON_DIFFERENTIABLE_REWARDS,
    REWARD_NAMES,
    ConfigError,
    D3POConfig,
    DDEConfig,
    TailorPOConfig,
    TailorPOGConfig,
    apply_overrides,
    flatten_config,
    load_config,
    parse_config,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = REPO_ROOT / "configs" / "tiny.yaml"
MLFLOW_KEY_RE = re.compile(r"^[/\w.\- ]+$")  # what MLflow accepts as a param name


def minimal() -> dict:
    """The smallest valid config: everything else takes its default."""
    return {
        "model": {"pretrained": "tiny:sd15"},
        "algorithm": {"name": "d3po"},
        "rewards": [{"name": "aesthetic"}],
    }


def with_section(section: str, value) -> dict:
    data = minimal()
    data[section] = value
    return data


# ----------------------------------------------------------------------------------------------------------------
# Bad configs: each must name the dotted field path and say what is wrong.
# Each case: (id, build(tmp_path) -> (data, overrides), expected path, expected fragment of the problem).
# ----------------------------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ("negative_beta", lambda tmp: (minimal(), ["algorithm.beta=-0.1"]), "algorithm.beta", "greater than 0"),
    ("eta_zero", lambda tmp: (minimal(), ["sampling.eta=0"]), "sampling.eta", "undefined at eta = 0"),
    ("eta_above_one", lambda tmp: (minimal(), ["sampling.eta=1.5"]), "sampling.eta", "less than or equal to 1"),
    (
        "guidance_below_one",
        lambda tmp: (minimal(), ["sampling.guidance_scale=0.5"]),
        "sampling.guidance_scale",
        "greater than or equal to 1",
    ),
    (
        "unknown_algorithm",
        lambda tmp: (minimal(), ["algorithm.name=ppo"]),
        "algorithm.name",
        "unknown algorithm 'ppo'; valid names: d3po, tailorpo, tailorpo_g, dde, dde_single, diffusion_dpo, ddpo, grpo",
    ),
    (
        "missing_algorithm_name",
        lambda tmp: (with_section("algorithm", {"beta": 0.1}), []),
        "algorithm.name",
        "valid names: d3po",
    ),
    (
        "missing_algorithm",
        lambda tmp: ({k: v for k, v in minimal().items() if k != "algorithm"}, []),
        "algorithm",
        "required",
    ),
    ("unknown_top_level_key", lambda tmp: ({**minimal(), "learning_rate": 1e-4}, []), "learning_rate", "unknown key"),
    (
        "unknown_nested_key",
        lambda tmp: (with_section("train", {"learning_rte": 1e-4}), []),
        "train.learning_rte",
        "did you mean 'learning_rate'",
    ),
    (
        "key_of_another_algorithm",
        lambda tmp: (minimal(), ["algorithm.num_candidates=4"]),
        "algorithm.num_candidates",
        "unknown key for algorithm 'd3po'",
    ),
    ("override_nonexistent_key", lambda tmp: (minimal(), ["train.nope=1"]), "train.nope", "unknown key"),
    ("string_for_int", lambda tmp: (minimal(), ["train.iterations=many"]), "train.iterations", "valid integer"),
    ("missing_pretrained", lambda tmp: (with_section("model", {}), []), "model.pretrained", "required"),
    (
        "nonexistent_local_model",
        lambda tmp: (with_section("model", {"pretrained": str(tmp / "no_such_model")}), []),
        "model.pretrained",
        "no such directory",
    ),
    (
        "relative_nonexistent_model",
        lambda tmp: (with_section("model", {"pretrained": "./no/such/model"}), []),
        "model.pretrained",
        "no such directory",
    ),
    (
        "model_path_is_a_file",
        lambda tmp: (with_section("model", {"pretrained": str(_touch(tmp / "model.safetensors"))}), []),
        "model.pretrained",
        "is a file",
    ),
    (
        "bad_tiny_model",
        lambda tmp: (minimal(), ["model.pretrained=tiny:sd3"]),
        "model.pretrained",
        "valid tiny models: tiny:sd15, tiny:sdxl",
    ),
    ("not_a_hub_id", lambda tmp: (minimal(), ["model.pretrained=just-a-name"]), "model.pretrained", "hub id"),
    ("kind_contradicts_tiny", lambda tmp: (minimal(), ["model.kind=sdxl"]), "model.kind", "contradicts"),
    ("revision_on_tiny", lambda tmp: (minimal(), ["model.revision=main"]), "model.revision", "hub id"),
    (
        "resolution_not_multiple_of_8",
        lambda tmp: (minimal(), ["model.resolution=500"]),
        "model.resolution",
        "multiple of 8",
    ),
    ("lora_rank_zero", lambda tmp: (minimal(), ["model.lora.rank=0"]), "model.lora.rank", "greater than or equal"),
    ("empty_rewards", lambda tmp: (with_section("rewards", []), []), "rewards", "at least 1 item"),
    (
        "duplicate_reward_names",
        lambda tmp: (with_section("rewards", [{"name": "aesthetic"}, {"name": "aesthetic", "weight": 2}]), []),
        "rewards.1.name",
        "duplicate reward (already rewards.0.name)",
    ),
    ("reward_weight_zero", lambda tmp: (minimal(), ["rewards.0.weight=0"]), "rewards.0.weight", "non-zero"),
    ("reward_weight_inf", lambda tmp: (minimal(), ["rewards.0.weight=.inf"]), "rewards.0.weight", "finite"),
    ("unknown_reward_name", lambda tmp: (minimal(), ["rewards.0.name=beauty"]), "rewards.0.name", "'clip_score'"),
    (
        "tailorpo_g_with_jpeg",
        lambda tmp: (
            {
                **minimal(),
                "algorithm": {"name": "tailorpo_g"},
                "rewards": [{"name": "aesthetic"}, {"name": "jpeg_compressibility"}],
            },
            [],
        ),
        "rewards.1.name",
        "TailorPO-G needs a reward gradient",
    ),
    (
        "dde_single_with_ema",
        lambda tmp: (with_section("algorithm", {"name": "dde_single", "correction": "ema"}), []),
        "algorithm.correction",
        "must be 'none' for dde_single",
    ),
    (
        "timestep_range_reversed",
        lambda tmp: (with_section("algorithm", {"name": "dde", "timestep_range": [700, 200]}), []),
        "algorithm.timestep_range",
        "lo <= hi",
    ),
    (
        "timestep_range_out_of_grid",
        lambda tmp: (with_section("algorithm", {"name": "diffusion_dpo", "timestep_range": [0, 1000]}), []),
        "algorithm.timestep_range.1",
        "less than or equal to 999",
    ),
    (
        "clip_epsilon_one",
        lambda tmp: (minimal(), ["algorithm.clip_epsilon=1"]),
        "algorithm.clip_epsilon",
        "less than 1",
    ),
    (
        "one_candidate",
        lambda tmp: (with_section("algorithm", {"name": "tailorpo", "num_candidates": 1}), []),
        "algorithm.num_candidates",
        "greater than or equal to 2",
    ),
    (
        "guidance_gamma_zero",
        lambda tmp: (with_section("algorithm", {"name": "tailorpo_g", "guidance_gamma": 0}), []),
        "algorithm.guidance_gamma",
        "greater than 0",
    ),
    (
        "prompts_two_sources",
        lambda tmp: (with_section("prompts", {"train": {"builtin": "simple_animals", "inline": ["a cat"]}}), []),
        "prompts.train",
        "set exactly one of builtin, file, inline",
    ),
    (
        "prompts_no_source",
        lambda tmp: (with_section("prompts", {"eval": {}}), []),
        "prompts.eval",
        "set exactly one of builtin, file, inline",
    ),
    (
        "prompts_file_missing",
        lambda tmp: (with_section("prompts", {"train": {"file": str(tmp / "prompts.txt")}}), []),
        "prompts.train.file",
        "no such prompt file: PROMPTS_TXT",
    ),
    (
        "prompts_inline_empty_string",
        lambda tmp: (with_section("prompts", {"train": {"inline": ["a cat", "  "]}}), []),
        "prompts.train.inline",
        "prompt 1 is empty",
    ),
    ("run_name_with_slash", lambda tmp: (minimal(), ["run_name=a/b"]), "run_name", "pattern"),
    ("run_name_parent", lambda tmp: (minimal(), ["run_name=.."]), "run_name", "must not be only dots"),
    ("run_name_dot", lambda tmp: (minimal(), ["run_name=."]), "run_name", "must not be only dots"),
    (
        "negative_staleness",
        lambda tmp: (minimal(), ["train.max_staleness=-1"]),
        "train.max_staleness",
        "greater than or equal to 0",
    ),
    ("bad_mixed_precision", lambda tmp: (minimal(), ["train.mixed_precision=fp8"]), "train.mixed_precision", "'bf16'"),
    (
        "fp16_on_cpu",
        lambda tmp: (minimal(), ["device=cpu", "train.mixed_precision=fp16"]),
        "train.mixed_precision",
        "'fp16' needs CUDA",
    ),
    (
        "preview_decoder_missing",
        lambda tmp: (minimal(), [f"sampling.preview_decoder={tmp}"]),
        "sampling.preview_decoder",
        "not a diffusers AutoencoderTiny directory",
    ),
    ("bad_attention", lambda tmp: (minimal(), ["model.attention=flash"]), "model.attention", "'sdpa'"),
    ("bad_channels_last", lambda tmp: (minimal(), ["model.channels_last=maybe"]), "model.channels_last", "bool"),
    (
        "bad_gradient_checkpointing",
        lambda tmp: (minimal(), ["train.gradient_checkpointing=3"]),
        "train.gradient_checkpointing",
        "bool",
    ),
]


def _touch(path: Path) -> Path:
    path.write_text("not a pipeline")
    return path


@pytest.mark.parametrize(
    ("build", "path", "fragment"), [case[1:] for case in BAD_CONFIGS], ids=[case[0] for case in BAD_CONFIGS]
)
def test_bad_config_names_field_and_problem(tmp_path, build, path, fragment):
    data, overrides = build(tmp_path)
    fragment = fragment.replace("PROMPTS_TXT", str(tmp_path / "prompts.txt"))
    with pytest.raises(ConfigError) as excinfo:
        parse_config(data, source="bad.yaml", overrides=overrides)
    message = str(excinfo.value)
    assert message.startswith("bad.yaml: invalid config (1 problem):"), message
    assert f"\n  {path}: " in message, message
    assert fragment in message, message


def test_bad_configs_are_many_and_distinct():
    assert len({case[0] for case in BAD_CONFIGS}) == len(BAD_CONFIGS) >= 20


def test_union_tag_is_stripped_from_paths():
    with pytest.raises(ConfigError) as excinfo:
        parse_config(minimal(), overrides=["algorithm.name=dde", "algorithm.beta_s=-1"])
    message = str(excinfo.value)
    assert "  algorithm.beta_s: " in message
    assert "algorithm.dde" not in message


def test_every_problem_is_listed_once_with_its_value():
    data = {
        "model": {"pretrained": "tiny:sd15", "resolution": 100},
        "sampling": {"eta": 0.0, "num_steps": 0},
        "algorithm": {"name": "d3po", "beta": -1},
        "rewards": [{"name": "aesthetic"}],
    }
    with pytest.raises(ConfigError) as excinfo:
        parse_config(data, source="multi.yaml")
    lines = str(excinfo.value).splitlines()
    assert lines[0] == "multi.yaml: invalid config (4 problems):"
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == [
        "algorithm.beta",
        "model.resolution",
        "sampling.eta",
        "sampling.num_steps",
    ]
    assert "(got -1)" in str(excinfo.value)
    assert "(got 100)" in str(excinfo.value)


# ----------------------------------------------------------------------------------------------------------------
# Errors outside the schema: overrides, files, YAML
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.learning_rate", "expected key.path=value"),
        ("=3", "empty key"),
        ("train..learning_rate=3", "malformed key part ''"),
        ("rewards.3.weight=1", "list index 3 out of range for rewards (valid: 0..0)"),
        ("rewards.-1.weight=1", "list index -1 out of range"),
        ("rewards.first.weight=1", "rewards is a list, index it with an integer"),
        ("algorithm.name.x=1", "algorithm.name is a scalar ('d3po'), cannot index into it"),
        ("prompts.train.inline=[a, b", "value is not valid YAML"),
    ],
)
def test_malformed_override_names_the_override(override, fragment):
    with pytest.raises(ConfigError) as excinfo:
        parse_config(minimal(), source="x.yaml", overrides=[override])
    message = str(excinfo.value)
    assert message.startswith(f"x.yaml: bad override {override!r}"), message
    assert fragment in message, message


def test_missing_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="no such config file") as excinfo:
        load_config(missing)
    assert str(excinfo.value).startswith(str(missing))


def test_yaml_syntax_error_reports_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  pretrained: tiny:sd15\nalgorithm: {name: d3po\nrewards: []\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: YAML syntax error at line 4"), message


@pytest.mark.parametrize(("text", "fragment"), [("- a\n- b\n", "got list"), ("42\n", "got int"), ("", "empty")])
def test_top_level_must_be_a_mapping(tmp_path, text, fragment):
    path = tmp_path / "top.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    message = str(excinfo.value)
    assert message.startswith(str(path)) and fragment in message, message


# ----------------------------------------------------------------------------------------------------------------
# Good paths
# ----------------------------------------------------------------------------------------------------------------


def test_defaults_are_the_papers():
    cfg = parse_config(minimal())
    assert cfg.run_name == "run" and cfg.seed == 0 and cfg.device == "auto"
    assert cfg.run_dir == Path("runs") / "run"
    assert (cfg.sampling.num_steps, cfg.sampling.eta, cfg.sampling.guidance_scale) == (20, 1.0, 5.0)
    assert isinstance(cfg.algorithm, D3POConfig)
    assert (cfg.algorithm.beta, cfg.algorithm.clip_epsilon, cfg.algorithm.timestep_fraction) == (0.1, 0.1, 1.0)
    assert cfg.algorithm.multi_reward == "weighted_sum"
    assert cfg.model.lora.rank == 4 and cfg.model.lora.alpha == 4.0 and cfg.model.lora.init == "gaussian"
    assert cfg.model.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    train = cfg.train
    assert (
        train.learning_rate,
        train.adam_beta1,
        train.adam_beta2,
        train.weight_decay,
        train.adam_eps,
        train.grad_clip,
    ) == (3e-5, 0.9, 0.999, 1e-4, 1e-8, 1.0)
    assert cfg.prompts.train.builtin == "simple_animals" and cfg.prompts.eval is None
    assert cfg.rewards[0].weight == 1.0 and cfg.rewards[0].kwargs == {}
    assert cfg.tracking.enabled and cfg.checkpoint.every == 10


def test_algorithm_defaults():
    dde = parse_config(with_section("algorithm", {"name": "dde"})).algorithm
    assert isinstance(dde, DDEConfig) and dde.correction == "ema" and dde.timestep_range == (0, 999)
    tailorpo = parse_config(with_section("algorithm", {"name": "tailorpo"})).algorithm
    assert type(tailorpo) is TailorPOConfig and tailorpo.num_candidates == 2 and tailorpo.continuation == "winner"
    guided = parse_config(with_section("algorithm", {"name": "tailorpo_g"})).algorithm
    assert isinstance(guided, TailorPOGConfig) and guided.guidance_gamma == 0.3
    assert guided.guidance_gradient == "tweedie_const_eps" and guided.guidance_norm == "sigma_relative"
    dpo = parse_config(with_section("algorithm", {"name": "diffusion_dpo"})).algorithm
    assert dpo.beta == 5000.0


def test_dde_single_defaults_correction_to_none():
    cfg = parse_config(with_section("algorithm", {"name": "dde_single"}))
    assert cfg.algorithm.name == "dde_single" and cfg.algorithm.correction == "none"
    explicit = parse_config(with_section("algorithm", {"name": "dde_single", "correction": "none"}))
    assert explicit.algorithm == cfg.algorithm


def test_overrides_parse_values():
    cfg = parse_config(
        minimal(),
        overrides=[
            "train.learning_rate=1e-4",
            "train.iterations=7",
            "train.weight_decay=0",
            "sampling.guidance_scale=2",
            "model.lora.target_modules=[to_q, to_v]",
            "rewards.0.weight=0.5",
            "tracking.enabled=false",
            "train.mixed_precision=no",
        ],
    )
    assert cfg.train.learning_rate == 1e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.iterations == 7 and isinstance(cfg.train.iterations, int)
    assert cfg.train.weight_decay == 0.0
    assert cfg.sampling.guidance_scale == 2.0
    assert cfg.model.lora.target_modules == ["to_q", "to_v"]
    assert cfg.rewards[0].weight == 0.5
    assert cfg.tracking.enabled is False
    assert cfg.train.mixed_precision == "no"  # YAML 1.1 reads a bare `no` as false


def test_overrides_create_sections_and_accept_bracket_indices():
    data = {**minimal(), "rewards": [{"name": "aesthetic"}, {"name": "pickscore"}], "prompts": {"eval": None}}
    cfg = parse_config(
        data,
        overrides=["rewards[1].weight=-2", "prompts.train.inline=[a cat, a dog]", "prompts.eval.inline=[a fox]"],
    )
    assert cfg.rewards[1].weight == -2.0
    assert cfg.prompts.train.inline == ["a cat", "a dog"] and cfg.prompts.train.builtin is None
    assert cfg.prompts.eval.inline == ["a fox"]


def test_overrides_apply_in_order_and_do_not_modify_input():
    data = minimal()
    result = apply_overrides(data, ["seed=1", "seed=2", "rewards.0.weight=3"])
    assert result["seed"] == 2 and result["rewards"][0]["weight"] == 3
    assert data == minimal()


def test_switch_algorithm_by_override():
    cfg = parse_config(minimal(), overrides=["algorithm.name=tailorpo", "algorithm.num_candidates=3"])
    assert type(cfg.algorithm) is TailorPOConfig and cfg.algorithm.num_candidates == 3
    cfg = parse_config(minimal(), overrides=["algorithm={name: dde, beta_s: 10}"])
    assert isinstance(cfg.algorithm, DDEConfig) and cfg.algorithm.beta_s == 10.0


def test_tailorpo_g_accepts_differentiable_rewards():
    data = {**minimal(), "algorithm": {"name": "tailorpo_g"}, "rewards": [{"name": "aesthetic"}, {"name": "hpsv2"}]}
    assert parse_config(data).algorithm.name == "tailorpo_g"


def test_existing_local_model_directory(tmp_path):
    cfg = parse_config(with_section("model", {"pretrained": str(tmp_path), "kind": "sd15"}))
    assert cfg.model.pretrained == str(tmp_path)
    hub = parse_config(with_section("model", {"pretrained": "runwayml/stable-diffusion-v1-5", "revision": "fp16"}))
    assert hub.model.revision == "fp16"


def test_prompt_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    cfg = parse_config(with_section("prompts", {"train": {"file": str(prompts)}}))
    assert cfg.prompts.train.file == str(prompts)


def test_numbers_given_for_strings_are_read_as_text():
    assert parse_config(minimal(), overrides=["run_name=2024"]).run_name == "2024"


def test_config_is_frozen():
    cfg = parse_config(minimal())
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.seed = 3
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.train.learning_rate = 1.0
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.algorithm.beta = 1.0


def test_flatten_config():
    cfg = parse_config(with_section("rewards", [{"name": "aesthetic", "kwargs": {"size": 224}}]))
    flat = flatten_config(cfg)
    assert flat["algorithm.beta"] == "0.1"
    assert flat["algorithm.name"] == "d3po"
    assert flat["train.learning_rate"] == "3e-05"
    assert flat["sampling.num_steps"] == "20"
    assert flat["rewards.0.name"] == "aesthetic"
    assert flat["rewards.0.kwargs.size"] == "224"
    assert flat["model.resolution"] == "null"
    assert flat["tracking.enabled"] == "true"
    assert flat["model.lora.target_modules"] == '["to_q", "to_k", "to_v", "to_out.0"]'
    assert all(isinstance(value, str) for value in flat.values())
    assert all(MLFLOW_KEY_RE.match(key) for key in flat), [key for key in flat if not MLFLOW_KEY_RE.match(key)]
    # Every leaf field appears: one key per scalar field of each section.
    assert len([key for key in flat if key.startswith("train.")]) == len(config_module.TrainConfig.model_fields)


def test_resolved_yaml_round_trips():
    cfg = load_config(TINY_YAML)
    again = parse_config(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
    assert again == cfg
    dde = parse_config(with_section("algorithm", {"name": "dde_single", "timestep_range": [200, 700]}))
    assert parse_config(yaml.safe_load(yaml.safe_dump(dde.model_dump(mode="json")))) == dde


def test_tiny_yaml_loads():
    cfg = load_config(TINY_YAML)
    assert cfg.run_name == "tiny" and cfg.model.pretrained == "testbed:pipeline"
    assert (cfg.sampling.num_steps, cfg.sampling.guidance_scale, cfg.sampling.batch_size) == (5, 4.0, 16)
    assert cfg.sampling.eval_num_steps == 10  # ours: 5-step rollouts, 10-step held-out images
    assert cfg.algorithm.name == "dde_single" and cfg.algorithm.correction == "none" and cfg.algorithm.beta_s == 10
    assert (cfg.algorithm.samples_per_prompt, cfg.algorithm.draws_per_pair, cfg.algorithm.timestep_range) == (
        4,
        4,
        (500, 999),
    )  # ours, docs/learning_signal.md
    assert [(reward.name, reward.path) for reward in cfg.rewards] == [("testbed_reward", None)]
    assert [reward.key for reward in cfg.guards.heldout_rewards] == ["checker", "checker_all"]
    assert cfg.train.iterations == 36 and cfg.train.learning_rate == 1e-3 and cfg.train.train_batch_size == 32
    assert cfg.checkpoint.every == 12 and cfg.prompts.eval_seeds == 4 and cfg.tracking.image_grid_every == 36
    # ours: the LoRA on the down and mid blocks' attention only (24 of the 56 projections)
    lora_targets = cfg.model.lora.target_modules
    assert len(lora_targets) == 24 and not any(name.startswith("up_blocks") for name in lora_targets)
    assert (cfg.prompts.train.builtin, cfg.prompts.eval.builtin) == ("testbed_train", "testbed_heldout")


# ----------------------------------------------------------------------------------------------------------------
# The schema itself
# ----------------------------------------------------------------------------------------------------------------


def _config_classes() -> list[type[pydantic.BaseModel]]:
    return [
        value
        for value in vars(config_module).values()
        if isinstance(value, type)
        and issubclass(value, pydantic.BaseModel)
        and value.__module__ == config_module.__name__
    ]


def test_every_section_is_strict_frozen_and_documented():
    classes = _config_classes()
    assert len(classes) >= 15
    for cls in classes:
        assert cls.model_config["extra"] == "forbid", cls
        assert cls.model_config["frozen"] is True, cls
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"
            if "[U]" in field.description:
                assert "UNCONFIRMED" in field.description, f"{cls.__name__}.{name}"


def test_name_constants_match_the_schema():
    assert ALGORITHM_NAMES == (
        "d3po",
        "tailorpo",
        "tailorpo_g",
        "dde",
        "dde_single",
        "diffusion_dpo",
        "ddpo",
        "grpo",
        "draft",
    )
    union_members = typing.get_args(typing.get_args(config_module.AlgorithmConfig)[0])
    assert {name for cls in union_members for name in typing.get_args(cls.model_fields["name"].annotation)} == set(
        ALGORITHM_NAMES
    )
    assert NON_DIFFERENTIABLE_REWARDS <= set(REWARD_NAMES)
    for name in REWARD_NAMES:
        parse_config(with_section("rewards", [{"name": name}]))


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlhf_diffusion.config", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )


def test_cli_prints_resolved_yaml():
    result = _run_cli(str(TINY_YAML), "--set", "train.learning_rate=2e-4", "--set", "algorithm={name: d3po}")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["learning_rate"] == 2e-4
    assert printed["algorithm"] == {
        "name": "d3po",
        "beta": 0.1,
        "clip_epsilon": 0.1,
        "timestep_fraction": 1.0,
        "skip_final_steps": 0,
        "step_weight": "uniform",
        "multi_reward": "weighted_sum",
    }


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**minimal(), "sampling": {"eta": 0}}))
    result = _run_cli(str(path), "--set", "algorithm.beta=-1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{path}: invalid config (2 problems):")
    assert "  sampling.eta: " in result.stderr and "  algorithm.beta: " in result.stderr
    assert result.stdout == ""


def test_every_shipped_config_validates():
    from pathlib import Path

    from rlhf_diffusion.config import load_config

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {
        "tiny.yaml",
        "sd15_tailorpo.yaml",
        "sd15_tailorpo_g.yaml",
        "sd15_d3po.yaml",
        "sdxl_dde.yaml",
        "sd35_flow_grpo.yaml",
        "sd35_tailorpo.yaml",
        "sd35_dde.yaml",
    }
    names = {}
    for path in configs:
        config = load_config(path)
        names[path.name] = config.algorithm.name
    assert names["sd15_tailorpo_g.yaml"] == "tailorpo_g" and names["sdxl_dde.yaml"] == "dde"
    # the SD3.5 configs (run on a tiny SD3.5 pipeline by tests/models/test_sd3_configs.py)
    assert (names["sd35_flow_grpo.yaml"], names["sd35_tailorpo.yaml"], names["sd35_dde.yaml"]) == (
        "grpo",
        "tailorpo",
        "dde",
    )


def test_yaml_alias_bomb_fails_fast_with_a_short_message(tmp_path):
    """A 9-level alias bomb (9^9 shared items, under 500 bytes of YAML) used to take minutes and gigabytes to render
    in the error message; the message now renders a bounded part of it."""
    import subprocess
    import sys

    lines, prev = ['a: &a ["x","x","x","x","x","x","x","x","x"]'], "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    path = tmp_path / "bomb.yaml"
    path.write_text(
        "bombs:\n" + "\n".join("  " + line for line in lines) + f"\nrun_name: *{prev}\n"
        "model: {pretrained: tiny:sd15}\nalgorithm: {name: d3po}\nrewards: [{name: brightness}]\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_diffusion.config", str(path)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "run_name: Input should be a valid string" in proc.stderr and "bombs: unknown key" in proc.stderr
    assert len(proc.stderr) < 2000 and "Traceback" not in proc.stderr


def test_thousands_of_unknown_keys_or_one_huge_key_give_a_short_message(tmp_path):
    """A YAML with 20,000 unknown keys (the probe's 10 MB file had 110k and produced a 28.6 MB message) lists the
    first 20 problems and counts the rest; a 200 kB key is cut in its line."""
    base = "model: {pretrained: tiny:sd15}\nalgorithm: {name: d3po}\nrewards: [{name: brightness}]\n"
    many = tmp_path / "many.yaml"
    many.write_text(base + "".join(f"junk_key_{i}: {i}\n" for i in range(20000)))
    with pytest.raises(ConfigError) as info:
        load_config(many)
    message = str(info.value)
    assert "invalid config (20000 problems)" in message and "... and 19980 more" in message
    assert "junk_key_0: unknown key" in message and len(message.splitlines()) == 22 and len(message) < 30_000
    huge = tmp_path / "huge.yaml"
    huge.write_text(base + "? " + "k" * 200_000 + "\n: 1\n")  # an explicit key: YAML allows it any length
    with pytest.raises(ConfigError) as info:
        load_config(huge)
    assert len(str(info.value)) < 3000 and "characters)" in str(info.value)


@pytest.mark.parametrize("where", ["file", "override"])
def test_yaml_nested_thousands_of_levels_deep_is_one_config_error(tmp_path, where):
    """PyYAML recurses once per nesting level: 5000 nested lists (10 kB of YAML) in the file or in a --set value
    raised RecursionError, a 200 kB traceback with exit code 1; it is one ConfigError (exit 2)."""
    deep = "[" * 5000 + "]" * 5000
    base = "model: {pretrained: tiny:sd15}\nalgorithm: {name: d3po}\nrewards: [{name: brightness}]\n"
    path = tmp_path / "deep.yaml"
    path.write_text(base + (f"run_name: {deep}\n" if where == "file" else ""))
    with pytest.raises(ConfigError) as info:
        load_config(path, [] if where == "file" else [f"run_name={deep}"])
    message = str(info.value)
    assert "nests too deeply" in message and len(message) < 1000
