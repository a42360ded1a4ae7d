"""Shapes world: a procedural text-to-image world with a programmatic caption checker.

No real Stable Diffusion weights are available to the tests, and random tiny models only draw noise. This world
is what a small diffusion model is trained on from scratch (on CPU) and then aligned with preference RL: every
image has a caption, and `check` says, per attribute the caption states, whether an image matches it. The world is
kept small and flat (solid shapes on a plain background) so that a tiny model can learn to draw it, and the checker
is built to read blurry, imperfect samples of such a model, not only clean renders.

Grammar
-------
Attributes and their values:

    background   white | black | gray
    colour       red | green | blue | yellow          (`PALETTE`; far apart in RGB and from every background)
    shape        circle | square | triangle           (triangles are isosceles and point up)
    count        1 | 2 | 3
    position     left | right | top | bottom | center (single-object scenes only)

Three scene kinds, one caption template each (C colour, S shape, B background):

    single  one object at a position     "a C S <P> on a B background", <P> one of "on the left", "on the right",
                                         "at the top", "at the bottom", "in the center"
                                         e.g. "a red circle on the left on a white background"
    count   two or three identical       "<N> C Ss on a B background", <N> "two" | "three"
            objects                      e.g. "two blue squares on a black background"
    pair    two objects of DIFFERENT     "a C1 S1 and a C2 S2 on a B background", C1 before C2 in `PALETTE` order
            colours (shapes free)        e.g. "a red circle and a green triangle on a gray background"

That makes 4·3·5·3 = 180 single, 4·3·2·3 = 72 count and 6·9·3 = 162 pair scenes: 414 captions in all
(`enumerate_captions`), in a fixed order. A pair's objects must differ in colour because the checker tells objects
apart by colour; this is also what makes attribute binding ("a red circle and a blue square" against a red square
and a blue circle) checkable. Positions of count and pair objects are not stated: each object gets its own
quadrant of the image, chosen at random.

Rendering
---------
`render` draws at 4x the output size with PIL and averages 4x4 blocks (a box filter), so edges are anti-aliased by
exact area coverage. Object "radius" r (half the side of the bounding square) is drawn uniformly from
[size/8, 9·size/64]; a triangle is placed by its centroid (apex 4r/3 above it, base 2r/3 below), a circle and a
square by their centre. A single object's centroid is its position's anchor (left = (size/4, size/2), top =
(size/2, size/4), ...) jittered by up to ±size/32 per axis. Count and pair objects each lie inside their own
quadrant with a margin of size/16, so objects never overlap, are at least size/8 apart, and never touch the
image border (whose pixels are therefore exactly the background colour). All randomness comes from the `rng`
argument: a render is a deterministic function of (scene, size, rng state).

Checker
-------
`detect` reads an image, `check` compares that reading with a caption:

1. background: the per-channel median of the 2-pixel border ring, named by the nearest `BACKGROUNDS` colour if
   that is within `BACKGROUND_THRESHOLD` (RGB Euclidean distance), else unknown (None).
2. blend model: a pixel p near an object of colour c is modelled as a blend bg + a·(c - bg) of the measured
   background bg and c, a being the fraction of c (for an anti-aliased render, exactly the pixel's area coverage).
   For each palette colour, a = <p - bg, c - bg> / |c - bg|^2 and the residual is p's RGB distance to the segment
   from bg to c. Reading colours as blends rather than as points makes the checker indifferent to how saturated
   an object is: a faded or blurred object (a weak model's typical output) keeps its colour. (A fixed distance
   of 80 to the palette colour instead got the count wrong on 41% of renders faded to 70% of their colour
   contrast and on 79% of those faded to 55%; the blend model on none.)
3. segmentation: p is an object pixel of colour c if a >= `OBJECT_COVERAGE` (1/2: a blurred straight edge
   crosses half coverage at the true edge, so the mask keeps the object's size) and the residual is at most
   `BLEND_RESIDUAL` (70, about half the distance between any two colours), the smallest residual winning; a
   pixel on one colour's segment at a >= 1/2 is >= 60 from every other colour's segment. A colour within
   `BLEND_RESIDUAL` of the measured background cannot be told from it and is not looked for (every palette
   colour is >= 156 from every background). Objects are the 8-connected components per colour (scipy.ndimage,
   which mlflow already requires); components with fewer pixels than `MIN_AREA_FRACTION` of the image (a quarter
   of the smallest triangle) are noise and dropped.
4. soft mask: a thresholded mask loses an object's rim, and with it most of what tells a blurred square from a
   circle. So each object is its map of a clipped to [0, 1], on a support of the component plus (a) the
   one-pixel ring around it, which holds an anti-aliased edge, and (b) by hysteresis, the 8-connected region of
   pixels with a > `RIM_COVERAGE` (0.3) that contains the component, which follows a blurred rim as far as it
   goes and stops where noise would take over; other objects' pixels are never part of it. (On blurred renders
   the ring alone misread 3-25x as many shapes; 0.15 picks up noise on gray backgrounds, 0.5 cuts blurred rims.)
5. shape, from two scale-free moments of the soft mask (x right, y down, about the centroid):
   - vertical skewness E[y^3] / E[y^2]^1.5: 0 for a circle or square, -2*sqrt(2)/5 = -0.566 for an up-pointing
     triangle (its mass sits at the base); below `TRIANGLE_SKEW` (halfway, -0.283) it is a triangle;
   - diagonal ratio (E[u^4] + E[v^4]) / (E[x^4] + E[y^4]), u, v = (x +- y) / sqrt(2): 1 for a circle (any
     direction alike), 4/3 for an axis-aligned square (its corners lie on the diagonals); from
     `SQUARE_DIAGONAL_RATIO` (halfway, 7/6) up it is a square, below it a circle.
   Measured on renders of every scene at 32 and 64 pixels (two layouts each): skewness -0.61..-0.51 for
   triangles, within +-0.04 for the others; ratio 0.97..1.01 for circles, 1.31..1.35 for squares. After a
   Gaussian blur of sigma = size/64 plus noise of std 10 the rule is still exact; after sigma = size/32 plus
   noise of std 20 (a 1-pixel blur on a 32-pixel image) it misreads 0.5% of renders at 64 pixels and 6% at 32.
   Shapes need pixels: at 32, JPEG (quality 50, chroma at half resolution) or a 2x down-and-up scaling misreads
   about 25% of renders, against none at 64, so evaluate shapes at 64 where possible.
6. position of the soft centroid (dx, dy), in units of the image size, from the image centre: "center" if both
   |dx| and |dy| are below `CENTER_RADIUS` (1/8; renders lie within 1/32 of their anchor, 1/4 off centre),
   else left/right if |dx| >= |dy|, else top/bottom.

`check` reports, per attribute the caption states (`Scene.attributes`):

    background  the detected background is the stated one
    count       the number of detected objects (any colour) is the stated count (1, 2, 3; a pair is 2)
    colour      the SET of detected colours is the set of stated colours
    shape       the SET of detected shapes is the set of stated shapes
    position    single only: the largest detected object is at the stated position
    binding     pair only: the set of detected (colour, shape) pairs is the stated set
    all         every attribute above holds

Sets keep the attributes apart, so per-attribute accuracies say which attribute a model gets wrong: a render
that differs from its caption in the background, the colour, the shape or the position fails exactly that
attribute (and binding, for a pair, when colour or shape changes); one that differs in the count fails count
(plus position when a single object becomes several, placed freely); a pair with its shapes swapped fails
only binding.

Image types: the canonical image is a uint8 (H, W, 3) RGB numpy array (what `render` returns). `as_uint8`
converts a PIL image, a uint8 (H, W, 3) array, or a float (3, H, W) tensor/array in [0, 1] (the pipeline's
format) to it; `as_float_tensor` goes back to a float32 (3, H, W) tensor in [0, 1]. Every checker function takes
any of these.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from torch import Tensor

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_THRESHOLD",
    "BLEND_RESIDUAL",
    "CENTER_RADIUS",
    "COUNT_WORDS",
    "MIN_AREA_FRACTION",
    "OBJECT_COVERAGE",
    "PALETTE",
    "POSITIONS",
    "RIM_COVERAGE",
    "SHAPES",
    "SQUARE_DIAGONAL_RATIO",
    "TRIANGLE_SKEW",
    "DetectedObject",
    "Detection",
    "ImageLike",
    "Scene",
    "SceneObject",
    "accuracy_of_checks",
    "as_float_tensor",
    "as_uint8",
    "batch_accuracy",
    "caption",
    "check",
    "detect",
    "enumerate_captions",
    "enumerate_scenes",
    "parse_caption",
    "render",
    "sample_scene",
    "split_captions",
]

# Object colours, in caption order for pairs. Pairwise RGB distance >= 156, also to every background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 230),
    "yellow": (235, 235, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Position -> (phrase in captions, anchor (x, y) as fractions of the image size).
POSITIONS: dict[str, tuple[str, tuple[float, float]]] = {
    "left": ("on the left", (0.25, 0.5)),
    "right": ("on the right", (0.75, 0.5)),
    "top": ("at the top", (0.5, 0.25)),
    "bottom": ("at the bottom", (0.5, 0.75)),
    "center": ("in the center", (0.5, 0.5)),
}
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three"}

# Checker thresholds (module docstring, "Checker").
BACKGROUND_THRESHOLD = 80.0  # max RGB distance from the border median to a named background
OBJECT_COVERAGE = 0.5  # min fraction of its colour in an object pixel (blend model)
BLEND_RESIDUAL = 70.0  # max RGB distance from an object pixel to the segment from the background to its colour
RIM_COVERAGE = 0.3  # min fraction of its colour in a pixel of an object's soft-mask support beyond its component
MIN_AREA_FRACTION = 1 / 128  # smaller components are noise; the smallest triangle covers 1/32 of the image
TRIANGLE_SKEW = -np.sqrt(2) / 5  # -0.283: halfway between 0 (circle, square) and an up-triangle's -0.566
SQUARE_DIAGONAL_RATIO = 7 / 6  # halfway between a circle's 1 and a square's 4/3
CENTER_RADIUS = 1 / 8  # |dx| and |dy| below this (in image sizes from the centre) is "center"

_SUPERSAMPLE = 4
_MIN_SIZE = 32
_BORDER = 2  # width of the ring whose median colour is the background

ImageLike = np.ndarray | Tensor | Image.Image


# ---------------------------------------------------------------------------------------------------------------
# Scenes and captions
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: a `PALETTE` colour and a `SHAPES` shape."""

    colour: str
    shape: str

    def __post_init__(self) -> None:
        if self.colour not in PALETTE:
            raise ValueError(f"SceneObject.colour must be one of {', '.join(PALETTE)}; got {self.colour!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"SceneObject.shape must be one of {', '.join(SHAPES)}; got {self.shape!r}")


@dataclass(frozen=True)
class Scene:
    """A scene of the grammar (module docstring): a background and one to three objects.

    Attributes:
        background: a `BACKGROUNDS` name.
        objects: one object (single), two or three equal objects (count), or two objects of different colours
            (pair). A pair is stored in `PALETTE` order of its colours whatever order it was given in, so two
            scenes are equal exactly when their captions are.
        position: a `POSITIONS` name for a single object; must be None for count and pair scenes.

    Raises:
        ValueError: any other combination; the message names the offending argument.
    """

    background: str
    objects: tuple[SceneObject, ...]
    position: str | None = None

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"Scene.background must be one of {', '.join(BACKGROUNDS)}; got {self.background!r}")
        objects = tuple(self.objects)
        if not all(isinstance(o, SceneObject) for o in objects):
            raise ValueError(f"Scene.objects must be SceneObject instances; got {objects!r}")
        if not 1 <= len(objects) <= 3:
            raise ValueError(f"Scene.objects must hold 1 to 3 objects; got {len(objects)}")
        if len(objects) > 1 and len(set(objects)) > 1:
            if len(objects) == 3:
                raise ValueError(f"Scene.objects: three objects must be identical (a count scene); got {objects!r}")
            if objects[0].colour == objects[1].colour:
                raise ValueError(f"Scene.objects: two different objects must differ in colour; got {objects!r}")
            objects = tuple(sorted(objects, key=lambda o: list(PALETTE).index(o.colour)))
        object.__setattr__(self, "objects", objects)
        if len(objects) == 1 and self.position not in POSITIONS:
            raise ValueError(
                f"Scene.position must be one of {', '.join(POSITIONS)} for a single object; got {self.position!r}"
            )
        if len(objects) > 1 and self.position is not None:
            raise ValueError(f"Scene.position must be None for {len(objects)} objects; got {self.position!r}")

    @property
    def kind(self) -> str:
        """ "single", "count" or "pair"."""
        if len(self.objects) == 1:
            return "single"
        return "count" if len(set(self.objects)) == 1 else "pair"

    @property
    def attributes(self) -> tuple[str, ...]:
        """The attributes the caption states, i.e. the keys of `check` (besides "all")."""
        extra = {"single": ("position",), "count": (), "pair": ("binding",)}[self.kind]
        return ("background", "count", "colour", "shape", *extra)


