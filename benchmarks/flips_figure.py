"""The held-out images a testbed run fixed and broke, before and after, as one PNG.

    python benchmarks/flips_figure.py runs/tiny                 # writes runs/tiny/flips.png
    python benchmarks/flips_figure.py runs/tiny --out docs/img/default_flips.png
    python benchmarks/flips_figure.py --evaluated runs/eval --lora NAME --prompts testbed_heldout --seeds 2 \
        --max-fixed 10 --max-broken 4 --out flips.png    # an `evaluate --save-images` directory instead of a run

Reads the run's `grid_before.png` and `grid_after.png` (the fixed evaluation images: the eval captions in order,
`prompts.eval_seeds` images each, 8 tiles a row), checks every tile against its caption with the world's checker,
and draws each image whose verdict "every attribute right" changed: before on the left, after on the right, fixed
images first (green frame), then broken ones (red frame), with the caption. With `--evaluated` it reads the base
model's and one LoRA's images from `python -m rlhf_diffusion.evaluate ... --save-images` (`images/00_base/`,
`images/NN_<label>/`, p<prompt>_s<seed>.png) instead.
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


def evaluated_images(out_dir: Path, label: str, prompts: str, seeds: int) -> tuple[list, list, list]:
    """(captions, base images, the LoRA's images) of an `evaluate --save-images` directory, prompt-major."""
    from rlhf_diffusion.config import PromptSource

    rows = {p.name.split("_", 1)[1]: p for p in (out_dir / "images").iterdir() if p.is_dir()}
    if label not in rows:
        raise SystemExit(f"{out_dir}/images: no row {label!r}; rows: {', '.join(sorted(rows))}")
    captions, before, after = [], [], []
    for j, caption in enumerate(load_prompts(PromptSource(builtin=prompts))):
        for s in range(seeds):
            name = f"p{j:05d}_s{s}.png"
            captions.append(caption)
            before.append(np.asarray(Image.open(rows["base"] / name).convert("RGB")))
            after.append(np.asarray(Image.open(rows[label] / name).convert("RGB")))
    return captions, before, after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, nargs="?")
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"), help="the run's config")
    parser.add_argument("--evaluated", type=Path, help="an `evaluate --save-images` --out directory instead")
    parser.add_argument("--lora", help="with --evaluated: the LoRA row's label")
    parser.add_argument("--prompts", default="testbed_heldout", help="with --evaluated: the builtin prompt set")
    parser.add_argument("--seeds", type=int, default=2, help="with --evaluated: images per prompt")
    parser.add_argument("--max-fixed", type=int, help="draw at most this many fixed images")
    parser.add_argument("--max-broken", type=int, help="draw at most this many broken images")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--scale", type=int, default=2)
    args = parser.parse_args(argv)
    if (args.run_dir is None) == (args.evaluated is None) or (args.evaluated is not None and not args.lora):
        parser.error("give a run directory, or --evaluated DIR with --lora LABEL")
    if args.evaluated is not None:
        captions, before, after = evaluated_images(args.evaluated, args.lora, args.prompts, args.seeds)
    else:
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
    n_fixed, n_broken = sum(f[0] for f in flips), sum(not f[0] for f in flips)
    fixed_rows = [f for f in flips if f[0]][: args.max_fixed]
    broken_rows = [f for f in flips if not f[0]][: args.max_broken]
    flips = fixed_rows + broken_rows  # fixed first
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
    out = args.out or (args.run_dir or args.evaluated) / "flips.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    print(
        f"{n_fixed} fixed, {n_broken} broken of {len(captions)} (checked on the PNG images; drawn: {len(flips)}): {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
