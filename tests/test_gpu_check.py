"""benchmarks/gpu_check.py: its CPU dry run (tiny models, every method; SD3.5 through the flow sampler) writes a
complete JSON and markdown table, so the prepared GPU run cannot rot between GPU loans; its pure helpers (tolerances,
budget guard, real-size configs)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
from gpu_check import (  # noqa: E402
    FLOW_LEARNER_NOT_YET,
    METHODS,
    TOLERANCES,
    Budget,
    cosine,
    estimate_run_seconds,
    flow_training_methods,
    judge,
    parse_args,
    real_configs,
    rel_err,
)

MODELS = ("sd15", "sdxl")  # the DDIM models, every method


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    code = gpu_check.main(["--dry-run", "--out", str(out), "--models", "sd15,sdxl,sd35"])
    assert code == 0
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_dry_run_records_every_model(dry_run):
    result, _ = dry_run
    meta = result["meta"]
    assert meta["dry_run"] is True and meta["device"] == "cpu"
    assert meta["elapsed_seconds"] > 0 and meta["estimated_seconds"] > 0
    for kind in MODELS:
        info = result["models"][kind]
        assert info["status"] == "ok", info
        assert info["build_seconds"] > 0 and info["load_seconds"] > 0 and info["resolution"] == 64
        assert all(n > 0 for n in info["parameters"].values())
        assert set(info["fp32_loss"]) == set(METHODS)
        assert all(math.isfinite(v) for v in info["fp32_loss"].values())
    assert result["models"]["sdxl"]["parameters"].keys() >= {"unet", "vae", "text_encoder", "text_encoder_2"}
    sd35 = result["models"]["sd35"]
    assert sd35["status"] == "ok", sd35
    assert sd35["build_seconds"] > 0 and sd35["load_seconds"] > 0 and sd35["resolution"] == 64
    assert sd35["parameters"].keys() == {"transformer", "vae", "text_encoder", "text_encoder_2"}  # no T5
    assert sd35["text_encoders"] == 2
    assert sd35["flow"]["steps"] == 2 and sd35["flow"]["noise_level"] == 0.7 and sd35["flow"]["guidance_scale"] == 4.5


def test_dry_run_measures_throughput_of_every_method(dry_run):
    result, _ = dry_run
    rows = result["throughput"]
    for row in rows:
        assert row["status"] in ("ok", "skip")
        if row["status"] == "skip":
            assert row["reason"]
            continue
        assert row["value"] > 0 and row["seconds"] > 0, row
        assert row["peak_memory_mib"] is None and "CPU" in row["peak_memory_note"]  # null on CPU, with the reason
    ok = {(r["model"], r["what"], r["method"], r["precision"]) for r in rows if r["status"] == "ok"}
    for kind in MODELS:
        assert (kind, "sampling", None, "fp32") in ok
        assert (kind, "sampling", None, "bf16_weights") in ok
        for method in METHODS:
            assert (kind, "rollout (one call)", method, "fp32") in ok
            assert (kind, "learner", method, "no") in ok


def test_dry_run_checks_have_values_or_reasons(dry_run):
    result, _ = dry_run
    checks = result["checks"]
    for check in checks:
        assert check["status"] in ("pass", "fail", "skip"), check
        assert (check["metric"], check["precision"]) in TOLERANCES
        if check["status"] == "skip":
            assert check["reason"] and check["value"] is None
        elif check["status"] == "pass":
            assert math.isfinite(check["value"])
    by_key = {(c["model"], c["check"], c["precision"]): c for c in checks}
    for kind in MODELS:
        # what CPU can check is measured, never skipped
        for name, precision in [
            ("noise prediction (CFG)", "bf16_autocast"),
            ("DDIM step x_prev", "bf16_autocast"),
            ("SDPA vs default attention", "sdpa_vs_default_fp32"),
            ("channels_last UNet + VAE", "channels_last_fp32"),
            ("noise prediction (CFG), weights in bf16", "bf16_weights"),
        ]:
            assert by_key[(kind, name, precision)]["status"] in ("pass", "fail")
        # same maths in float32: these must agree on CPU too
        assert by_key[(kind, "SDPA vs default attention", "sdpa_vs_default_fp32")]["status"] == "pass"
        assert by_key[(kind, "channels_last UNet + VAE", "channels_last_fp32")]["status"] == "pass"
        for method in METHODS:
            for name in (f"{method} loss", f"{method} LoRA gradient"):
                assert by_key[(kind, name, "bf16_autocast")]["status"] in ("pass", "fail", "skip")
                fp16 = by_key[(kind, name, "fp16_autocast")]
                assert fp16["status"] == "skip" and "CUDA" in fp16["reason"]  # reported, never counted as a pass


def test_dry_run_sd35_flow_records(dry_run):
    result, md = dry_run
    rows = {(r["what"], r["precision"]): r for r in result["throughput"] if r["model"] == "sd35"}
    for precision in ("bf16_autocast", "fp32"):  # sampled images/s through flow_sampling, finite
        row = rows[("sampling", precision)]
        assert row["status"] == "ok" and math.isfinite(row["value"]) and row["value"] > 0, row
        assert row["steps"] == 2 and row["noise_level"] == 0.7 and row["guidance_scale"] == 4.5
    assert rows[("sampling", "fp16_autocast")]["status"] == "skip"  # CUDA only
    trainable = flow_training_methods(list(METHODS))  # the methods with a flow loss in this checkout
    learner = {r["method"]: r for r in result["throughput"] if r["model"] == "sd35" and r["what"] == "learner"}
    if not trainable:  # a single "not yet" row, never a number
        assert learner.keys() == {None}
        assert learner[None]["status"] == "skip" and learner[None]["reason"] == FLOW_LEARNER_NOT_YET
        assert learner[None]["value"] is None
        assert f"| sd35 | learner | — | — | — | skipped: {FLOW_LEARNER_NOT_YET} |" in md
    for method in METHODS if trainable else ():
        row = learner[method]
        if method in trainable:
            assert row["status"] == "ok" and math.isfinite(row["value"]) and row["value"] > 0, row
            assert row["precision"] == "no"
            assert any(r["what"] == "rollout (one call)" and r["method"] == method for r in result["throughput"])
            assert math.isfinite(result["models"]["sd35"]["fp32_loss"][method])
        else:
            assert row["status"] == "skip" and row["reason"].startswith("not yet") and row["value"] is None
    checks = {(c["metric"], c["precision"]): c for c in result["checks"] if c["model"] == "sd35"}
    for precision in ("fp32", "bf16_autocast"):
        ratio = checks[("ratio_dev", precision)]
        # a fresh call on the same inputs re-scores the sampled action exactly (CPU kernels are deterministic)
        assert isinstance(ratio["value"], float) and ratio["status"] == "pass" and ratio["value"] < 1e-6, ratio
    for metric in ("logp_drift", "v_rel_err"):
        check = checks[(metric, "bf16_autocast")]
        assert isinstance(check["value"], float) and math.isfinite(check["value"]) and check["value"] > 0, check
        assert check["status"] in ("pass", "fail")
        assert checks[(metric, "fp16_autocast")]["status"] == "skip"
    assert checks[("ratio_dev", "fp16_autocast")]["status"] == "skip"
    assert "| sd35 | sampling | — | bf16_autocast | 2 |" in md
    assert "| sd35 | importance ratio of a just-sampled SDE action (fresh predictor call) | bf16_autocast |" in md
    assert "Flow-GRPO's SDE sampler, 2 steps, noise level 0.7, CFG 4.5" in md


def test_sd35_estimate_and_selection():
    assert parse_args(["--models", "sd35"]).models == ["sd35"]
    assert parse_args([]).models == ["sd15", "sdxl"]  # SD3.5 runs when named
    assert parse_args(["--dry-run"]).flow_steps == 2 and parse_args([]).flow_steps == 10
    # SD3.5 alone fits the default budget with room; the default pair plus SD3.5 does not (hence not a default)
    assert 120 <= estimate_run_seconds(["sd35"], list(METHODS), dry_run=False) <= 300
    assert estimate_run_seconds(["sd15", "sdxl", "sd35"], list(METHODS), dry_run=False) > 420


def test_dry_run_markdown_table(dry_run):
    result, md = dry_run
    assert "| model | measurement | method | precision | batch | value | unit | peak MiB |" in md
    assert "| model | check | precision | metric | value | tolerance | result |" in md
    skipped = sum(c["status"] == "skip" for c in result["checks"])
    assert f"{skipped} skipped (a skip is not a pass)" in md


def test_budget_guard_still_writes_what_was_measured(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--models", "sd15", "--budget-seconds", "0"]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["models"]["sd15"]["status"] == "skip" and "budget" in result["models"]["sd15"]["reason"]
    assert (tmp_path / "gpu_check.md").is_file()


def test_judge_applies_the_stated_tolerance():
    tol, _ = TOLERANCES[("eps_rel_err", "bf16_autocast")]
    assert judge(tol / 2, "eps_rel_err", "bf16_autocast")["status"] == "pass"
    assert judge(tol * 2, "eps_rel_err", "bf16_autocast")["status"] == "fail"
    assert judge(float("nan"), "eps_rel_err", "bf16_autocast")["status"] == "fail"
    assert judge(None, "grad_cosine", "bf16_autocast")["status"] == "fail"
    assert judge(0.999, "grad_cosine", "bf16_autocast")["status"] == "pass"  # ">=" metric
    assert judge(0.5, "grad_cosine", "bf16_autocast") == {"value": 0.5, "tolerance": 0.98, "op": ">=", "status": "fail"}


def test_errors_and_cosine():
    ref = torch.tensor([3.0, 4.0])
    assert rel_err(ref, ref) == 0.0
    assert rel_err(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert rel_err(torch.ones(2), torch.zeros(2)) == math.inf
    assert cosine(ref, 2 * ref) == pytest.approx(1.0)
    assert cosine(ref, torch.zeros(2)) is None  # no direction: the caller records a skip, not a pass


def test_budget_guard():
    now = [0.0]
    budget = Budget(100.0, clock=lambda: now[0])
    assert budget.allows(100.0)
    now[0] = 70.0
    assert budget.left() == 30.0 and budget.allows(30.0) and not budget.allows(31.0)
    assert budget.reason(40.0) == "budget: 30 s of 100 s left, this needs about 40 s"


@pytest.mark.parametrize(
    "kind, expected",
    # parameter counts of the published checkpoints (millions)
    [
        ("sd15", {"unet": 859.5, "vae": 83.7, "text_encoder": 123.1}),
        ("sdxl", {"unet": 2567.5, "text_encoder_2": 694.7}),
        # SD3.5-medium: diffusers counts 2243.2M transformer parameters (the 226.5M sin-cos position table it keeps as
        # a buffer makes the checkpoint's 2.47B); CLIP-L with its projection, CLIP-G, the 16-channel VAE
        ("sd35", {"transformer": 2243.2, "text_encoder": 123.7, "text_encoder_2": 694.7, "vae": 83.8}),
    ],
)
def test_real_size_configs(kind, expected):
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = real_configs(kind)
    builders = {
        "unet": lambda: UNet2DConditionModel(**cfg["unet"]),
        "transformer": lambda: SD3Transformer2DModel(**cfg["transformer"]),
        "vae": lambda: AutoencoderKL(**cfg["vae"]),
        "text_encoder": lambda: (CLIPTextModelWithProjection if kind == "sd35" else CLIPTextModel)(cfg["text_encoder"]),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(cfg["text_encoder_2"]),
    }
    with torch.device("meta"):  # shapes only: no memory, no init
        for name, millions in expected.items():
            count = sum(p.numel() for p in builders[name]().parameters())
            assert count / 1e6 == pytest.approx(millions, abs=0.1), name
    assert cfg["resolution"] == {"sd15": 512, "sdxl": 1024, "sd35": 1024}[kind]
    if kind == "sd35":  # the checkpoint's position table: 384² patches (diffusers' "sd35_medium" signature)
        assert cfg["transformer"]["pos_embed_max_size"] ** 2 == 147456
        assert cfg["transformer"]["num_attention_heads"] * cfg["transformer"]["attention_head_dim"] == 1536


def test_real_sd35_builder_saves_a_loadable_pipeline_without_t5(tmp_path, monkeypatch):
    """`build_real_sd35`'s own code (build on a device, cast to float16, assemble, save) on SD3.5-medium's layout
    scaled down (4 layers, dual attention in the first 2, 2 heads x 8, tiny CLIP towers): the production loader
    reads it back as an SD3 model with two text encoders and no T5."""
    from rlhf_diffusion.models.loading import load_diffusion_model
    from rlhf_diffusion.models.tiny import clip_text_config

    cfg = real_configs("sd35")
    cfg["transformer"].update(
        sample_size=8,
        num_layers=4,
        dual_attention_layers=(0, 1),
        num_attention_heads=2,
        attention_head_dim=8,
        caption_projection_dim=16,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        pos_embed_max_size=8,
    )
    cfg["vae"].update(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64)
    tower = dict(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, projection_dim=16)
    cfg["text_encoder"] = cfg["text_encoder_2"] = clip_text_config(**tower)
    monkeypatch.setattr(gpu_check, "sd35_configs", lambda: cfg)
    out, counts = gpu_check.build_real_pipeline(tmp_path / "sd35", "sd35", torch.device("cpu"))
    assert counts.keys() == {"transformer", "vae", "text_encoder", "text_encoder_2"} and all(counts.values())
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    model = load_diffusion_model(str(out), kind="sd3")
    assert model.kind == "sd3" and len(model.text_encoders) == 2 and model.resolution == 64
    assert model.unet.config.qk_norm == "rms_norm" and list(model.unet.config.dual_attention_layers) == [0, 1]
    assert model.vae.config.shift_factor == pytest.approx(0.0609) and model.scheduler.config.shift == 3.0
