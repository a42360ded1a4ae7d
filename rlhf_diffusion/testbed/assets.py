"""The shipped testbed models (`testbed:pipeline`, `testbed:clip`, `testbed:reward`, `testbed:flow`), trained by
`python -m rlhf_diffusion.testbed.train` (the first two), `testbed.reward_model` and `testbed.train_flow`.

    model:   {pretrained: "testbed:pipeline"}                   # diffusers StableDiffusionPipeline directory
    model:   {pretrained: "testbed:flow"}                       # diffusers StableDiffusion3Pipeline directory
    rewards: [{name: clip_score, path: "testbed:clip"}]         # transformers CLIPModel directory
    rewards: [{name: testbed_reward, path: "testbed:reward"}]   # learned checker model (testbed/reward_model.py)

A `testbed:<name>` reference resolves to `rlhf_diffusion/assets/testbed/<name>` inside the installed package, so a
config that names it works from any working directory and on every Ray node that has the package installed.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_diffusion.models.sources import TESTBED_PREFIX

__all__ = ["TESTBED_DIR", "TESTBED_MODELS", "TESTBED_PREFIX", "is_testbed_ref", "resolve_testbed"]

TESTBED_DIR = Path(__file__).resolve().parent.parent / "assets" / "testbed"
# name -> the file that must exist in its directory
TESTBED_MODELS: dict[str, str] = {
    "pipeline": "model_index.json",
    "clip": "config.json",
    "reward": "model.safetensors",
    "flow": "model_index.json",
}
# name -> the command that builds it
BUILD_COMMANDS: dict[str, str] = {
    "pipeline": f"python -m rlhf_diffusion.testbed.train --out {TESTBED_DIR}",
    "clip": f"python -m rlhf_diffusion.testbed.train --out {TESTBED_DIR}",
    "reward": f"python -m rlhf_diffusion.testbed.reward_model --out {TESTBED_DIR / 'reward'}",
    "flow": f"python -m rlhf_diffusion.testbed.train_flow --out {TESTBED_DIR / 'flow'}",
}


def is_testbed_ref(value: str) -> bool:
    return isinstance(value, str) and value.startswith(TESTBED_PREFIX)


def resolve_testbed(ref: str) -> str:
    """`testbed:<name>` -> the absolute directory of that shipped model.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
        FileNotFoundError: the model directory is missing (a source checkout without the weights); the message says
            how to build it.
    """
    name = ref[len(TESTBED_PREFIX) :] if is_testbed_ref(ref) else ref
    if name not in TESTBED_MODELS:
        raise ValueError(
            f"unknown testbed model {ref!r}; valid: " + ", ".join(TESTBED_PREFIX + n for n in TESTBED_MODELS)
        )
    path = TESTBED_DIR / name
    if not (path / TESTBED_MODELS[name]).exists():
        raise FileNotFoundError(
            f"testbed model {ref!r}: {path} has no {TESTBED_MODELS[name]}; build it with `{BUILD_COMMANDS[name]}`"
        )
    return str(path)
