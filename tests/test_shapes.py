"""shapes-64: the normative numbers of the dataset."""

import numpy as np
import pytest

from flash.data import shapes
from flash.data.shapes import COLORS, Obj, Scene, parse_prompt, render, sample_one, sample_two


def test_background_and_palette_are_exact():
    img = render(Scene((Obj("red", "square", 20, 32.0, 32.0),)))
    assert tuple(img[0, 0]) == (240, 240, 240)
    assert tuple(img[32, 32]) == (230, 34, 34)
    assert COLORS == {
        "red": (230, 34, 34), "yellow": (230, 230, 34), "green": (34, 230, 34),
        "cyan": (34, 230, 230), "blue": (34, 34, 230), "magenta": (230, 34, 230),
    }


def test_antialiased_edges():
    img = render(Scene((Obj("blue", "circle", 21, 32.3, 31.7),)))
    mixed = ~np.all((img == (240, 240, 240)) | (img == (34, 34, 230)), axis=-1)
    assert mixed.sum() > 20  # partial-coverage pixels on the rim


@pytest.mark.parametrize("shape,area", [("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)])
def test_shape_areas(shape, area):
    d = 24
    img = render(Scene((Obj("green", shape, d, 32.0, 32.0),))).astype(float)
    coverage = (240 - img[..., 0]) / (240 - 34)  # red channel: 240 background, 34 green
    assert abs(coverage.sum() / d**2 - area) < 0.03


def test_triangle_points_up():
    img = render(Scene((Obj("red", "triangle", 24, 32.0, 32.0),)))
    obj = np.any(img != 240, axis=-1)
    rows = obj.sum(axis=1)
    top, bottom = np.nonzero(rows)[0][[0, -1]]
    assert rows[top] < rows[bottom]


def test_sampled_scenes_follow_the_grammar():
    rng = np.random.default_rng(0)
    for _ in range(300):
        s = sample_one(rng)
        (o,) = s.objects
        lo, hi = shapes.SIZE_RANGES[s.size_word] if s.size_word else (12, 30)
        assert lo <= o.d <= hi and not (16 < o.d < 24)
        assert o.d / 2 + 2 <= o.cx <= 64 - o.d / 2 - 2 and o.d / 2 + 2 <= o.cy <= 64 - o.d / 2 - 2
        assert parse_prompt(s.prompt).objects[0].size == s.size_word
        t = sample_two(rng)
        a, b = t.objects
        assert a.color != b.color and 14 <= a.d <= 22 and 14 <= b.d <= 22
        assert shapes.relation_holds(a, b, t.relation)
        spec = parse_prompt(t.prompt)
        assert spec.relation == t.relation and [x.color for x in spec.objects] == [a.color, b.color]


def test_relation_gap_is_normative():
    a, b = Obj("red", "circle", 20, 10.0, 30.0), Obj("blue", "square", 16, 32.0, 30.0)
    assert shapes.relation_holds(a, b, "to the left of")  # 22 >= (20 + 16) / 2 + 4
    b2 = Obj("blue", "square", 16, 31.9, 30.0)
    assert not shapes.relation_holds(a, b2, "to the left of")


def test_deterministic_streams():
    a = next(shapes.batches(7, 8))
    b = next(shapes.batches(7, 8))
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert shapes.eval_prompts(10) == [s.prompt for s in shapes.eval_scenes(10)]


def test_parse_rejects_other_prompts():
    with pytest.raises(ValueError, match="grammar"):
        parse_prompt("a purple circle")
    assert parse_prompt("  A Red Circle. ").objects[0].color == "red"
