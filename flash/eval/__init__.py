"""The project's own evaluator for shapes-64: prompt alignment (pixel judge) and image quality."""

from flash.eval.evaluate import REFERENCE_SEED, evaluate, reference_images
from flash.eval.judge import CATEGORIES, Detection, detect, judge, score
from flash.eval.quality import (
    background_cleanliness,
    feature_stats,
    features,
    frechet_distance,
    frechet_distance_stats,
    vividness,
)

__all__ = [
    "CATEGORIES",
    "REFERENCE_SEED",
    "Detection",
    "background_cleanliness",
    "detect",
    "evaluate",
    "feature_stats",
    "features",
    "frechet_distance",
    "frechet_distance_stats",
    "judge",
    "reference_images",
    "score",
    "vividness",
]
