"""benchmarks/attribute_flips.py: the checker's verdict per attribute on the images `evaluate --save-images` wrote,
each LoRA row's fixed / broken against the base row, on images the world renders exactly."""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from attribute_flips import main, pooled  # noqa: E402

from rlhf_diffusion.testbed.world import check, parse_caption, render  # noqa: E402

LEFT = "a red circle on the left on a white background"
TWO = "two blue triangles on a gray background"


def _save(directory: Path, prompt_index: int, caption: str) -> None:
    image = render(parse_caption(caption), 64, rng=0)
    directory.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(directory / f"p{prompt_index:05d}_s8.png")


def test_per_attribute_fixed_and_broken_against_the_base_row(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{LEFT}\n{TWO}\n")
    images = tmp_path / "ev" / "images"
    # base: the circle on the right (position wrong), two triangles (right); the LoRA: the reverse of both
    _save(images / "00_base", 0, "a red circle on the right on a white background")
    _save(images / "00_base", 1, TWO)
    _save(images / "01_lora", 0, LEFT)
    _save(images / "01_lora", 1, "a blue triangle in the center on a gray background")
    assert check(np.asarray(Image.open(images / "01_lora" / "p00000_s8.png")), LEFT)["all"]  # the renderer is exact
    assert main([str(tmp_path / "ev"), "--prompts", str(prompts), "--group", "lo"]) == 0
    table = json.loads((tmp_path / "ev" / "attribute_flips.json").read_text())["lora"]
    assert table["position"] == {"images": 1, "base": 0.0, "delta": 1.0, "fixed": 1, "broken": 0, "sign_test_p": 1.0}
    assert table["count"]["images"] == 2 and table["count"]["base"] == 1.0
    assert (table["count"]["fixed"], table["count"]["broken"], table["count"]["delta"]) == (0, 1, -0.5)
    assert (table["all"]["fixed"], table["all"]["broken"], table["all"]["delta"]) == (1, 1, 0.0)
    assert "binding" not in table  # no two-object caption
    out = capsys.readouterr().out
    assert "| lora |" in out and "| lo* pooled (1) |" in out


def test_pooled_sums_the_flips_and_averages_the_change():
    a = {"count": {"images": 10, "base": 0.5, "delta": 0.2, "fixed": 3, "broken": 1, "sign_test_p": 0.6}}
    b = {"count": {"images": 10, "base": 0.5, "delta": -0.1, "fixed": 1, "broken": 2, "sign_test_p": 1.0}}
    row = pooled([a, b])["count"]
    assert (row["fixed"], row["broken"], row["images"], row["base"]) == (4, 3, 10, 0.5)
    assert abs(row["delta"] - 0.05) < 1e-12 and abs(row["sign_test_p"] - 1.0) < 1e-12