def caption(scene: Scene) -> str:
    """The scene's caption (module docstring, "Grammar"); `parse_caption` inverts it."""
    first = scene.objects[0]
    if scene.kind == "single":
        body = f"a {first.colour} {first.shape} {POSITIONS[scene.position][0]}"
    elif scene.kind == "count":
        body = f"{COUNT_WORDS[len(scene.objects)]} {first.colour} {first.shape}s"
    else:
        second = scene.objects[1]
        body = f"a {first.colour} {first.shape} and a {second.colour} {second.shape}"
    return f"{body} on a {scene.background} background"


_WORD = r"([a-z]+)"
_PHRASES = "|".join(re.escape(phrase) for phrase, _ in POSITIONS.values())
_CAPTION_RE = re.compile(rf"(?P<body>.+) on a {_WORD} background")
_SINGLE_RE = re.compile(rf"a {_WORD} {_WORD} ({_PHRASES})")
_COUNT_RE = re.compile(rf"({'|'.join(COUNT_WORDS.values())}) {_WORD} {_WORD}s")
_PAIR_RE = re.compile(rf"a {_WORD} {_WORD} and a {_WORD} {_WORD}")


def parse_caption(text: str) -> Scene:
    """The scene a caption describes (every caption states all of its scene's attributes).

    Case and runs of whitespace are ignored, and a pair may name its objects in either order, so
    `caption(parse_caption(text))` is `text` for every caption `caption` produces and its canonical form otherwise.

    Raises:
        ValueError: the text does not follow the grammar or uses an unknown word; the message quotes the text.
    """
    normal = " ".join(text.lower().split())
    whole = _CAPTION_RE.fullmatch(normal)
    if whole is None:
        raise ValueError(f"cannot parse caption {text!r}: expected '... on a <background> background'")
    body, background = whole.group("body"), whole.group(2)
    by_phrase = {phrase: name for name, (phrase, _) in POSITIONS.items()}
    by_word = {word: n for n, word in COUNT_WORDS.items()}
    try:
        if match := _SINGLE_RE.fullmatch(body):
            colour, shape, phrase = match.groups()
            return Scene(background, (SceneObject(colour, shape),), by_phrase[phrase])
        if match := _COUNT_RE.fullmatch(body):
            word, colour, shape = match.groups()
            return Scene(background, (SceneObject(colour, shape),) * by_word[word])
        if match := _PAIR_RE.fullmatch(body):
            c1, s1, c2, s2 = match.groups()
            return Scene(background, (SceneObject(c1, s1), SceneObject(c2, s2)))
    except ValueError as error:
        raise ValueError(f"cannot parse caption {text!r}: {error}") from None
    raise ValueError(
        f"cannot parse caption {text!r}: {body!r} is not 'a C S <position>', '<two|three> C Ss' "
        f"or 'a C1 S1 and a C2 S2'"
    )


