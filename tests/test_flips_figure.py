"""benchmarks/flips_figure.py on an `evaluate --save-images` directory: it counts the images whose checker verdict
changed between the base row and a LoRA row, and draws the fixed ones first."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rlhf_diffusion.prompts import load_builtin
from rlhf_diffusion.testbed.world import parse_caption, render

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import flips_figure  # noqa: E402


def test_flips_of_an_evaluated_directory(tmp_path, capsys):
    captions = load_builtin("testbed_heldout")
    rng = np.random.default_rng(0)
    rows = {"00_base": tmp_path / "images" / "00_base", "01_lora": tmp_path / "images" / "01_lora"}
    for d in rows.values():
        d.mkdir(parents=True)
    wrong = "a red circle on the left on a white background"
    for j, caption in enumerate(captions):
        right = render(parse_caption(caption), 64, rng)
        bad = render(parse_caption(wrong if caption != wrong else captions[1]), 64, rng)
        # prompt 0: base wrong, LoRA right (fixed); prompt 1: base right, LoRA wrong (broken); the rest unchanged
        base, lora = (bad, right) if j == 0 else (right, bad) if j == 1 else (right, right)
        Image.fromarray(base).save(rows["00_base"] / f"p{j:05d}_s0.png")
        Image.fromarray(lora).save(rows["01_lora"] / f"p{j:05d}_s0.png")
    out = tmp_path / "flips.png"
    assert flips_figure.main(["--evaluated", str(tmp_path), "--lora", "lora", "--seeds", "1", "--out", str(out)]) == 0
    assert f"1 fixed, 1 broken of {len(captions)}" in capsys.readouterr().out
    assert Image.open(out).size[1] > 2 * 64
    with pytest.raises(SystemExit, match="no row 'other'"):
        flips_figure.main(["--evaluated", str(tmp_path), "--lora", "other", "--seeds", "1"])
