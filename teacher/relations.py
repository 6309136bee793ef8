"""Does a teacher use the relation word? A probe for the spatial category of `flash eval`.

    python -m teacher.relations FAMILY_OR_RUN [--seeds 32] [--guidance-scale 5]

(a teacher run folder: the EMA weights of its latest checkpoint, while it trains)

Two readings, both for opposite relation pairs (left / right, above / below) of one prompt:
1. the text encoder: how far apart its outputs are at the relation token and at the pooled
   (end-of-text) token, next to the distance a colour swap makes;
2. the images: the mean offset of the first object's centre from the second's, along the
   relation's axis, over the same seeds for both words. A teacher that follows the word moves
   the objects apart in opposite directions (dx(left) < 0 < dx(right)); one that ignores it
   draws the same layouts for both (equal offsets, spatial near 50%: the judge's lenient check
   passes a random order half the time).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from flash.eval.judge import judge

PAIRS = (  # (prompt template, opposite words, the axis they move along)
    ("a red circle {} a blue square", ("to the left of", "to the right of"), "cx"),
    ("a red circle {} a blue square", ("above", "below"), "cy"),
)


@torch.no_grad()
def text_separation(pipe, template: str, words: tuple[str, str]) -> dict[str, float]:
    """Output distances between the two words' prompts at the first token where they differ and
    at the pooled token; for scale, the pooled distance that swapping the two colours makes."""
    c = pipe.c
    swapped = template.format(words[0]).replace("red", "@").replace("blue", "red").replace("@", "blue")
    prompts = [template.format(words[0]), template.format(words[1]), swapped]
    tok = c.tokenizer(prompts, padding="max_length", max_length=c.tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids  # fmt: skip
    out = c.text_encoder(tok.to(pipe.device))
    hidden, pooled = out[0], out[1]
    at = int((tok[0] != tok[1]).nonzero()[0])  # first token where the two words differ
    return {
        "relation token": float((hidden[0, at] - hidden[1, at]).norm()),
        "pooled": float((pooled[0] - pooled[1]).norm()),
        "colour swap, pooled": float((pooled[0] - pooled[2]).norm()),
        "token norm": float(hidden[0].norm(dim=-1).mean()),
    }


def placement(pipe, prompt: str, axis: str, seeds: list[int], guidance: float) -> tuple[float, float, int]:
    """(spatial pass rate %, mean first-minus-second centre offset along `axis` in px, images
    with both objects found) for `prompt` over `seeds`."""
    images = pipe.decode(pipe.teacher_latents([prompt] * len(seeds), seeds, steps=25, guidance_scale=guidance))
    passed, offsets = 0, []
    for image in images:
        v = judge(np.asarray(image), prompt)
        passed += bool(v["spatial"])
        if None not in v["matched"]:
            a, b = (v["detections"][i] for i in v["matched"])
            offsets.append(a[axis] - b[axis])
    return 100.0 * passed / len(seeds), float(np.mean(offsets)) if offsets else float("nan"), len(offsets)


def main(argv: list[str] | None = None) -> None:
    from flash.models import load_components, read_family_card
    from flash.pipeline import TextToImage

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher", type=Path, help="a family folder, or a teacher run folder (its latest checkpoint)")
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--guidance-scale", type=float, default=None)
    a = ap.parse_args(argv)
    if (a.teacher / "ckpt-unet").is_dir():
        from teacher.config import TeacherConfig
        from teacher.curve import checkpoint_components

        step, state = checkpoint_components(a.teacher)
        print(f"{a.teacher}: checkpoint at step {step}, EMA weights")
        components = state.components(ema=True)
        card_guidance = TeacherConfig.load(a.teacher / "config.json").guidance_scale
    else:
        components, card_guidance = load_components(a.teacher), read_family_card(a.teacher).guidance_scale
    guidance = card_guidance if a.guidance_scale is None else a.guidance_scale
    pipe = TextToImage(components, components.unet.device)  # a run's checkpoint loads on its device
    seeds = list(range(100, 100 + a.seeds))
    for template, words, axis in PAIRS:
        sep = text_separation(pipe, template, words)
        print(f"{' / '.join(words)}: text encoder " + ", ".join(f"{k} {v:.2f}" for k, v in sep.items()))
        for w in words:
            prompt = template.format(w)
            rate, offset, n = placement(pipe, prompt, axis, seeds, guidance)
            print(f"  {prompt:45s} spatial {rate:5.1f}%  mean {axis} offset {offset:+6.1f} px  (n={n})")


if __name__ == "__main__":
    main()