def enumerate_scenes() -> tuple[Scene, ...]:
    """Every scene of the grammar, once each, in a fixed order: single, then count, then pair scenes."""
    objects = [SceneObject(c, s) for c in PALETTE for s in SHAPES]
    singles = [Scene(b, (o,), p) for b in BACKGROUNDS for o in objects for p in POSITIONS]
    counts = [Scene(b, (o,) * n) for b in BACKGROUNDS for o in objects for n in COUNT_WORDS]
    pairs = [
        Scene(b, (o1, o2))
        for b in BACKGROUNDS
        for o1, o2 in itertools.combinations(objects, 2)
        if o1.colour != o2.colour
    ]
    return (*singles, *counts, *pairs)


def enumerate_captions() -> list[str]:
    """The captions of `enumerate_scenes()`, in its order (414, all distinct)."""
    return [caption(scene) for scene in enumerate_scenes()]


def split_captions(seed: int, held_out_fraction: float) -> tuple[list[str], list[str]]:
    """Splits the captions into (train, held_out) to evaluate on attribute combinations never trained on.

    Stratified by scene kind: round(held_out_fraction · n) captions of each kind (single, count, pair), chosen
    by a permutation from `numpy.random.default_rng(seed)`, are held out. Both lists keep `enumerate_captions`
    order. Deterministic in (seed, held_out_fraction); the two lists are disjoint and cover every caption. Every
    single word is still expected to occur in the train split (tested for small fractions), but this is not
    enforced.

    Raises:
        ValueError: held_out_fraction is not in [0, 1).
    """
    if not 0 <= held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in [0, 1); got {held_out_fraction!r}")
    rng = np.random.default_rng(seed)
    scenes = enumerate_scenes()
    held_out: set[int] = set()
    for kind in ("single", "count", "pair"):
        indices = [i for i, scene in enumerate(scenes) if scene.kind == kind]
        n_held = round(held_out_fraction * len(indices))
        held_out.update(indices[j] for j in rng.permutation(len(indices))[:n_held])
    captions = [caption(scene) for scene in scenes]
    return (
        [c for i, c in enumerate(captions) if i not in held_out],
        [c for i, c in enumerate(captions) if i in held_out],
    )


