"""Prompt lists: the built-in sets shipped with the package, prompt files, and inline lists.

Built-in sets live in `rlhf_diffusion/assets/prompts/<name>.txt` (package data, read with importlib.resources):

    simple_animals   the 45 DDPO animals ("cat" ... "kangaroo"), in DDPO's order (ddpo-pytorch, MIT;
                     REWARDS.md §3c); DDPO's aesthetic-score run uses them as bare prompts.

A prompt file has one prompt per line; surrounding whitespace is stripped, and blank lines and lines starting
with '#' are skipped.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Any

__all__ = ["BUILTIN_PROMPT_SETS", "load_builtin", "load_prompt_file", "load_prompts"]

BUILTIN_PROMPT_SETS = ("simple_animals",)


def _parse_lines(text: str, origin: str) -> list[str]:
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"{origin} contains no prompts (only blank lines or '#' comments)")
    return prompts


def load_builtin(name: str) -> list[str]:
    """The built-in prompt set `name` (one of `BUILTIN_PROMPT_SETS`).

    Raises:
        ValueError: unknown set; the message lists the built-in names.
    """
    if name not in BUILTIN_PROMPT_SETS:
        raise ValueError(f"unknown built-in prompt set '{name}'; built-in sets: {', '.join(BUILTIN_PROMPT_SETS)}")
    asset = resources.files("rlhf_diffusion").joinpath("assets", "prompts", f"{name}.txt")
    return _parse_lines(asset.read_text(encoding="utf-8"), f"built-in prompt set '{name}'")


def load_prompt_file(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a UTF-8 text file, one per line (stripped; blank lines and '#' lines skipped).

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        ValueError: the file holds no prompts.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {os.fspath(path)}")
    with open(path, encoding="utf-8") as f:
        return _parse_lines(f.read(), f"prompt file {os.fspath(path)}")


def load_prompts(source: Any) -> list[str]:
    """Resolves a prompt source to a list of prompts.

    Args:
        source: an object with attributes `builtin` (set name), `file` (path) and `inline` (list of prompts),
            exactly one of them not None, e.g. the config's `PromptSource`.

    Raises:
        ValueError: none or several of the three are set, an inline list is empty or holds a blank or
            non-string prompt, or the chosen set / file is unknown or empty.
        FileNotFoundError: the prompt file does not exist.
    """
    chosen = {k: getattr(source, k, None) for k in ("builtin", "file", "inline")}
    chosen = {k: v for k, v in chosen.items() if v is not None}
    if len(chosen) != 1:
        got = ", ".join(chosen) if chosen else "none"
        raise ValueError(f"a prompt source sets exactly one of builtin / file / inline; got {got}")
    (kind, value), = chosen.items()
    if kind == "builtin":
        return load_builtin(value)
    if kind == "file":
        return load_prompt_file(value)
    if isinstance(value, str):
        raise ValueError("inline prompts must be a list of strings, got a single string")
    prompts = list(value)
    if not prompts:
        raise ValueError("inline prompt list is empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"inline prompt {i} must be a non-empty string, got {p!r}")
    return prompts
