"""Prompt sets (prompts.py)."""

from types import SimpleNamespace

import pytest

from rlhf_diffusion.prompts import BUILTIN_PROMPT_SETS, load_builtin, load_prompt_file, load_prompts


def test_simple_animals_is_ddpos_list():
    animals = load_builtin("simple_animals")
    assert len(animals) == 45 == len(set(animals))
    assert animals[0] == "cat" and animals[-1] == "kangaroo"
    assert animals[:5] == ["cat", "dog", "horse", "monkey", "rabbit"]
    assert all(a == a.strip() and a for a in animals)


def test_unknown_builtin_lists_names():
    with pytest.raises(ValueError, match="unknown built-in prompt set 'animals'; built-in sets: simple_animals"):
        load_builtin("animals")
    assert BUILTIN_PROMPT_SETS == ("simple_animals",)


def test_prompt_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\n\n  a red fox  \n\t\n# a comment\na photo of a cat # not a comment\n",
                    encoding="utf-8")
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
