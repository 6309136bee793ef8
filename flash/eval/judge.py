"""Pixel-analysis judge of prompt alignment on shapes-64 (CompBench-style categories).

Pipeline for one image (uint8 [64, 64, 3]):
1. Object pixels: RGB distance to the background (240, 240, 240) above OBJECT_THRESHOLD.
2. Colour per object pixel: the palette colour whose background->colour *line* passes
   closest to the pixel. An anti-aliased edge pixel is a mix bg + a * (colour - bg), so it
   lies on that line whatever its coverage a; nearest-*point* matching would misread such
   mixes (half-covered yellow is nearer to the background than to any colour). A pixel
   both far from and at a wide angle to every line (greys, black, far-off hues) is
   "unknown" (COLOR_ANGLE, COLOR_RESIDUAL).
3. Connected components per colour (scipy.ndimage.label, 4-connectivity); components below
   MIN_AREA pixels are specks (noise, stray mislabelled edge pixels) and are dropped.
4. Each kept component is measured with soft coverage a in [0, 1] (projection on its
   colour's line divided by the component's interior level, its 75th percentile, so that
   off or washed-out colours do not read as partial coverage; taken over the component
   grown by one pixel so faint edge pixels count):
   extents from per-row / per-column max coverage, fill = mass / (w * h), and the vertical
   offset of the mass centroid from the box centre (an upward triangle is bottom-heavy).
   Shape = nearest prototype in (fill, 2 * offset): circle (pi/4, 0), square (1, 0),
   triangle (1/2, 1/3); "unknown" when farther than SHAPE_TOLERANCE from all.
5. Judging a prompt: each asked object is matched to a distinct detection of its colour
   (the assignment passing most checks); `color` = all matched, `shape` / `size` = matched
   with the asked shape / size word, `spatial` = the lenient relation check on the matched
   centres (sign along the relation's axis, beyond SPATIAL_MARGIN px; the dataset itself
   keeps centres >= (d1 + d2) / 2 + 4 px apart, a generated image need only get the order
   right), `overall` = every asked check passes and there are no other objects (any
   colour, "unknown" included).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from flash.data.shapes import BACKGROUND, COLORS, SIZE, ObjSpec, PromptSpec, parse_prompt

# A pixel is an object pixel when its RGB distance to the background exceeds this: ~16 %
# coverage of red/green/blue (|colour - bg| = 291), ~23 % of yellow/cyan/magenta (206);
# per-channel noise of a few levels stays far below it.
OBJECT_THRESHOLD = 48.0
# A pixel is "unknown" (no palette colour) when its direction from the background is more
# than COLOR_ANGLE degrees off the nearest colour's AND it is more than COLOR_RESIDUAL from
# that colour's line. Palette directions are >= 42 degrees apart and greys are >= 33 deg
# from every colour; washed-out colours stay nearer their line (blended 50 % toward grey
# 128 or toward their own luminance: <= 26 deg, magenta being the worst), so 30 deg keeps
# washed-out colours named and greys unknown. The residual floor keeps faint, noisy
# anti-aliased edge pixels (close to the background, so a wobbly angle) from forming
# "unknown" rings around objects.
COLOR_ANGLE = 30.0
COLOR_RESIDUAL = 30.0
# Components smaller than this are specks, not objects. The smallest legitimate object
# (small triangle, d = 12) covers ~72 px, so a third of it separates objects from noise.
MIN_AREA = 24
# Max distance in (fill, 2 * offset) space to the nearest shape prototype.
SHAPE_TOLERANCE = 0.2
# Size words: small objects have d in 12..16, large in 24..30; split at the middle.
SIZE_SPLIT = 20.0
# Lenient spatial check: the signed centre offset along the relation's axis must exceed this.
SPATIAL_MARGIN = 2.0

UNKNOWN = "unknown"
PALETTE_NAMES: tuple[str, ...] = tuple(COLORS)
_BG = np.asarray(BACKGROUND, dtype=np.float64)  # [3]
_DIRS = np.asarray([COLORS[c] for c in PALETTE_NAMES], dtype=np.float64) - _BG  # [6, 3]
# (shape, bounding-box fill ratio, 2 * centroid offset / height): the ideal filled shapes
SHAPE_PROTOTYPES: tuple[tuple[str, float, float], ...] = (
    ("circle", math.pi / 4, 0.0),
    ("square", 1.0, 0.0),
    ("triangle", 0.5, 1.0 / 3.0),
)
_FOUR = ndimage.generate_binary_structure(2, 1)  # 4-connectivity


@dataclass(frozen=True)
class Detection:
    """One detected object: colour, shape, soft size d and bounding-box centre (pixels)."""

    color: str
    shape: str
    d: float
    cx: float
    cy: float
    area: int
    fill: float
    offset: float


def _check_image(image: np.ndarray) -> np.ndarray:
    """Validate a uint8 [64, 64, 3] image; return it as float64."""
    image = np.asarray(image)
    if image.shape != (SIZE, SIZE, 3) or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [{SIZE}, {SIZE}, 3] image, got {image.dtype} {image.shape}")
    return image.astype(np.float64)


def object_mask(image: np.ndarray) -> np.ndarray:
    """bool [H, W]: pixels farther than OBJECT_THRESHOLD from the background colour."""
    diff = _check_image(image) - _BG  # [H, W, 3]
    return np.linalg.norm(diff, axis=-1) > OBJECT_THRESHOLD


def coverage(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-colour coverage a (clipped at 0) and distance to each bg->colour line: both [H, W, 6]."""
    diff = _check_image(image) - _BG  # [H, W, 3]
    a = np.maximum(diff @ _DIRS.T / (_DIRS**2).sum(axis=1), 0.0)  # [H, W, 6]
    residual = np.linalg.norm(diff[:, :, None, :] - a[..., None] * _DIRS, axis=-1)  # [H, W, 6]
    return a, residual


