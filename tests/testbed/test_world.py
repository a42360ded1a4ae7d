"""Shapes world (testbed/world.py): grammar, captions, splits, rendering, and the checker on clean, altered and
degraded renders."""

import re
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from rlhf_diffusion.testbed.world import (
    BACKGROUNDS,
    PALETTE,
    POSITIONS,
    SHAPES,
    Scene,
    SceneObject,
    as_float_tensor,
    as_uint8,
    batch_accuracy,
    caption,
    check,
    detect,
    enumerate_captions,
    enumerate_scenes,
    parse_caption,
    render,
    sample_scene,
    split_captions,
)

SCENES = enumerate_scenes()


def _degrade(image: np.ndarray, rng: np.random.Generator, sigma: float, noise_std: float) -> np.ndarray:
    """Gaussian blur (PIL, std `sigma` pixels) then additive Gaussian noise (std in uint8 levels)."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float64)
    return np.clip(blurred + rng.normal(0, noise_std, image.shape), 0, 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Grammar and captions
# ---------------------------------------------------------------------------------------------------------------


def test_grammar_sizes_and_examples():
    captions = enumerate_captions()
    assert len(captions) == len(set(captions)) == 414
    kinds = [scene.kind for scene in SCENES]
    assert (kinds.count("single"), kinds.count("count"), kinds.count("pair")) == (180, 72, 162)
    assert "a red circle on the left on a white background" in captions
    assert "two blue squares on a black background" in captions
    assert "three yellow triangles on a gray background" in captions
    assert "a red circle and a green triangle on a gray background" in captions
    assert "a green triangle and a red circle on a gray background" not in captions  # pairs in palette order
    assert "a red circle and a red square on a white background" not in captions  # pairs differ in colour


def test_caption_round_trip_for_every_scene():
    for scene in SCENES:
        text = caption(scene)
        assert parse_caption(text) == scene, text
        assert caption(parse_caption(text)) == text


def test_parse_caption_normalises_case_whitespace_and_pair_order():
    assert parse_caption("  A Red  Circle on the LEFT on a white background ") == Scene(
        "white", (SceneObject("red", "circle"),), "left"
    )
    swapped = parse_caption("a green triangle and a red circle on a gray background")
    assert caption(swapped) == "a red circle and a green triangle on a gray background"
    assert swapped.objects == (SceneObject("red", "circle"), SceneObject("green", "triangle"))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red circle on the left",
        "a purple circle on the left on a white background",
        "a red hexagon in the center on a white background",
        "a red circle in the middle on a white background",
        "four red circles on a white background",
        "two red circle on a white background",
        "a red circle on the left on a pink background",
        "a red circle and a red square on a white background",
        "a red circle and a blue square on the left on a white background",
    ],
)
def test_parse_caption_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match=re.escape(f"cannot parse caption {text!r}")):
        parse_caption(text)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(background="pink", objects=(SceneObject("red", "circle"),), position="left"), "Scene.background"),
        (dict(background="white", objects=(), position=None), "1 to 3 objects"),
        (dict(background="white", objects=(SceneObject("red", "circle"),) * 4), "1 to 3 objects"),
        (dict(background="white", objects=(SceneObject("red", "circle"),)), "Scene.position"),
        (dict(background="white", objects=(SceneObject("red", "circle"),), position="middle"), "Scene.position"),
        (dict(background="white", objects=(SceneObject("red", "circle"),) * 2, position="left"), "Scene.position"),
        (
            dict(background="white", objects=(SceneObject("red", "circle"), SceneObject("red", "square"))),
            "differ in colour",
        ),
        (
            dict(background="white", objects=(SceneObject("red", "circle"),) * 2 + (SceneObject("blue", "circle"),)),
            "three objects must be identical",
        ),
        (dict(background="white", objects=(("red", "circle"),), position="left"), "SceneObject instances"),
    ],
)
def test_scene_rejects_combinations_outside_the_grammar(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Scene(**kwargs)


@pytest.mark.parametrize(
    "colour, shape, message", [("purple", "circle", "SceneObject.colour"), ("red", "hexagon", "SceneObject.shape")]
)
def test_scene_object_rejects_unknown_values(colour, shape, message):
    with pytest.raises(ValueError, match=message):
        SceneObject(colour, shape)


# ---------------------------------------------------------------------------------------------------------------
# Splits and sampling
# ---------------------------------------------------------------------------------------------------------------


def test_split_is_disjoint_complete_stratified_and_deterministic():
    train, held_out = split_captions(seed=0, held_out_fraction=0.2)
    assert not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(enumerate_captions())
    kinds = [parse_caption(c).kind for c in held_out]
    assert (kinds.count("single"), kinds.count("count"), kinds.count("pair")) == (36, 14, 32)
    assert split_captions(seed=0, held_out_fraction=0.2) == (train, held_out)
    assert split_captions(seed=1, held_out_fraction=0.2)[1] != held_out
    order = {c: i for i, c in enumerate(enumerate_captions())}
    assert [order[c] for c in train] == sorted(order[c] for c in train)
    assert split_captions(seed=0, held_out_fraction=0.0) == (enumerate_captions(), [])


def test_train_split_keeps_every_word():
    vocabulary = {word for c in enumerate_captions() for word in c.split()}
    for seed in range(10):
        train, _ = split_captions(seed=seed, held_out_fraction=0.2)
        assert {word for c in train for word in c.split()} == vocabulary


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="held_out_fraction"):
        split_captions(seed=0, held_out_fraction=fraction)


def test_sample_scene_is_deterministic_and_respects_captions():
    def draw(seed, captions=None):
        rng = np.random.default_rng(seed)
        return [sample_scene(rng, captions) for _ in range(50)]

    assert draw(3) == draw(3) != draw(4)
    assert {s.kind for s in draw(3)} == {"single", "count", "pair"}
    train, _ = split_captions(seed=0, held_out_fraction=0.5)
    assert {caption(s) for s in draw(5, train)} <= set(train)
    with pytest.raises(ValueError, match="captions must not be empty"):
        sample_scene(np.random.default_rng(0), [])
    with pytest.raises(ValueError, match="cannot parse caption 'a dog'"):
        sample_scene(np.random.default_rng(0), ["a dog"])


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 48, 64])
def test_render_is_deterministic_uint8_and_keeps_the_border_clean(size):
    scene = parse_caption("three yellow triangles on a gray background")
    image = render(scene, size, np.random.default_rng(1))
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert np.array_equal(image, render(scene, size, 1))
    assert np.array_equal(render(scene, size), render(scene, size, 0))
    assert not np.array_equal(image, render(scene, size, 2))
    for other in SCENES[::7]:
        image = render(other, size, np.random.default_rng(5))
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (border == BACKGROUNDS[other.background]).all(), caption(other)
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 2  # anti-aliased edges


@pytest.mark.parametrize("size", [16, 31, 32.0, True])
def test_render_rejects_bad_size(size):
    with pytest.raises(ValueError, match="size must be an integer >= 32"):
        render(SCENES[0], size)


# ---------------------------------------------------------------------------------------------------------------
# Checker
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 32])
def test_checker_passes_every_clean_render(size):
    rng = np.random.default_rng(size)
    for scene in SCENES:
        result = check(render(scene, size, rng), scene)
        assert list(result) == [*scene.attributes, "all"]
        assert result["all"], (caption(scene), result)


def _other(values, current, rng) -> str:
    """A random one of `values` not in `current`."""
    return str(rng.choice([v for v in values if v not in current]))


def _altered(scene: Scene, attribute: str, rng: np.random.Generator) -> tuple[Scene, set[str]] | None:
    """`scene` with one attribute changed, and the attributes its caption must then fail (None: not applicable)."""
    objects, kind = scene.objects, scene.kind
    first = objects[0]
    if attribute == "background":
        return Scene(_other(BACKGROUNDS, {scene.background}, rng), objects, scene.position), {"background"}
    if attribute == "position":
        if kind != "single":
            return None
        return Scene(scene.background, objects, _other(POSITIONS, {scene.position}, rng)), {"position"}
    if attribute == "colour":
        new = SceneObject(_other(PALETTE, {o.colour for o in objects}, rng), first.shape)
        if kind == "pair":
            return Scene(scene.background, (new, objects[1])), {"colour", "binding"}
        return Scene(scene.background, (new,) * len(objects), scene.position), {"colour"}
    if attribute == "shape":
        new = SceneObject(first.colour, _other(SHAPES, {o.shape for o in objects}, rng))
        if kind == "pair":
            return Scene(scene.background, (new, objects[1])), {"shape", "binding"}
        return Scene(scene.background, (new,) * len(objects), scene.position), {"shape"}
    if attribute == "count":
        if kind == "pair":
            return None
        if kind == "single":
            return Scene(scene.background, (first,) * int(rng.choice([2, 3]))), {"count"}
        return Scene(scene.background, (first,) * (5 - len(objects))), {"count"}
    if attribute == "binding":
        if kind != "pair" or first.shape == objects[1].shape:
            return None
        swapped = (SceneObject(first.colour, objects[1].shape), SceneObject(objects[1].colour, first.shape))
        return Scene(scene.background, swapped), {"binding"}
    raise AssertionError(attribute)


@pytest.mark.parametrize("attribute", ["background", "colour", "shape", "count", "position", "binding"])
@pytest.mark.parametrize("size", [64, 32])
def test_checker_fails_exactly_the_changed_attribute(attribute, size):
    rng = np.random.default_rng(zlib.crc32(f"{attribute} {size}".encode()))
    tested = 0
    for index in rng.permutation(len(SCENES))[:80]:
        scene = SCENES[index]
        altered = _altered(scene, attribute, rng)
        if altered is None:
            continue
        variant, failing = altered
        result = check(render(variant, size, rng), scene)
        expected = {key: key not in failing for key in scene.attributes}
        if scene.kind == "single" and attribute == "count":  # the extra objects are placed freely
            result.pop("position"), expected.pop("position")
        assert {k: v for k, v in result.items() if k != "all"} == expected, (caption(scene), caption(variant))
        assert not result["all"]
        tested += 1
    assert tested >= 15


@pytest.mark.parametrize("size", [64, 32])
def test_checker_is_robust_to_mild_blur_and_noise(size):
    rng = np.random.default_rng(100 + size)
    passed = []
    for index in rng.permutation(len(SCENES))[:150]:
        scene = SCENES[index]
        image = _degrade(render(scene, size, rng), rng, sigma=size / 64, noise_std=10)
        passed.append(check(image, scene)["all"])
    assert np.mean(passed) >= 0.95


@pytest.mark.parametrize("size", [64, 32])
def test_checker_reads_faded_objects(size):
    # A weak model's objects are often washed out: blended 45% back into the background, they still pass.
    rng = np.random.default_rng(200 + size)
    for index in rng.permutation(len(SCENES))[:60]:
        scene = SCENES[index]
        background = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
        faded = (background + 0.55 * (render(scene, size, rng) - background)).round().astype(np.uint8)
        assert check(faded, scene)["all"], caption(scene)


@pytest.mark.parametrize("size", [64, 32])
def test_noise_and_blank_images_fail(size):
    rng = np.random.default_rng(size)
    for scene in SCENES[::23]:
        noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        assert not check(noise, scene)["all"], caption(scene)
        blank = np.full((size, size, 3), BACKGROUNDS[scene.background], dtype=np.uint8)
        result = check(blank, scene)
        assert result["background"] and not result["count"] and not result["colour"] and not result["shape"]
        assert not result["all"]
    red = np.full((size, size, 3), PALETTE["red"], dtype=np.uint8)
    assert detect(red).background is None and detect(red).objects == ()


def test_detect_reports_objects_largest_first():
    scene = parse_caption("a blue square and a yellow triangle on a black background")
    found = detect(render(scene, 64, 0))
    assert found.background == "black"
    assert [(o.colour, o.shape) for o in found.objects] == [("blue", "square"), ("yellow", "triangle")]
    assert found.objects[0].area > found.objects[1].area  # a square covers twice a triangle's area
    single = detect(render(parse_caption("a green circle at the bottom on a white background"), 64, 0)).objects[0]
    assert single.position == "bottom" and abs(single.centroid[0] - 32) <= 2 and abs(single.centroid[1] - 48) <= 2


def test_image_formats_agree():
    scene = parse_caption("a red triangle on the right on a gray background")
    image = render(scene, 32, 0)
    tensor = as_float_tensor(image)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert np.array_equal(as_uint8(tensor), image)
    assert np.array_equal(as_uint8(tensor.numpy().astype(np.float64)), image)
    assert np.array_equal(as_uint8(Image.fromarray(image)), image)
    assert np.array_equal(as_uint8(Image.fromarray(image).convert("RGBA")), image)
    expected = check(image, scene)
    for form in (tensor, tensor.numpy(), Image.fromarray(image)):
        assert check(form, caption(scene)) == expected


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((32, 32, 3), dtype=np.int64), "dtype int64"),
        (np.zeros((3, 32, 32), dtype=np.uint8), r"uint8 image must have shape \(H, W, 3\)"),
        (np.zeros((32, 32, 3), dtype=np.float32), r"float image must have shape \(3, H, W\)"),
        (torch.zeros(1, 3, 32, 32), r"image tensor must be floating \(3, H, W\)"),
        (torch.zeros(3, 32, 32, dtype=torch.uint8), r"image tensor must be floating \(3, H, W\)"),
        ([[0, 0, 0]], "got list"),
    ],
)
def test_as_uint8_rejects_other_inputs(bad, message):
    with pytest.raises(ValueError, match=message):
        as_uint8(bad)


def test_batch_accuracy_averages_each_attribute_over_the_captions_that_state_it():
    singles = [Scene("white", (SceneObject("red", "circle"),), p) for p in ("left", "top", "center", "right")]
    wrong_colour = Scene("white", (SceneObject("blue", "circle"),), "right")
    pair = Scene("black", (SceneObject("green", "square"), SceneObject("yellow", "circle")))
    swapped = Scene("black", (SceneObject("green", "circle"), SceneObject("yellow", "square")))
    drawn = [*singles[:3], wrong_colour, swapped]
    images = torch.stack([as_float_tensor(render(s, 32, i)) for i, s in enumerate(drawn)])  # (5, 3, 32, 32)
    accuracy = batch_accuracy(images, [*singles, caption(pair)])
    assert accuracy == {
        "background": 1.0,
        "count": 1.0,
        "colour": 0.8,
        "shape": 1.0,
        "position": 1.0,
        "binding": 0.0,
        "all": 0.6,
    }
    as_arrays = np.stack([render(s, 32, i) for i, s in enumerate(drawn)])  # (5, 32, 32, 3) uint8
    assert batch_accuracy(as_arrays, [*singles, pair]) == accuracy
    with pytest.raises(ValueError, match="got 5 images but 4 captions"):
        batch_accuracy(images, singles)
    with pytest.raises(ValueError, match="images must not be empty"):
        batch_accuracy([], [])
