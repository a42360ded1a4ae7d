"""Which of the testbed checker's attributes a LoRA fixes and breaks, image by image against the base model.

    python -m rlhf_diffusion.evaluate --model testbed:pipeline --prompts testbed_heldout --first-seed 8 --seeds 16 \
        --steps 10 --eta 1 --guidance 4 --rewards-yaml configs/eval/testbed_checker.yaml --grid-prompts 0 \
        --save-images --lora d_s8=runs/a --lora d_s9=runs/b --out runs/ev_images
    python benchmarks/attribute_flips.py runs/ev_images --prompts testbed_heldout [--group d_s]

Reads the images `evaluate --save-images` wrote (DIR/images/<row>/p<prompt index>_s<seed>.png; row 00 is the base
model), judges each with the world's checker (`testbed.world.check`: background, count, colour, shape, and position
for one-object captions or binding for two-object ones, then "all"), and prints, per attribute, the base model's
accuracy and each LoRA's change: the mean, and the images it fixed / broke (a sign test), over the images whose
caption states the attribute. `--group PREFIX` adds a row pooling the LoRAs whose label starts with PREFIX.
`--reward-auc` adds, per attribute, the learned reward's AUC on the base images: a right against a wrong one, among
those whose every other attribute is right. Writes DIR/attribute_flips.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf_diffusion.evaluate import resolve_prompts  # noqa: E402
from rlhf_diffusion.stats import paired_comparison, sign_test_p  # noqa: E402
from rlhf_diffusion.testbed.world import check  # noqa: E402

IMAGE = re.compile(r"p(\d+)_s(\d+)\.png")


def verdicts(row_dir: Path, prompts: list[str]) -> dict[tuple[int, int], dict[str, bool]]:
    """{(prompt index, seed): the checker's verdict per attribute} for every image in `row_dir`."""
    out = {}
    for path in sorted(row_dir.glob("p*_s*.png")):
        match = IMAGE.fullmatch(path.name)
        if match:
            j, seed = int(match[1]), int(match[2])
            out[j, seed] = check(np.asarray(Image.open(path).convert("RGB")), prompts[j])
    return out


def reward_auc(row_dir: Path, prompts: list[str], verdict: dict) -> dict[str, dict[str, float]]:
    """Per attribute A: how well the learned testbed reward ranks an image with A right above one with A wrong, among
    the row's images whose every other stated attribute is right (so the checker's fraction differs by A alone): the
    AUC (ties count half) and the two groups' sizes."""
    import torch

    from rlhf_diffusion.testbed.reward_model import TestbedReward

    keys = sorted(verdict)
    pixels = np.stack([np.asarray(Image.open(row_dir / f"p{j:05d}_s{seed}.png").convert("RGB")) for j, seed in keys])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    reward = TestbedReward()
    with torch.no_grad():
        scores = torch.cat(
            [
                reward.score(images[k : k + 128], [prompts[j] for j, _ in keys[k : k + 128]])
                for k in range(0, len(keys), 128)
            ]
        ).numpy()
    out = {}
    for attribute in dict.fromkeys(a for v in verdict.values() for a in v if a != "all"):
        right, wrong = [], []
        for key, score in zip(keys, scores):
            v = verdict[key]
            if attribute in v and all(ok for a, ok in v.items() if a not in (attribute, "all")):
                (right if v[attribute] else wrong).append(score)
        if right and wrong:
            r, w = np.array(right)[:, None], np.array(wrong)[None, :]
            auc = float((r > w).mean() + 0.5 * (r == w).mean())
            out[attribute] = {"right": len(right), "wrong": len(wrong), "auc": auc}
    return out


def flips(base: dict, lora: dict) -> dict[str, dict[str, float]]:
    """Per attribute: images stating it, base accuracy, Δ accuracy, fixed, broken, sign test p."""
    if set(base) != set(lora):
        raise ValueError("the base and LoRA rows hold different images")
    table: dict[str, dict[str, float]] = {}
    attributes = [a for a in dict.fromkeys(a for v in base.values() for a in v) if a != "all"] + ["all"]
    for attribute in attributes:
        keys = [k for k in base if attribute in base[k]]
        paired = paired_comparison([base[k][attribute] for k in keys], [lora[k][attribute] for k in keys])
        table[attribute] = {
            "images": len(keys),
            "base": paired["before"],
            "delta": paired["delta"],
            "fixed": int(paired["fixed"]),
            "broken": int(paired["broken"]),
            "sign_test_p": paired["sign_test_p"],
        }
    return table


def pooled(tables: list[dict]) -> dict[str, dict[str, float]]:
    """The tables' flips summed per attribute, Δ their mean (each LoRA is judged on the same images)."""
    out = {}
    for attribute in tables[0]:
        fixed = sum(t[attribute]["fixed"] for t in tables)
        broken = sum(t[attribute]["broken"] for t in tables)
        out[attribute] = {
            "images": tables[0][attribute]["images"],
            "base": tables[0][attribute]["base"],
            "delta": float(np.mean([t[attribute]["delta"] for t in tables])),
            "fixed": fixed,
            "broken": broken,
            "sign_test_p": sign_test_p(fixed, broken),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("eval_dir", type=Path, help="an `evaluate --save-images --out` directory")
    parser.add_argument("--prompts", default="testbed_heldout", help="the evaluation's --prompts (set or file)")
    parser.add_argument("--group", action="append", default=[], help="also pool the LoRAs whose label starts so")
    parser.add_argument(
        "--reward-auc", action="store_true", help="also: the learned reward's AUC per attribute on the base images"
    )
    args = parser.parse_args(argv)
    prompts = resolve_prompts(args.prompts).prompts
    rows = sorted(p for p in (args.eval_dir / "images").iterdir() if p.is_dir())
    if len(rows) < 2 or not rows[0].name.startswith("00_"):
        print(f"error: {args.eval_dir}/images holds no base row and LoRA rows (run evaluate with --save-images)")
        return 2
    base = verdicts(rows[0], prompts)
    tables = {row.name[3:]: flips(base, verdicts(row, prompts)) for row in rows[1:]}
    for prefix in args.group:
        members = [t for label, t in tables.items() if label.startswith(prefix)]
        if members:
            tables[f"{prefix}* pooled ({len(members)})"] = pooled(members)
    first = next(iter(tables.values()))
    attributes = list(first)
    print("| LoRA | " + " | ".join(attributes) + " |")
    print("|---|" + "---|" * len(attributes))
    print(
        "| base accuracy (images) | "
        + " | ".join(f"{first[a]['base']:.3f} ({first[a]['images']})" for a in attributes)
        + " |"
    )
    for label, table in tables.items():
        cells = [f"{t['delta']:+.3f} ({t['fixed']}/{t['broken']})" for t in (table[a] for a in attributes)]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.reward_auc:
        auc = reward_auc(rows[0], prompts, base)
        print("\nthe learned reward on the base images, A right against A wrong (every other attribute right):")
        for attribute, row in auc.items():
            print(f"  {attribute}: AUC {row['auc']:.3f} ({row['right']} right, {row['wrong']} wrong)")
        tables["reward_auc_on_base"] = auc
    (args.eval_dir / "attribute_flips.json").write_text(json.dumps(tables, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
