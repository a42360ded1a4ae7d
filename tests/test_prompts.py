"""Prompt sets (prompts.py)."""

import hashlib
from importlib import resources
from types import SimpleNamespace
from typing import get_args

import pytest

from rlhf_diffusion.config import ConfigError, PromptSource, parse_config
from rlhf_diffusion.prompts import (
    BUILTIN_PROMPT_SETS,
    PARTI_CATEGORIES,
    PARTI_CHALLENGES,
    load_builtin,
    load_partiprompts,
    load_prompt_file,
    load_prompts,
)

# Category sizes of PartiPrompts (docs/rewards.md §3b; google-research/parti PartiPrompts.tsv).
PARTI_CATEGORY_SIZES = {
    "abstract": 51,
    "animals": 314,
    "artifacts": 287,
    "arts": 66,
    "food_beverage": 74,
    "illustrations": 124,
    "indoor_scenes": 40,
    "outdoor_scenes": 131,
    "people": 177,
    "produce_plants": 50,
    "vehicles": 104,
    "world_knowledge": 214,
}


def test_simple_animals_is_ddpos_list():
    animals = load_builtin("simple_animals")
    assert len(animals) == 45 == len(set(animals))
    assert animals[0] == "cat" and animals[-1] == "kangaroo"
    assert animals[:5] == ["cat", "dog", "horse", "monkey", "rabbit"]
    assert all(a == a.strip() and a for a in animals)


def test_unknown_builtin_lists_names():
    with pytest.raises(
        ValueError,
        match="unknown built-in prompt set 'animals'; built-in sets: simple_animals, "
        "partiprompts, partiprompts:abstract",
    ):
        load_builtin("animals")
    assert BUILTIN_PROMPT_SETS[:2] == ("simple_animals", "partiprompts")


def test_prompt_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(
        "# my prompts\n\n  a red fox  \n\t\n# a comment\na photo of a cat # not a comment\n", encoding="utf-8"
    )
    assert load_prompt_file(path) == ["a red fox", "a photo of a cat # not a comment"]
    assert load_prompt_file(str(path)) == load_prompt_file(path)


def test_missing_prompt_file_names_it(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompt_file(missing)


def test_empty_prompt_file_raises(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt contains no prompts"):
        load_prompt_file(path)


def test_load_prompts_from_each_source(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("one\ntwo\n", encoding="utf-8")
    assert load_prompts(SimpleNamespace(builtin="simple_animals", file=None, inline=None))[-1] == "kangaroo"
    assert load_prompts(SimpleNamespace(builtin=None, file=str(path), inline=None)) == ["one", "two"]
    assert load_prompts(SimpleNamespace(builtin=None, file=None, inline=["x", "y"])) == ["x", "y"]


@pytest.mark.parametrize(
    "source, match",
    [
        (SimpleNamespace(builtin=None, file=None, inline=None), "got none"),
        (SimpleNamespace(builtin="simple_animals", file="p.txt", inline=None), "got builtin, file"),
        (SimpleNamespace(builtin=None, file=None, inline=[]), "empty"),
        (SimpleNamespace(builtin=None, file=None, inline=["ok", "  "]), "inline prompt 1"),
        (SimpleNamespace(builtin=None, file=None, inline="a cat"), "single string"),
    ],
)
def test_load_prompts_rejects_bad_sources(source, match):
    with pytest.raises(ValueError, match=match):
        load_prompts(source)


def _parti_asset(name):
    return resources.files("rlhf_diffusion").joinpath("assets", "prompts", name)


def test_partiprompts_is_the_whole_p2_set():
    prompts = load_builtin("partiprompts")
    assert len(prompts) == 1632 == len(set(prompts))
    assert all(p and p == p.strip() and "\t" not in p for p in prompts)
    assert prompts[:2] == ["bond", "element"]
    # the file uses no CSV quoting: quotes inside a prompt are part of it
    assert any(p.startswith('"G I G G L E" painted') for p in prompts)
    # shipped byte-identical to google-research/parti@5a65797 PartiPrompts.tsv, with its licence and a notice
    data = _parti_asset("partiprompts.tsv").read_bytes()
    assert hashlib.sha256(data).hexdigest() == "fab29e41bb512a169b56acab4cf2a41dcb675e285df2efcde6640c7dd3c440eb"
    notice = _parti_asset("NOTICE").read_text(encoding="utf-8")
    assert "google-research/parti" in notice and "Apache License 2.0" in notice
    assert "Apache License" in _parti_asset("LICENSE-PartiPrompts.txt").read_text(encoding="utf-8")


def test_partiprompts_categories_and_challenges():
    rows = load_partiprompts()
    assert [r.index for r in rows] == list(range(1632))
    assert {r.category for r in rows} == set(PARTI_CATEGORIES)
    assert {r.challenge for r in rows} == set(PARTI_CHALLENGES)
    sizes = {
        name.removeprefix("partiprompts:"): len(load_builtin(name))
        for name in BUILTIN_PROMPT_SETS
        if name.startswith("partiprompts:")
    }
    assert sizes == PARTI_CATEGORY_SIZES and sum(sizes.values()) == 1632
    animals = load_builtin("partiprompts:animals")
    assert animals == [r.prompt for r in rows if r.category == "Animals"]
    assert all(p.strip() for p in animals)
    # a category by its tsv name or its slug, and a challenge aspect
    assert [r.prompt for r in load_partiprompts(category="Food & Beverage")] == load_builtin(
        "partiprompts:food_beverage"
    )
    writing = load_partiprompts(challenge="writing_symbols")
    assert len(writing) == 91 and {r.challenge for r in writing} == {"Writing & Symbols"}
    both = load_partiprompts(category="animals", challenge="Basic")
    assert both and all(r.category == "Animals" and r.challenge == "Basic" for r in both)


def test_unknown_parti_category_is_an_error():
    with pytest.raises(ValueError, match="unknown built-in prompt set 'partiprompts:cats'"):
        load_builtin("partiprompts:cats")
    with pytest.raises(ValueError, match="unknown PartiPrompts category 'cats'; valid: abstract, animals"):
        load_partiprompts(category="cats")
    with pytest.raises(ValueError, match="unknown PartiPrompts challenge 'hard'; valid: basic, complex"):
        load_partiprompts(challenge="hard")


def test_config_builtin_names_match_the_package():
    literal = get_args(PromptSource.model_fields["builtin"].annotation)[0]
    assert get_args(literal) == BUILTIN_PROMPT_SETS
    cfg = parse_config(
        {
            "model": {"pretrained": "tiny:sd15"},
            "algorithm": {"name": "d3po"},
            "rewards": [{"name": "brightness"}],
            "prompts": {"train": {"builtin": "partiprompts:vehicles"}, "eval": {"builtin": "partiprompts"}},
        }
    )
    assert len(load_prompts(cfg.prompts.train)) == 104 and len(load_prompts(cfg.prompts.eval)) == 1632


def test_config_rejects_an_unknown_parti_category_naming_the_field():
    data = {
        "model": {"pretrained": "tiny:sd15"},
        "algorithm": {"name": "d3po"},
        "rewards": [{"name": "brightness"}],
        "prompts": {"train": {"builtin": "partiprompts:cats"}},
    }
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    message = str(error.value)
    assert "(1 problem)" in message
    assert "prompts.train.builtin:" in message and "'partiprompts:animals'" in message
    assert "(got 'partiprompts:cats')" in message
