"""The held-out images a testbed run fixed and broke, before and after, as one PNG.

    python benchmarks/flips_figure.py runs/tiny                 # writes runs/tiny/flips.png
    python benchmarks/flips_figure.py runs/tiny --out docs/img/default_flips.png

Reads the run's `grid_before.png` and `grid_after.png` (the fixed evaluation images: the eval captions in order,
`prompts.eval_seeds` images each, 8 tiles a row), checks every tile against its caption with the world's checker,
and draws each image whose verdict "every attribute right" changed: before on the left, after on the right, fixed
images first (green frame), then broken ones (red frame), with the caption.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rlhf_diffusion.config import load_config  # noqa: E402
from rlhf_diffusion.prompts import load_prompts  # noqa: E402
from rlhf_diffusion.testbed.world import check, parse_caption  # noqa: E402

TILE, PAD, PER_ROW = 64, 2, 8


def tiles(path: Path, count: int) -> list[np.ndarray]:
    grid = np.asarray(Image.open(path).convert("RGB"))
    out = []
    for i in range(count):
        r, c = divmod(i, PER_ROW)
        y, x = PAD + r * (TILE + PAD), PAD + c * (TILE + PAD)
        out.append(grid[y : y + TILE, x : x + TILE])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"), help="the run's config")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--scale", type=int, default=2)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    captions = [c for c in load_prompts(config.prompts.eval) for _ in range(config.prompts.eval_seeds)]
    before = tiles(args.run_dir / "grid_before.png", len(captions))
    after = tiles(args.run_dir / "grid_after.png", len(captions))
    flips = []
    for caption, b, a in zip(captions, before, after):
        scene = parse_caption(caption)
        was, now = bool(check(b, scene)["all"]), bool(check(a, scene)["all"])
        if was != now:
            flips.append((now, caption, b, a))
    flips.sort(key=lambda f: not f[0])  # fixed first
    s = args.scale
    row_h, text_w = TILE * s + 8, 420
    canvas = Image.new("RGB", (2 * TILE * s + 24 + text_w, max(1, len(flips)) * row_h + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (fixed, caption, b, a) in enumerate(flips):
        y = 4 + i * row_h
        colour = (0, 150, 0) if fixed else (200, 0, 0)
        for j, img in enumerate((b, a)):
            x = 4 + j * (TILE * s + 8)
            canvas.paste(Image.fromarray(img).resize((TILE * s, TILE * s), Image.NEAREST), (x, y))
            if j == 1:
                draw.rectangle([x - 2, y - 2, x + TILE * s + 1, y + TILE * s + 1], outline=colour, width=2)
        draw.text(
            (2 * TILE * s + 24, y + TILE * s // 2 - 6), ("fixed: " if fixed else "broken: ") + caption, fill=colour
        )
    out = args.out or args.run_dir / "flips.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    fixed = sum(f[0] for f in flips)
    print(f"{fixed} fixed, {len(flips) - fixed} broken of {len(captions)} (checked on the grids' PNG tiles): {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
