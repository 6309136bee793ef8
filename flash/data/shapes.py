"""shapes-64: the synthetic text-to-image dataset of the default model family.

Normative numbers (issue "default model family, part 1"):
- 64x64 RGB, flat background (240, 240, 240); six exact colours; filled, axis-aligned
  circle (diameter d), square (side d), triangle (isosceles, pointing up, base d, height d).
- One object: "a {color} {shape}" or "a {size} {color} {shape}", small d in 12..16,
  large d in 24..30 (either range without a size word), fully inside with a 2 px margin.
- Two objects: "a {color} {shape} {relation} a {color} {shape}", colours differ, each
  d in 14..22, centres at least (d1 + d2) / 2 + 4 px apart along the relation's axis.
- Anti-aliased: drawn at 4x and box-downsampled. Deterministic given a seed.

Coordinates are in output pixels, continuous; an object's centre is its bounding-box
centre (for the triangle too).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

SIZE = 64
SUPERSAMPLE = 4
MARGIN = 2
BACKGROUND = (240, 240, 240)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 34, 34),
    "yellow": (230, 230, 34),
    "green": (34, 230, 34),
    "cyan": (34, 230, 230),
    "blue": (34, 34, 230),
    "magenta": (230, 34, 230),
}
SHAPES = ("circle", "square", "triangle")
SIZE_RANGES = {"small": (12, 16), "large": (24, 30)}
PAIR_SIZE_RANGE = (14, 22)
RELATIONS = ("to the left of", "to the right of", "above", "below")
RELATION_GAP = 4


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    d: int
    cx: float
    cy: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    relation: str | None = None  # objects[0] {relation} objects[1]
    size_word: str | None = None  # one-object scenes only
    prompt: str = field(default="")


@dataclass(frozen=True)
class ObjSpec:
    color: str
    shape: str
    size: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """What a canonical prompt asks for (the evaluator's reference)."""

    objects: tuple[ObjSpec, ...]
    relation: str | None = None


def canonical_prompt(scene: Scene) -> str:
    o = scene.objects
    if len(o) == 1:
        size = f"{scene.size_word} " if scene.size_word else ""
        return f"a {size}{o[0].color} {o[0].shape}"
    return f"a {o[0].color} {o[0].shape} {scene.relation} a {o[1].color} {o[1].shape}"


_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_ONE = re.compile(rf"^a (?:(small|large) )?({_COLOR}) ({_SHAPE})$")
_TWO = re.compile(rf"^a ({_COLOR}) ({_SHAPE}) ({'|'.join(RELATIONS)}) a ({_COLOR}) ({_SHAPE})$")


def parse_prompt(prompt: str) -> PromptSpec:
    """Parse a canonical-grammar prompt; ValueError for anything else."""
    p = " ".join(prompt.strip().lower().rstrip(".").split())
    if m := _ONE.match(p):
        return PromptSpec((ObjSpec(m[2], m[3], m[1]),))
    if m := _TWO.match(p):
        return PromptSpec((ObjSpec(m[1], m[2]), ObjSpec(m[4], m[5])), m[3])
    raise ValueError(f"prompt is not in the shapes-64 grammar: {prompt!r}")


def _uniform_center(rng: np.random.Generator, d: int) -> float:
    lo, hi = d / 2 + MARGIN, SIZE - d / 2 - MARGIN
    return float(rng.uniform(lo, hi))


def sample_one(rng: np.random.Generator) -> Scene:
    color = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(SHAPES))
    size_word = str(rng.choice(list(SIZE_RANGES))) if rng.random() < 0.5 else None
    lo, hi = SIZE_RANGES[size_word or str(rng.choice(list(SIZE_RANGES)))]
    d = int(rng.integers(lo, hi + 1))
    obj = Obj(color, shape, d, _uniform_center(rng, d), _uniform_center(rng, d))
    scene = Scene((obj,), None, size_word)
    return Scene(scene.objects, None, size_word, canonical_prompt(scene))


def relation_holds(a: Obj, b: Obj, relation: str, gap: float = RELATION_GAP) -> bool:
    """Does `a {relation} b` hold with the dataset's separation (centres (d1+d2)/2 + gap apart)?"""
    need = (a.d + b.d) / 2 + gap
    if relation == "to the left of":
        return b.cx - a.cx >= need
    if relation == "to the right of":
        return a.cx - b.cx >= need
    if relation == "above":
        return b.cy - a.cy >= need
    if relation == "below":
        return a.cy - b.cy >= need
    raise ValueError(f"unknown relation {relation!r}; allowed: {', '.join(RELATIONS)}")


