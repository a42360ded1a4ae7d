"""The README's user command end to end (shortened), and a bad config failing fast with the field named."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

ROOT = Path(__file__).resolve().parents[1]


def run_launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_diffusion.launch", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_tiny_config_runs_end_to_end_and_its_lora_loads_into_a_stock_pipeline(tmp_path):
    proc = run_launch("configs/tiny.yaml", "--set", f"output_dir={tmp_path}", "--set", "train.iterations=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "tiny"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["iteration"] == 2
    summary = json.loads((run_dir / "eval.json").read_text())
    assert summary["algorithm"] == "tailorpo" and "eval_before" in summary and "eval_after" in summary
    from PIL import Image

    grid = Image.open(run_dir / "grid_after.png")  # 8 eval prompts x 1 seed, 64 px + 2 px padding
    assert grid.size == (2 + 66, 8 * 66 + 2)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "_tiny_models" / "sd15")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(run_dir / "lora")
    image = pipe("a cat", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_bad_config_fails_fast_naming_the_field(tmp_path):
    proc = run_launch("configs/tiny.yaml", "--set", "sampling.eta=0", "--set", f"output_dir={tmp_path}")
    assert proc.returncode == 2
    assert "sampling.eta" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_launch(str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr and "Traceback" not in proc.stderr