def color_labels(image: np.ndarray, residual: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """int [H, W]: palette index of the nearest colour line, 6 = unknown, -1 = background."""
    best = residual.argmin(axis=-1)  # [H, W]
    off = residual.min(axis=-1)  # [H, W] distance to the nearest line
    dist = np.linalg.norm(_check_image(image) - _BG, axis=-1)  # [H, W]
    sin_limit = math.sin(math.radians(COLOR_ANGLE))
    unknown = (off > COLOR_RESIDUAL) & (off > sin_limit * dist)
    return np.where(mask, np.where(unknown, len(PALETTE_NAMES), best), -1)


def classify_shape(fill: float, offset: float) -> str:
    """Nearest shape prototype in (fill, 2 * offset) space, or 'unknown' if none is close."""
    dist = {s: math.hypot(fill - f, 2 * offset - o) for s, f, o in SHAPE_PROTOTYPES}
    shape = min(dist, key=dist.__getitem__)
    return shape if dist[shape] <= SHAPE_TOLERANCE else UNKNOWN


def size_word(d: float) -> str:
    """'small' or 'large' for a measured size d (split between the two ranges)."""
    return "small" if d < SIZE_SPLIT else "large"


def _measure(component: np.ndarray, a: np.ndarray, color: str) -> Detection:
    """Soft geometry of one component; a: [H, W] coverage of its colour (ones for unknown)."""
    grown = ndimage.binary_dilation(component, structure=_FOUR)  # [H, W] include faint edge pixels
    level = max(float(np.percentile(a[component], 75)), 1e-6)  # interior level: 1 for exact colours
    cov = np.where(grown, np.clip(a / level, 0.0, 1.0), 0.0)  # [H, W]
    cols, rows = cov.max(axis=0), cov.max(axis=1)  # [W], [H] profiles
    w, h = max(float(cols.sum()), 1e-9), max(float(rows.sum()), 1e-9)
    mass = max(float(cov.sum()), 1e-9)
    idx = np.arange(SIZE) + 0.5  # pixel centres
    cx, cy = float(idx @ cols) / w, float(idx @ rows) / h  # box centres from the profiles
    mass_cy = float(idx @ cov.sum(axis=1)) / mass
    fill = mass / (w * h)
    offset = (mass_cy - cy) / h
    shape = classify_shape(fill, offset)
    return Detection(color, shape, max(w, h), cx, cy, int(component.sum()), fill, offset)


def detect(image: np.ndarray) -> tuple[list[Detection], np.ndarray]:
    """Objects in an image, largest first, and int [H, W] owner map: detection index, -1 = none."""
    a, residual = coverage(image)  # [H, W, 6] each
    labels = color_labels(image, residual, object_mask(image))  # [H, W]
    found: list[tuple[Detection, np.ndarray]] = []
    for k in range(len(PALETTE_NAMES) + 1):
        comps, n = ndimage.label(labels == k, structure=_FOUR)
        if n == 0:
            continue
        areas = np.bincount(comps.ravel())  # [n + 1], index 0 is "not this colour"
        for j in np.flatnonzero(areas[1:] >= MIN_AREA) + 1:
            component = comps == j  # [H, W]
            if k < len(PALETTE_NAMES):
                found.append((_measure(component, a[:, :, k], PALETTE_NAMES[k]), component))
            else:
                found.append((_measure(component, component.astype(np.float64), UNKNOWN), component))
    found.sort(key=lambda pair: -pair[0].area)
    owner = np.full(labels.shape, -1, dtype=np.int64)  # [H, W]
    for i, (_, component) in enumerate(found):
        owner[component] = i
    return [det for det, _ in found], owner


def spatial_holds(a: Detection, b: Detection, relation: str, margin: float = SPATIAL_MARGIN) -> bool:
    """Lenient `a {relation} b`: centres differ by more than `margin` px with the right sign on the axis."""
    if relation == "to the left of":
        return b.cx - a.cx > margin
    if relation == "to the right of":
        return a.cx - b.cx > margin
    if relation == "above":
        return b.cy - a.cy > margin
    if relation == "below":
        return a.cy - b.cy > margin
    raise ValueError(f"unknown relation {relation!r}")


def _checks(spec: PromptSpec, match: Sequence[Detection | None]) -> dict[str, bool | None]:
    """Per-category verdicts for one assignment of asked objects to detections."""
    found = all(m is not None for m in match)
    shape = found and all(m.shape == o.shape for o, m in zip(spec.objects, match, strict=True))
    size: bool | None = None
    if any(o.size for o in spec.objects):
        size = found and all(
            o.size is None or size_word(m.d) == o.size for o, m in zip(spec.objects, match, strict=True)
        )
    spatial: bool | None = None
    if spec.relation is not None:
        spatial = found and spatial_holds(match[0], match[1], spec.relation)
    return {"color": found, "shape": shape, "size": size, "spatial": spatial}


MAX_CANDIDATES = 8  # per asked object: its colour's largest detections (bounds the search)


def _candidates(o: ObjSpec, detections: Sequence[Detection]) -> list[Detection | None]:
    """Detections an asked object may be matched to: the largest of its colour, or none."""
    return [det for det in detections if det.color == o.color][:MAX_CANDIDATES] or [None]


def match_objects(spec: PromptSpec, detections: Sequence[Detection]) -> tuple[Detection | None, ...]:
    """Assign asked objects to distinct detections of their colour, maximising passed checks."""
    best: tuple[Detection | None, ...] = tuple(None for _ in spec.objects)
    best_key: tuple[int, int] = (-1, 0)
    for match in itertools.product(*(_candidates(o, detections) for o in spec.objects)):
        used = [id(m) for m in match if m is not None]
        if len(used) != len(set(used)):
            continue
        passed = sum(bool(v) for v in _checks(spec, match).values())
        key = (passed, sum(m.area for m in match if m is not None))  # ties: prefer larger objects
        if key > best_key:
            best, best_key = match, key
    return best


def judge(image: np.ndarray, prompt: str) -> dict:
    """Per-category alignment of one image with its prompt: True / False, None = not asked."""
    spec = parse_prompt(prompt)
    detections, _ = detect(image)
    match = match_objects(spec, detections)
    checks = _checks(spec, match)
    extra = len(detections) - len(spec.objects)
    overall = all(v is not False for v in checks.values()) and extra == 0
    return {
        **checks,
        "overall": overall,
        "detections": [asdict(det) for det in detections],
        "matched": [next((i for i, det in enumerate(detections) if det is m), None) for m in match],
    }


CATEGORIES = ("color", "shape", "size", "spatial", "overall")


def score(images: np.ndarray | Sequence[np.ndarray], prompts: Sequence[str]) -> dict:
    """Percent passed per category (over prompts where it applies; None if none) and counts."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    verdicts = [judge(img, p) for img, p in zip(images, prompts, strict=True)]
    out: dict = {"n": len(prompts), "counts": {}}
    for cat in CATEGORIES:
        applicable = [v[cat] for v in verdicts if v[cat] is not None]
        passed = sum(bool(v) for v in applicable)
        out[cat] = 100.0 * passed / len(applicable) if applicable else None
        out["counts"][cat] = {"passed": passed, "applicable": len(applicable)}
    return out
