"""benchmarks/gpu_check.py: its CPU dry run (tiny models, every method) writes a complete JSON and markdown table, so
the prepared GPU run cannot rot between GPU loans; its pure helpers (tolerances, budget guard, real-size configs)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
from gpu_check import METHODS, TOLERANCES, Budget, cosine, judge, real_configs, rel_err  # noqa: E402

MODELS = ("sd15", "sdxl")


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
    sd35 = result["models"]["sd35"]  # not supported by the loader yet: a skip with its reason
    assert sd35["status"] == "skip" and "SD1.5 and SDXL" in sd35["reason"]


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
    ],
)
def test_real_size_configs(kind, expected):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = real_configs(kind)
    builders = {
        "unet": lambda: UNet2DConditionModel(**cfg["unet"]),
        "vae": lambda: AutoencoderKL(**cfg["vae"]),
        "text_encoder": lambda: CLIPTextModel(cfg["text_encoder"]),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(cfg["text_encoder_2"]),
    }
    with torch.device("meta"):  # shapes only: no memory, no init
        for name, millions in expected.items():
            count = sum(p.numel() for p in builders[name]().parameters())
            assert count / 1e6 == pytest.approx(millions, abs=0.1), name
    assert cfg["resolution"] == {"sd15": 512, "sdxl": 1024}[kind]
