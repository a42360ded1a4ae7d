"""Prompt lists: the built-in sets shipped with the package, prompt files, and inline lists.

Built-in sets are package data under `rlhf_diffusion/assets/prompts/` (read with importlib.resources; sources and
licences in `assets/prompts/NOTICE`):

    simple_animals           the 45 DDPO animals ("cat" ... "kangaroo"), in DDPO's order (ddpo-pytorch, MIT;
                             docs/rewards.md §3b); DDPO's aesthetic-score run uses them as bare prompts.
    partiprompts             all 1,632 PartiPrompts (P2, google-research/parti, Apache-2.0), in the file's order.
    partiprompts:<category>  the P2 prompts of one category, in the file's order. <category> is the category's
                             name in lower case with every run of other characters replaced by '_':
                             abstract (51), animals (314), artifacts (287), arts (66), food_beverage (74),
                             illustrations (124), indoor_scenes (40), outdoor_scenes (131), people (177),
                             produce_plants (50), vehicles (104), world_knowledge (214).

`load_partiprompts(category=..., challenge=...)` returns the P2 rows with their Category / Challenge / Note
columns (any category and challenge aspect, e.g. challenge="Writing & Symbols").

A prompt file has one prompt per line; surrounding whitespace is stripped, and blank lines and lines starting
with '#' are skipped.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

__all__ = [
    "BUILTIN_PROMPT_SETS",
    "PARTI_CATEGORIES",
    "PARTI_CHALLENGES",
    "PartiPrompt",
    "load_builtin",
    "load_partiprompts",
    "load_prompt_file",
    "load_prompts",
    "parti_slug",
]

# The 12 P2 categories and 11 challenge aspects, as spelled in PartiPrompts.tsv (alphabetical).
PARTI_CATEGORIES: tuple[str, ...] = (
    "Abstract",
    "Animals",
    "Artifacts",
    "Arts",
    "Food & Beverage",
    "Illustrations",
    "Indoor Scenes",
    "Outdoor Scenes",
    "People",
    "Produce & Plants",
    "Vehicles",
    "World Knowledge",
)
PARTI_CHALLENGES: tuple[str, ...] = (
    "Basic",
    "Complex",
    "Fine-grained Detail",
    "Imagination",
    "Linguistic Structures",
    "Perspective",
    "Properties & Positioning",
    "Quantity",
    "Simple Detail",
    "Style & Format",
    "Writing & Symbols",
)
_PARTI_FILE = "partiprompts.tsv"
_PARTI_HEADER = ["Prompt", "Category", "Challenge", "Note"]


def parti_slug(name: str) -> str:
    """The builtin-name form of a P2 category: "Food & Beverage" -> "food_beverage"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


_PARTI_BY_SLUG = {parti_slug(name): name for name in PARTI_CATEGORIES}

# Must equal the `Literal` of `config.PromptSource.builtin` (tests/test_prompts.py checks it).
BUILTIN_PROMPT_SETS: tuple[str, ...] = (
    "simple_animals",
    "partiprompts",
    *(f"partiprompts:{slug}" for slug in _PARTI_BY_SLUG),
    "testbed_train",
    "testbed_heldout",
)


@dataclass(frozen=True)
class PartiPrompt:
    """One row of PartiPrompts.tsv.

    Attributes:
        index: the row's position among all 1,632 prompts (0-based, header excluded).
        prompt: the prompt, surrounding whitespace stripped.
        category: one of `PARTI_CATEGORIES`.
        challenge: one of `PARTI_CHALLENGES`.
        note: the free-text note ("" for most rows).
    """

    index: int
    prompt: str
    category: str
    challenge: str
    note: str


def _read_asset(name: str) -> str:
    return resources.files("rlhf_diffusion").joinpath("assets", "prompts", name).read_text(encoding="utf-8")


def _parse_lines(text: str, origin: str) -> list[str]:
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"{origin} contains no prompts (only blank lines or '#' comments)")
    return prompts


def _parse_parti(text: str) -> list[PartiPrompt]:
    """Parses PartiPrompts.tsv. Fields are split on tabs only: the file does not use CSV quoting (a prompt such as
    `"G I G G L E" painted ...` keeps its quotes)."""
    lines = text.splitlines()
    if not lines or lines[0].split("\t") != _PARTI_HEADER:
        raise ValueError(f"{_PARTI_FILE}: expected the header {' / '.join(_PARTI_HEADER)}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(_PARTI_HEADER) or not fields[0].strip():
            raise ValueError(f"{_PARTI_FILE} line {number}: expected 4 tab-separated fields and a prompt")
        prompt, category, challenge, note = (f.strip() for f in fields)
        rows.append(PartiPrompt(len(rows), prompt, category, challenge, note))
    return rows


def load_partiprompts(category: str | None = None, challenge: str | None = None) -> list[PartiPrompt]:
    """The PartiPrompts rows, in the file's order, optionally of one category and/or one challenge aspect.

    Args:
        category: a name from `PARTI_CATEGORIES` ("Food & Beverage") or its slug ("food_beverage"); None = all.
        challenge: a name from `PARTI_CHALLENGES` ("Writing & Symbols") or its slug ("writing_symbols"); None = all.

    Raises:
        ValueError: unknown category or challenge; the message lists the valid ones.
    """
    rows = _parse_parti(_read_asset(_PARTI_FILE))
    for field, value, valid in (("category", category, PARTI_CATEGORIES), ("challenge", challenge, PARTI_CHALLENGES)):
        if value is None:
            continue
        by_slug = {parti_slug(name): name for name in valid}
        name = value if value in valid else by_slug.get(value)
        if name is None:
            raise ValueError(f"unknown PartiPrompts {field} {value!r}; valid: {', '.join(by_slug)}")
        rows = [row for row in rows if getattr(row, field) == name]
    return rows


def load_builtin(name: str) -> list[str]:
    """The built-in prompt set `name` (one of `BUILTIN_PROMPT_SETS`).

    Raises:
        ValueError: unknown set; the message lists the built-in names.
    """
    if name not in BUILTIN_PROMPT_SETS:
        raise ValueError(f"unknown built-in prompt set '{name}'; built-in sets: {', '.join(BUILTIN_PROMPT_SETS)}")
    if name == "partiprompts" or name.startswith("partiprompts:"):
        _, _, slug = name.partition(":")
        return [row.prompt for row in load_partiprompts(category=slug or None)]
    return _parse_lines(_read_asset(f"{name}.txt"), f"built-in prompt set '{name}'")


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
    ((kind, value),) = chosen.items()
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