def sample_two(rng: np.random.Generator) -> Scene:
    c1, c2 = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
    s1, s2 = (str(s) for s in rng.choice(SHAPES, size=2))
    relation = str(rng.choice(RELATIONS))
    d1, d2 = (int(v) for v in rng.integers(PAIR_SIZE_RANGE[0], PAIR_SIZE_RANGE[1] + 1, size=2))
    for _ in range(1000):
        a = Obj(c1, s1, d1, _uniform_center(rng, d1), _uniform_center(rng, d1))
        b = Obj(c2, s2, d2, _uniform_center(rng, d2), _uniform_center(rng, d2))
        if relation_holds(a, b, relation):
            scene = Scene((a, b), relation)
            return Scene(scene.objects, relation, None, canonical_prompt(scene))
    raise RuntimeError("could not place two objects")  # unreachable with the normative sizes


def sample_scene(rng: np.random.Generator, p_two: float = 0.5) -> Scene:
    return sample_two(rng) if rng.random() < p_two else sample_one(rng)


def _mask(obj: Obj, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Inside-test at supersampled pixel centres (coordinates in output pixels)."""
    r = obj.d / 2
    dx, dy = xs - obj.cx, ys - obj.cy
    if obj.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if obj.shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if obj.shape == "triangle":
        depth = dy + r  # 0 at the apex (top), d at the base
        return (depth >= 0) & (depth <= obj.d) & (np.abs(dx) <= depth / 2)
    raise ValueError(f"unknown shape {obj.shape!r}; allowed: {', '.join(SHAPES)}")


_S = SIZE * SUPERSAMPLE
_COORDS = (np.arange(_S) + 0.5) / SUPERSAMPLE
_YS, _XS = np.meshgrid(_COORDS, _COORDS, indexing="ij")


def render(scene: Scene) -> np.ndarray:
    """uint8 [64, 64, 3]: drawn at 4x, box-filtered down (anti-aliased)."""
    canvas = np.empty((_S, _S, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    for obj in scene.objects:
        # only the object's bounding box (plus a pixel) needs the inside-test
        r = obj.d / 2 + 1
        y0 = max(0, int((obj.cy - r) * SUPERSAMPLE))
        y1 = min(_S, int((obj.cy + r) * SUPERSAMPLE) + 1)
        x0 = max(0, int((obj.cx - r) * SUPERSAMPLE))
        x1 = min(_S, int((obj.cx + r) * SUPERSAMPLE) + 1)
        region = canvas[y0:y1, x0:x1]
        region[_mask(obj, _YS[y0:y1, x0:x1], _XS[y0:y1, x0:x1])] = COLORS[obj.color]
    small = canvas.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def scenes(seed: int, p_two: float = 0.5) -> Iterator[Scene]:
    """Endless deterministic stream of scenes."""
    rng = np.random.default_rng(seed)
    while True:
        yield sample_scene(rng, p_two)


def batches(seed: int, batch_size: int, p_two: float = 0.5) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Endless deterministic stream of (uint8 images [B, 64, 64, 3], prompts)."""
    stream = scenes(seed, p_two)
    while True:
        batch = [next(stream) for _ in range(batch_size)]
        yield np.stack([render(s) for s in batch]), [s.prompt for s in batch]


def worker_batches(seed: int, batch_size: int, p_two: float = 0.5, workers: int = 1, transform=None):
    """`batches` rendered in `workers` processes, overlapping the consumer's work (a training
    step); worker w draws its own stream from seed + 7919 w, and the batches come in turn.
    `transform` maps each batch's images (e.g. to a tensor range) inside the worker; the
    images come back as torch tensors."""
    import torch

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            torch.set_num_threads(1)
            worker = torch.utils.data.get_worker_info()
            own_seed = seed + 7919 * (worker.id if worker is not None else 0)
            for images, prompts in batches(own_seed, batch_size, p_two):
                yield (images if transform is None else transform(images)), prompts

    loader = torch.utils.data.DataLoader(Stream(), batch_size=None, num_workers=workers, prefetch_factor=4)
    return iter(loader)


def eval_prompts(n: int = 500, seed: int = 1234) -> list[str]:
    """The fixed evaluation prompt set: half one-object, half two-object scenes."""
    rng = np.random.default_rng(seed)
    return [(sample_two(rng) if i % 2 else sample_one(rng)).prompt for i in range(n)]


def eval_scenes(n: int = 500, seed: int = 1234) -> list[Scene]:
    """Ground-truth scenes for `eval_prompts` (same seed gives the same prompts)."""
    rng = np.random.default_rng(seed)
    return [sample_two(rng) if i % 2 else sample_one(rng) for i in range(n)]


def to_tensor_range(images: np.ndarray):
    """uint8 [B, H, W, 3] -> float32 torch [B, 3, H, W] in [-1, 1] (the VAE's range)."""
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0