def sample_scene(rng: np.random.Generator, captions: Sequence[str] | None = None) -> Scene:
    """A scene drawn uniformly from `captions` (e.g. a train split), or from all scenes if None.

    Raises:
        ValueError: `captions` is empty or holds a caption `parse_caption` rejects.
    """
    if captions is None:
        scenes = enumerate_scenes()
        return scenes[rng.integers(len(scenes))]
    if len(captions) == 0:
        raise ValueError("captions must not be empty")
    return parse_caption(captions[rng.integers(len(captions))])


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def _extents(shape: str, r: float) -> tuple[float, float]:
    """How far a shape of radius r reaches (up, down) from its placement point (its centroid)."""
    return (4 * r / 3, 2 * r / 3) if shape == "triangle" else (r, r)


def _layout(scene: Scene, size: int, rng: np.random.Generator) -> list[tuple[SceneObject, float, float, float]]:
    """(object, x, y, r) per object, in pixels (continuous coordinates: the image spans [0, size))."""
    placed = []
    if scene.kind == "single":
        (obj,) = scene.objects
        r = rng.uniform(size / 8, 9 * size / 64)
        ax, ay = POSITIONS[scene.position][1]
        x, y = (a * size + rng.uniform(-size / 32, size / 32) for a in (ax, ay))
        placed.append((obj, x, y, r))
        return placed
    margin, half = size / 16, size / 2
    for obj, quadrant in zip(scene.objects, rng.permutation(4)):
        r = rng.uniform(size / 8, 9 * size / 64)
        up, down = _extents(obj.shape, r)
        left, top = (quadrant % 2) * half, (quadrant // 2) * half
        x = rng.uniform(left + margin + r, left + half - margin - r)
        y = rng.uniform(top + margin + up, top + half - margin - down)
        placed.append((obj, x, y, r))
    return placed


def render(scene: Scene, size: int = 64, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Draws a scene (module docstring, "Rendering").

    Args:
        scene: what to draw.
        size: width = height in pixels, >= 32 (the checker is tested at 32 and 64).
        rng: the randomness of the layout (sizes, jitter, quadrants): a Generator (advanced by the call), a seed,
            or None for seed 0.

    Returns:
        (size, size, 3) uint8 RGB array.

    Raises:
        ValueError: size is not an integer >= 32.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < _MIN_SIZE:
        raise ValueError(f"size must be an integer >= {_MIN_SIZE}; got {size!r}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(0 if rng is None else rng)
    s = _SUPERSAMPLE
    canvas = Image.new("RGB", (size * s, size * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    for obj, x, y, r in _layout(scene, size, rng):
        up, down = _extents(obj.shape, r)
        # PIL addresses pixels by index: continuous coordinate c (supersampled) is index c - 0.5.
        x0, x1, y0, y1 = ((v * s - 0.5) for v in (x - r, x + r, y - up, y + down))
        colour = PALETTE[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=colour)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.uint8).copy()


# ---------------------------------------------------------------------------------------------------------------
# Image conversion
# ---------------------------------------------------------------------------------------------------------------


def as_uint8(image: ImageLike) -> np.ndarray:
    """The canonical image: (H, W, 3) uint8 RGB.

    Accepts a PIL image (converted to RGB), a uint8 (H, W, 3) array, or a floating (3, H, W) torch tensor or numpy
    array with values in [0, 1] (clamped, then `round(x · 255)`, as the reward code quantises).

    Raises:
        ValueError: any other type, dtype or shape (the message names it).
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, Tensor):
        if not image.is_floating_point() or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"image tensor must be floating (3, H, W) in [0, 1]; got {image.dtype} {tuple(image.shape)}"
            )
        image = image.detach().float().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a PIL image, numpy array or torch tensor; got {type(image).__name__}")
    if image.dtype == np.uint8:
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"uint8 image must have shape (H, W, 3); got {image.shape}")
        return image
    if np.issubdtype(image.dtype, np.floating):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"float image must have shape (3, H, W) with values in [0, 1]; got {image.shape}")
        return (np.clip(image, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
    raise ValueError(f"image array must be uint8 (H, W, 3) or floating (3, H, W); got dtype {image.dtype}")


def as_float_tensor(image: ImageLike) -> Tensor:
    """(3, H, W) float32 tensor in [0, 1], the pipeline's image format (uint8 values / 255)."""
    return torch.from_numpy(as_uint8(image).transpose(2, 0, 1).astype(np.float32) / 255)


# ---------------------------------------------------------------------------------------------------------------
# Checker
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectedObject:
    """One object found by `detect`.

    Attributes:
        colour: its `PALETTE` colour.
        shape: its `SHAPES` shape.
        position: its `POSITIONS` name (what a single-object caption would say).
        area: pixels in its thresholded component.
        centroid: (x, y) of its soft mask in pixels, continuous coordinates (the image spans [0, W) x [0, H)).
        skewness: vertical skewness of its soft mask (module docstring, "Checker" step 5).
        diagonal_ratio: diagonal-to-axis fourth-moment ratio of its soft mask.
    """

    colour: str
    shape: str
    position: str
    area: int
    centroid: tuple[float, float]
    skewness: float
    diagonal_ratio: float


@dataclass(frozen=True)
class Detection:
    """What `detect` reads from an image: the background name (None if no background is near enough) and the
    objects, largest first."""

    background: str | None
    objects: tuple[DetectedObject, ...]


_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float64)  # (K, 3)
_BACKGROUND_RGB = np.array(list(BACKGROUNDS.values()), dtype=np.float64)  # (B, 3)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _classify_shape(skewness: float, diagonal_ratio: float) -> str:
    if skewness < TRIANGLE_SKEW:
        return "triangle"
    return "square" if diagonal_ratio >= SQUARE_DIAGONAL_RATIO else "circle"


def _classify_position(dx: float, dy: float) -> str:
    if abs(dx) < CENTER_RADIUS and abs(dy) < CENTER_RADIUS:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _soft_object(colour: str, area: int, weights: np.ndarray) -> DetectedObject:
    """Shape and position from a soft mask (H, W) of coverage weights (module docstring, "Checker" steps 5-6)."""
    h, w = weights.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    mass = weights.sum()
    cx, cy = (weights * xs).sum() / mass, (weights * ys).sum() / mass
    x, y = xs - cx, ys - cy
    u, v = (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)
    variance_y = max((weights * y**2).sum() / mass, 1e-12)  # 0 only for a one-row object
    skewness = (weights * y**3).sum() / mass / variance_y**1.5
    diagonal_ratio = (weights * (u**4 + v**4)).sum() / (weights * (x**4 + y**4)).sum()
    return DetectedObject(
        colour=colour,
        shape=_classify_shape(skewness, diagonal_ratio),
        position=_classify_position(cx / w - 0.5, cy / h - 0.5),
        area=area,
        centroid=(float(cx), float(cy)),
        skewness=float(skewness),
        diagonal_ratio=float(diagonal_ratio),
    )


def detect(image: ImageLike) -> Detection:
    """Reads the background and the objects of an image (module docstring, "Checker")."""
    pixels = as_uint8(image).astype(np.float64)
    h, w, _ = pixels.shape
    border = np.ones((h, w), dtype=bool)
    border[_BORDER : h - _BORDER, _BORDER : w - _BORDER] = False
    background_rgb = np.median(pixels[border], axis=0)
    background_distance = np.linalg.norm(_BACKGROUND_RGB - background_rgb, axis=1)
    nearest_background = int(background_distance.argmin())
    background = (
        list(BACKGROUNDS)[nearest_background]
        if background_distance[nearest_background] <= BACKGROUND_THRESHOLD
        else None
    )

    usable = np.linalg.norm(_PALETTE_RGB - background_rgb, axis=1) > BLEND_RESIDUAL
    colours = [name for name, ok in zip(PALETTE, usable) if ok]
    if not colours:
        return Detection(background, ())
    directions = _PALETTE_RGB[usable] - background_rgb  # (K, 3): each colour's blend segment starts at bg
    offsets = pixels - background_rgb  # (H, W, 3)
    fraction = offsets @ directions.T / (directions**2).sum(axis=1)  # (H, W, K): a, unclipped
    coverage = np.clip(fraction, 0, 1)
    residual = np.linalg.norm(offsets[:, :, None, :] - coverage[..., None] * directions, axis=-1)  # (H, W, K)
    residual = np.where((fraction >= OBJECT_COVERAGE) & (residual <= BLEND_RESIDUAL), residual, np.inf)
    nearest = np.where(np.isfinite(residual).any(axis=-1), residual.argmin(axis=-1), len(colours))
    object_pixels = nearest < len(colours)
    objects = []
    for k, colour in enumerate(colours):
        labels, n = ndimage.label(nearest == k, structure=_EIGHT_CONNECTED)
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        for label in range(1, n + 1):
            if areas[label] < MIN_AREA_FRACTION * h * w:
                continue
            own = labels == label
            rim = (coverage[..., k] > RIM_COVERAGE) & ~object_pixels
            grown, _ = ndimage.label(own | rim, structure=_EIGHT_CONNECTED)
            ring = ndimage.binary_dilation(own, structure=_EIGHT_CONNECTED) & ~object_pixels
            support = (grown == grown[own][0]) | ring
            objects.append(_soft_object(colour, int(areas[label]), np.where(support, coverage[..., k], 0.0)))
    objects.sort(key=lambda o: -o.area)
    return Detection(background, tuple(objects))


def check(image: ImageLike, scene: Scene | str) -> dict[str, bool]:
    """Whether an image matches a caption (or scene), per attribute the caption states, plus "all".

    Args:
        image: any type `as_uint8` accepts.
        scene: a `Scene` or a caption (parsed with `parse_caption`).

    Returns:
        {attribute: matches} for `scene.attributes` in that order (module docstring, "Checker"), then "all".
    """
    if isinstance(scene, str):
        scene = parse_caption(scene)
    found = detect(image)
    seen = {(o.colour, o.shape) for o in found.objects}
    stated = {(o.colour, o.shape) for o in scene.objects}
    result = {
        "background": found.background == scene.background,
        "count": len(found.objects) == len(scene.objects),
        "colour": {c for c, _ in seen} == {c for c, _ in stated},
        "shape": {s for _, s in seen} == {s for _, s in stated},
    }
    if scene.kind == "single":
        result["position"] = bool(found.objects) and found.objects[0].position == scene.position
    elif scene.kind == "pair":
        result["binding"] = seen == stated
    result["all"] = all(result.values())
    return result


def batch_accuracy(images: Iterable[ImageLike], captions: Sequence[Scene | str]) -> dict[str, float]:
    """Per-attribute accuracy of `check` over a batch.

    Args:
        images: N images, each any type `as_uint8` accepts; a (N, 3, H, W) float tensor or a (N, H, W, 3) uint8
            array iterates as such.
        captions: N captions or scenes, one per image.

    Returns:
        {attribute: fraction of the images whose caption states the attribute that match it}, for every attribute
        stated by at least one caption (so "position" averages over single-object captions only, "binding" over
        pairs), in the order background, count, colour, shape, position, binding, all.

    Raises:
        ValueError: the numbers of images and captions differ, or there are none.
    """
    images = list(images)
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions; need one caption per image")
    if not images:
        raise ValueError("images must not be empty")
    return accuracy_of_checks([check(image, scene) for image, scene in zip(images, captions)])


def accuracy_of_checks(results: Sequence[dict[str, bool]]) -> dict[str, float]:
    """`batch_accuracy` from verdicts already computed (one `check` result per image), for callers that also need
    the per-image verdicts: {attribute: mean over the results that have it}, in the order of `batch_accuracy`."""
    order = ("background", "count", "colour", "shape", "position", "binding", "all")
    return {
        key: float(np.mean([r[key] for r in results if key in r])) for key in order if any(key in r for r in results)
    }
