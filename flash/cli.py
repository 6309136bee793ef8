"""`flash`: the command line. Thin: parse, call an importable function, map errors to one line.

Heavy imports happen inside the handlers so `flash --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

DEFAULT_MODEL = "models/shapes64"

EPILOG = """examples:
  flash generate "a red circle above a blue square" --model teacher --steps 25 --seed 0 --out out.png
  flash generate "a small green triangle" --model flash --steps 1 --out fast.png
  flash serve --model models/shapes64 --port 8000
  flash train-teacher --out runs/teacher --export models/shapes64
  flash distill --config configs/shapes64-3step.json
  flash distill-decoder models/shapes64 --minutes 25
  flash eval models/shapes64 --n 500 --json results.json
  flash export onnx models/shapes64 --out onnx/shapes64
"""


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def _cmd_generate(a: argparse.Namespace) -> None:
    import numpy as np

    from flash.images import save_png
    from flash.models import load_components, load_student, read_family_card
    from flash.pipeline import TextToImage

    family = Path(a.model_dir)
    c = load_components(family, decoder=a.decoder)
    pipe = TextToImage(c)
    seeds = [a.seed + i for i in range(a.n)]
    prompts = [a.prompt] * a.n
    if a.model == "teacher":
        guidance = read_family_card(family).guidance_scale if a.guidance_scale is None else a.guidance_scale
        lat = pipe.teacher_latents(prompts, seeds, a.steps or 25, guidance, a.scheduler)
    else:
        steps = a.steps or 3
        folder = family / "students" / f"{steps}-step"
        if not folder.is_dir():
            raise CliError(f"no {steps}-step student in {family / 'students'}; train one with `flash distill`")
        s = load_student(folder)
        nc = s.card.noise_correction and not a.no_noise_correction
        lat = pipe.student_latents(s.unet, prompts, seeds, s.card.timesteps, nc, s.card.prediction_type)
    images = pipe.decode(lat)
    out = Path(a.out)
    if a.n == 1:
        save_png(images[0], out, scale=a.scale)
    else:
        save_png(np.concatenate(list(images), axis=1), out, scale=a.scale)
    print(f"wrote {out} ({a.model}, seeds {seeds[0]}..{seeds[-1]})")


def _cmd_train_teacher(a: argparse.Namespace) -> None:
    from teacher.config import TeacherConfig
    from teacher.train import train_teacher

    cfg = TeacherConfig.load(a.config, out=a.out, unet_steps=a.unet_steps, unet_minutes=a.minutes)
    train_teacher(cfg, export_to=Path(a.export) if a.export else None)


def _cmd_distill(a: argparse.Namespace) -> None:
    from distill.config import DistillConfig
    from distill.trainer import distill

    cfg = DistillConfig.load(a.config, teacher=a.teacher, out=a.out, max_steps=a.max_steps, max_minutes=a.minutes)
    folder = distill(cfg)
    if a.publish:
        from flash.models import publish_student

        print(f"published {publish_student(folder, Path(a.publish))}")
    print(f"student written to {folder}")


def _cmd_soup(a: argparse.Namespace) -> None:
    from distill.soup import soup

    folder = soup([Path(d) for d in a.students], Path(a.out), a.weights)
    if a.publish:
        from flash.models import publish_student

        print(f"published {publish_student(folder, Path(a.publish))}")
    print(f"student written to {folder} (the average of {len(a.students)})")


def _cmd_distill_decoder(a: argparse.Namespace) -> None:
    from distill.decoder import DecoderConfig, train_tiny_vae
    from flash.models import publish_tiny_vae

    family = Path(a.model_dir)
    cfg = DecoderConfig.load(a.config, family=str(family), out=a.out, steps=a.steps, minutes=a.minutes)
    folder = train_tiny_vae(cfg)
    if a.publish:
        print(f"published {publish_tiny_vae(folder, family)}")
    print(f"fast decoder written to {folder}")


def _cmd_eval(a: argparse.Namespace) -> None:
    from flash.eval.run import default_rows, evaluate_rows, extra_student_rows, results_table
    from flash.models import read_family_card

    family = Path(a.model_dir)
    if a.update_card and a.rows:
        raise CliError("--update-card writes every shipped row: leave out --rows")
    if (a.split != "test" or a.skip) and (a.update_card or a.report):
        raise CliError("the card and the report carry the test split's first prompts: leave out --split and --skip")
    if a.decoder != "full" and (a.update_card or a.report):
        raise CliError("the card and the report carry the full decoder's figures: leave out --decoder")
    card = read_family_card(family)
    guidance = card.guidance_scale if a.guidance_scale is None else a.guidance_scale
    if guidance != card.guidance_scale and (a.update_card or a.report):
        raise CliError(f"the card and the report carry the family's own guidance scale ({card.guidance_scale:g}): "
                       "leave out --guidance-scale")  # fmt: skip
    rows = default_rows(family, guidance, noise_correction_off=a.noise_correction_off)
    if a.rows:
        rows = [r for r in rows if any(key in r.name for key in a.rows)]
    rows += extra_student_rows(a.student or [])
    if not rows:
        raise CliError("no rows to evaluate")
    results = evaluate_rows(family, rows, n=a.n, batch=a.batch, split=a.split, decoder=a.decoder, skip=a.skip)
    if any(r.kind == "teacher" for r in rows):
        print(f"teacher rows: classifier-free guidance {guidance:g}")
    print(results_table(results))
    if a.json:
        data = [{"row": r.row.__dict__, "metrics": r.metrics, "seconds_per_image": r.seconds_per_image} for r in results]
        Path(a.json).write_text(json.dumps(data, indent=1))
        print(f"wrote {a.json}")
    command = "flash eval " + shlex.join(sys.argv[2:]) if len(sys.argv) > 2 else "flash eval"
    if a.update_card:
        from flash.eval.run import card_figures
        from flash.models import CARD, write_card

        write_card(family, card.model_copy(update={"eval": card_figures(results, command)}))
        print(f"wrote the figures into {family / CARD}")
    if a.report:
        from flash.eval.report import write_report

        runs = dict(item.split("=", 1) for item in a.runs or [])
        print(f"wrote {write_report(results, Path(a.report), {k: Path(v) for k, v in runs.items()}, command)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flash",
        description="Imagine Flash: few-step text-to-image by backward distillation (train, distill, eval, export, serve).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, examples: str):
        return sub.add_parser(
            name, help=help, description=help, epilog="examples:\n  " + examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    g = add("generate", "generate images with the teacher or a few-step student",
            'flash generate "a red circle above a blue square" --model teacher --steps 25 --seed 0 --out out.png\n'
            '  flash generate "a blue square" --model flash --steps 2 --n 4 --out grid.png')
    g.add_argument("prompt")
    g.add_argument("--model", choices=["teacher", "flash"], default="flash", help="teacher (CFG) or student")
    g.add_argument("--model-dir", default=DEFAULT_MODEL, help="family folder (default: %(default)s)")
    g.add_argument("--steps", type=int, default=None, help="teacher: solver steps (25); flash: 1, 2 or 3 (3)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--n", type=int, default=1, help="images (seeds seed..seed+n-1), saved side by side")
    g.add_argument("--guidance-scale", type=float, default=None, help="teacher only (default: the family card's)")
    g.add_argument("--scheduler", default="dpmsolver++", choices=["dpmsolver++", "ddim", "euler"], help="teacher only")
    g.add_argument("--no-noise-correction", action="store_true", help="students: switch noise correction off")
    g.add_argument("--decoder", choices=["full", "tiny"], default="full",
                   help="full: the family's VAE; tiny: its fast decoder (vae_tiny/, `flash distill-decoder`)")
    g.add_argument("--scale", type=int, default=1, help="nearest-neighbour upscale of the PNG")
    g.add_argument("--out", default="out.png")
    g.set_defaults(func=_cmd_generate)

    t = add("train-teacher", "train the default shapes-64 teacher (VAE, then text encoder + U-Net); the U-Net stage runs on a GPU when one is present (TeacherConfig.device)",
            "flash train-teacher --out runs/teacher --export models/shapes64  # 88 min on 2 CPU cores")
    t.add_argument("--config", default=None, help="JSON TeacherConfig (optional)")
    t.add_argument("--out", default=None, help="run folder (checkpoints, samples); resumes if present")
    t.add_argument("--unet-steps", type=int, default=None)
    t.add_argument("--minutes", type=float, default=None, help="wall-clock budget for the U-Net stage")
    t.add_argument("--export", default=None, help="write the diffusers folder here when done")
    t.set_defaults(func=_cmd_train_teacher)

    d = add("distill", "distil a 1-, 2- or 3-step Imagine Flash student from a teacher",
            "flash distill --config configs/shapes64-3step.json --publish models/shapes64\n"
            "  accelerate launch --multi_gpu --num_processes 8 -m flash.cli distill --config my.json")
    d.add_argument("--config", default=None, help="JSON DistillConfig")
    d.add_argument("--teacher", default=None, help="teacher diffusers folder")
    d.add_argument("--out", default=None, help="run folder (checkpoints, samples, student); resumes if present")
    d.add_argument("--max-steps", type=int, default=None)
    d.add_argument("--minutes", type=float, default=None)
    d.add_argument("--publish", default=None, help="copy the finished student into this family's students/")
    d.set_defaults(func=_cmd_distill)

    w = add("soup", "average students fine-tuned from one start into one (model soup; not in the paper)",
            "flash soup runs/a/student runs/b/student runs/c/student --out runs/soup-abc\n"
            "  flash eval models/shapes64 --split validation --rows none --student soup=runs/soup-abc")
    w.add_argument("students", nargs="+", help="student folders (same steps, timesteps, parameterisation, teacher)")
    w.add_argument("--out", required=True, help="the averaged student's folder")
    w.add_argument("--weights", type=float, nargs="+", default=None, help="one per student (default: uniform)")
    w.add_argument("--publish", default=None, help="copy the result into this family's students/")
    w.set_defaults(func=_cmd_soup)

    v = add("distill-decoder", "distil a fast AutoencoderTiny decoder from a family's VAE (written as vae_tiny/)",
            "flash distill-decoder models/shapes64 --minutes 25 --publish\n"
            "  flash generate \"a red circle\" --decoder tiny --out fast.png")
    v.add_argument("model_dir", nargs="?", default=DEFAULT_MODEL, help="family folder (default: %(default)s)")
    v.add_argument("--config", default=None, help="JSON DecoderConfig (optional)")
    v.add_argument("--out", default=None, help="run folder (pool, checkpoints); resumes if present")
    v.add_argument("--steps", type=int, default=None)
    v.add_argument("--minutes", type=float, default=None, help="also stop after this many minutes")
    v.add_argument("--publish", action="store_true", help="copy the result into the family as vae_tiny/")
    v.set_defaults(func=_cmd_distill_decoder)

    e = add("eval", "score teacher and students on the shapes-64 evaluation prompts (paper Table 1 in miniature)",
            "flash eval models/shapes64 --n 500 --json results.json\n"
            "  flash eval models/shapes64 --rows 3-step --student 'no SRL=runs/ablation-3step-no-srl/student'")
    e.add_argument("model_dir", nargs="?", default=DEFAULT_MODEL)
    e.add_argument("--n", type=int, default=500, help="evaluation prompts (default: %(default)s)")
    e.add_argument("--split", choices=["test", "validation"], default="test",
                   help="test: the fixed prompts of every reported figure; validation: other prompts and x_T, "
                   "for choosing checkpoints or settings without the test prompts (default: %(default)s)")
    e.add_argument("--skip", type=int, default=0,
                   help="score the split's prompts from this index on: prompts that chose nothing, after a "
                   "choice made on the first ones (default: %(default)s)")
    e.add_argument("--batch", type=int, default=50)
    e.add_argument("--guidance-scale", type=float, default=None,
                   help="the teacher rows' classifier-free guidance (default: the family card's)")
    e.add_argument("--decoder", choices=["full", "tiny"], default="full",
                   help="decode with the full VAE or the family's fast decoder (vae_tiny/)")
    e.add_argument("--rows", nargs="*", help="keep only rows whose name contains one of these")
    e.add_argument("--student", nargs="*", metavar="[NAME=]DIR",
                   help="extra student folders to evaluate (ablations; their own table in the report)")
    e.add_argument("--noise-correction-off", action="store_true",
                   help="also evaluate every student with noise correction switched off (Fig. 12)")
    e.add_argument("--json", default=None, help="write the figures here")
    e.add_argument("--update-card", action="store_true",
                   help="write the shipped rows' figures into the family's flash.json (its `eval`)")
    e.add_argument("--report", default=None, help="write the evaluation section, grid and plots into this markdown "
                   "file (e.g. docs/results.md), keeping the rest of it")
    e.add_argument("--runs", nargs="*", metavar="NAME=DIR", help="run folders whose loss.jsonl to plot in the report")
    e.set_defaults(func=_cmd_eval)

    # `flash serve ...` is dispatched to service.server.main before parsing (see main)
    sub.add_parser("serve", help="serve the family over HTTP (OpenAI-compatible images API, batching, metrics)")

    try:
        from export.cli import add_subparsers as add_export
    except ImportError:  # export extra not installed
        add_export = None
    if add_export is not None:
        x = add("export", "compile models for serving: ONNX (+ ONNX Runtime parity) and TensorRT engines",
                "flash export onnx models/shapes64 --out onnx/shapes64\n"
                "  flash export tensorrt onnx/shapes64 --out engines/shapes64")
        add_export(x)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # the service parses its own options (and --help)
        from service.server import main as serve_main

        serve_main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (CliError, ValueError, FileNotFoundError, RuntimeError) as e:  # FLASH_DEBUG=1 shows the traceback
        if os.environ.get("FLASH_DEBUG"):
            raise
        print(f"flash {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
