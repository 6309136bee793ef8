"""The shapes-64 evaluator: the judge must pass ground truth and catch the failures it exists to catch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.linalg
from scipy import ndimage

from flash.data.shapes import BACKGROUND, Obj, Scene, eval_scenes, render
from flash.eval import (
    background_cleanliness,
    detect,
    evaluate,
    feature_stats,
    features,
    frechet_distance,
    frechet_distance_stats,
    judge,
    reference_images,
    score,
    vividness,
)

N_ALIGN = 200  # ground-truth alignment set (the brief's minimum)
N_FD = 100  # image-quality sets: enough for a stable Fréchet floor, small enough to be fast
OPPOSITE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


@pytest.fixture(scope="module")
def truth() -> tuple[list[Scene], np.ndarray, list[str]]:
    """Ground-truth eval scenes, their renders [N, 64, 64, 3] and prompts."""
    scenes = eval_scenes(N_ALIGN)
    return scenes, np.stack([render(s) for s in scenes]), [s.prompt for s in scenes]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """Other ground truth (the evaluator's default reference set), [N_FD, 64, 64, 3]."""
    return reference_images(N_FD)


@pytest.fixture(scope="module")
def reference_stats(reference) -> tuple[np.ndarray, np.ndarray]:
    """Feature mean and covariance of the reference set."""
    return feature_stats(reference)


def fd_to(images: np.ndarray, stats: tuple[np.ndarray, np.ndarray]) -> float:
    """Fréchet distance of images [N, 64, 64, 3] to precomputed reference statistics."""
    return frechet_distance_stats(*feature_stats(images), *stats)


@pytest.fixture(scope="module")
def floor(truth, reference_stats) -> float:
    """Fréchet distance of ground truth against other ground truth: the finite-sample floor."""
    return fd_to(truth[1][:N_FD], reference_stats)


def blur(images: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Gaussian blur of uint8 images [N, H, W, 3] in the two spatial axes."""
    out = ndimage.gaussian_filter(images.astype(np.float64), sigma=(0, sigma, sigma, 0), mode="nearest")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def desaturate(images: np.ndarray, amount: float = 0.5) -> np.ndarray:
    """Blend each pixel toward its own grey (luminance): washed-out colours, background unchanged."""
    x = images.astype(np.float64)
    grey = x @ np.array([0.299, 0.587, 0.114])  # [N, H, W]
    return np.clip(np.rint((1 - amount) * x + amount * grey[..., None]), 0, 255).astype(np.uint8)


def blank() -> np.ndarray:
    """A pure-background image [64, 64, 3]."""
    return np.broadcast_to(np.asarray(BACKGROUND, dtype=np.uint8), (64, 64, 3)).copy()


def two_object_scenes(scenes: list[Scene]) -> list[Scene]:
    """The two-object scenes among `scenes`."""
    return [s for s in scenes if s.relation is not None]


# --- alignment ---------------------------------------------------------------------------


def test_ground_truth_scores_near_perfect(truth):
    result = score(truth[1], truth[2])
    for cat in ("color", "shape", "size", "spatial", "overall"):
        assert result["counts"][cat]["applicable"] > 0, cat
        assert result[cat] >= 98.0, (cat, result)
    assert result["n"] == N_ALIGN


def test_ground_truth_detections_match_the_scene(truth):
    scenes, images, _ = truth
    for scene, image in list(zip(scenes, images, strict=True))[:40]:
        dets, _ = detect(image)
        assert len(dets) == len(scene.objects)
        for obj in scene.objects:
            (det,) = [d for d in dets if d.color == obj.color]
            assert det.shape == obj.shape
            assert abs(det.d - obj.d) <= 1.5
            assert abs(det.cx - obj.cx) <= 1.0 and abs(det.cy - obj.cy) <= 1.0


def test_shuffled_prompts_score_low(truth):
    perm = np.random.default_rng(0).permutation(N_ALIGN)
    result = score(truth[1], [truth[2][i] for i in perm])
    assert result["overall"] < 30.0, result


def test_pure_background_fails_color():
    for prompt in ("a red circle", "a blue square above a green triangle"):
        verdict = judge(blank(), prompt)
        assert verdict["color"] is False and verdict["shape"] is False and verdict["overall"] is False
        assert verdict["detections"] == []
    assert judge(blank(), "a blue square above a green triangle")["spatial"] is False


def test_extra_object_fails_overall():
    target = Obj("red", "circle", 20, 16.0, 16.0)
    extras = [Obj("blue", "square", 14, 46.0, 46.0), Obj("red", "triangle", 14, 46.0, 46.0)]
    assert judge(render(Scene((target,))), "a red circle")["overall"] is True
    for extra in extras:
        verdict = judge(render(Scene((target, extra))), "a red circle")
        assert verdict["color"] is True and verdict["shape"] is True, extra
        assert verdict["overall"] is False, extra
    grey = render(Scene((target,)))
    grey[40:52, 40:52] = 128  # an off-palette (grey) blob is an object too
    verdict = judge(grey, "a red circle")
    assert verdict["overall"] is False
    assert "unknown" in [d["color"] for d in verdict["detections"]]


def test_specks_are_not_objects():
    image = render(Scene((Obj("green", "square", 20, 20.0, 20.0),)))
    image[50:53, 50:53] = (230, 34, 34)  # 9 px of red noise
    image[5, 60] = (34, 34, 230)
    verdict = judge(image, "a green square")
    assert verdict["overall"] is True and len(verdict["detections"]) == 1


def test_swapped_relation_flips_spatial(truth):
    pairs = two_object_scenes(truth[0])[:30]
    for scene in pairs:
        image = render(scene)
        swapped = scene.prompt.replace(scene.relation, OPPOSITE[scene.relation])
        assert judge(image, scene.prompt)["spatial"] is True
        verdict = judge(image, swapped)
        assert verdict["spatial"] is False and verdict["overall"] is False
        assert verdict["color"] is True and verdict["shape"] is True


def test_swapped_objects_flip_spatial(truth):
    """'A left of B' drawn as 'B left of A': colours and shapes right, relation wrong."""
    scene = two_object_scenes(truth[0])[0]
    a, b = scene.objects
    moved = Scene((dataclasses.replace(a, cx=b.cx, cy=b.cy), dataclasses.replace(b, cx=a.cx, cy=a.cy)))
    verdict = judge(render(moved), scene.prompt)
    assert verdict["color"] and verdict["shape"] and verdict["spatial"] is False


def test_wrong_shape_and_size_words_fail():
    image = render(Scene((Obj("cyan", "triangle", 28, 30.0, 30.0),)))
    assert judge(image, "a large cyan triangle")["overall"] is True
    assert judge(image, "a cyan triangle")["size"] is None
    assert judge(image, "a small cyan triangle")["size"] is False
    verdict = judge(image, "a cyan square")
    assert verdict["color"] is True and verdict["shape"] is False
    assert judge(image, "a magenta triangle")["color"] is False


def test_slightly_off_colours_and_noise_still_pass(truth):
    rng = np.random.default_rng(0)
    images = truth[1][:60].astype(np.int16)
    shifted = images + rng.integers(-12, 13, size=(60, 1, 1, 3))  # off colours, per image
    noisy = shifted + rng.integers(-6, 7, size=images.shape)  # per-pixel noise
    result = score(np.clip(noisy, 0, 255).astype(np.uint8), truth[2][:60])
    assert result["overall"] >= 95.0, result


def test_judge_rejects_bad_input():
    with pytest.raises(ValueError):
        judge(np.zeros((32, 32, 3), dtype=np.uint8), "a red circle")
    with pytest.raises(ValueError):
        judge(blank(), "a purple circle")


# --- image quality -----------------------------------------------------------------------


def test_frechet_distance_self_zero_and_symmetric(truth, reference_stats):
    own = feature_stats(truth[1][:N_FD])
    assert frechet_distance_stats(*own, *own) < 1e-3
    ab, ba = frechet_distance_stats(*own, *reference_stats), frechet_distance_stats(*reference_stats, *own)
    assert ab > 1e-3
    assert abs(ab - ba) <= 1e-3 * ab
    small = truth[1][:8]  # N < D: singular covariances must still give a finite, ~0 self-distance
    assert frechet_distance(small, small) < 1e-3


def test_frechet_distance_matches_sqrtm_formula(truth, reference_stats):
    """The eigenvalue form equals the classic |dmu|^2 + tr(s1 + s2 - 2 Re sqrtm(s1 s2))."""
    (mu1, s1), (mu2, s2) = feature_stats(truth[1][:N_FD]), reference_stats
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    classic = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean))
    assert frechet_distance_stats(mu1, s1, mu2, s2) == pytest.approx(classic, rel=1e-4)


def test_features_are_deterministic(truth):
    a, b = features(truth[1][:16]), features(truth[1][:16].copy())
    assert a.shape == (16, 256)
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all() and (a.std(axis=0) > 0).mean() > 0.9  # no dead feature space


def test_blur_is_penalised(truth, reference_stats, floor):
    images, prompts = truth[1][:N_FD], truth[2][:N_FD]
    blurred = blur(images)
    assert fd_to(blurred, reference_stats) > 8 * floor  # measured: ~15x at N = 100
    assert vividness(blurred) < vividness(images) - 0.1
    assert background_cleanliness(blurred) < background_cleanliness(images)
    assert score(blurred, prompts)["overall"] < score(images, prompts)["overall"] - 10


def test_washed_out_is_penalised(truth, reference_stats, floor):
    images, prompts = truth[1][:N_FD], truth[2][:N_FD]
    washed = desaturate(images)
    assert fd_to(washed, reference_stats) > 5 * floor  # measured: ~10x at N = 100
    assert vividness(images) > 0.8
    assert vividness(washed) < vividness(images) - 0.2
    # blended toward mid-grey, the background is no longer clean and reads as an object
    grey = np.rint(0.5 * images + 64).astype(np.uint8)
    assert fd_to(grey, reference_stats) > 30 * floor  # measured: ~45x
    assert background_cleanliness(grey) < 0.5
    assert score(grey, prompts)["overall"] < 30.0


def test_background_cleanliness(truth):
    images = truth[1][:20]
    assert background_cleanliness(images) == 1.0
    for level in (225, 200):  # off-white below and above the object threshold (grey: no object)
        dirty = images.copy()
        dirty[:, :, :8] = level  # a stripe of the canvas, 1/8 of it
        assert 0.75 < background_cleanliness(dirty) < 0.95, level


# --- evaluate ------------------------------------------------------------------------------


def test_evaluate_schema_and_ground_truth(truth):
    images, prompts = truth[1][:32], truth[2][:32]
    result = evaluate(images, prompts)
    assert set(result) == {"alignment", "fid", "vividness", "background", "n"}
    assert set(result["alignment"]) == {"color", "shape", "size", "spatial", "overall"}
    assert result["n"] == 32 and result["alignment"]["overall"] >= 98.0
    assert result["vividness"] > 0.8 and result["background"] == 1.0
    assert np.isfinite(result["fid"]) and result["fid"] > 0.0
    assert evaluate(images[:8], prompts[:8], reference=images[:8])["fid"] < 1e-3
    with pytest.raises(ValueError):
        evaluate(images, prompts[:-1])
