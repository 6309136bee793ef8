"""Retrain: distil new students, evaluate, gate against the current version, export, publish.

    deploy/retrain.sh --config configs/shapes64-3step.json      # teacher: the store's current version
    deploy/retrain.sh --teacher models/shapes64 --version v1     # no --config: publish a family as it is
    deploy/retrain.sh --student runs/ddp-3step/student           # a student distilled elsewhere (multi-node)

1. stage     copy the teacher family (its students too, minus onnx/ and tensorrt/) into
             store/<family>/.staging-<version>/
2. distil    one student per --config, in order (distill.trainer.distill, teacher = the staged
             folder), published into the staged family; a `student_init` inside the config's
             teacher (the 2- and 1-step configs start from its 3-step student) is read from the
             staged family, so list the 3-step config first; --student folders are added as they are.
             Where the family ships a fast decoder (vae_tiny/, which the service serves by default)
             and its students changed, the decoder is re-fitted on the new students' latents
             (distill.decoder.refit_config; --decoder-config, or --no-refit-decoder to keep it as is)
3. evaluate  the project's evaluator (flash.eval.run, the rows of `flash eval`) on --n prompts, and
             where the family ships the fast decoder, every student's row again with it
4. gate      the same rows of the current version (its recorded figures when they were made with
             the same n, else evaluated again) against the candidate's: any gated figure worse by
             more than its margin (deploy/gate.json, --margin) refuses the version (exit 3)
5. export    optional: `flash export onnx` (and `tensorrt`) into the version's onnx/ (tensorrt/),
             where the onnxruntime / tensorrt backends look by default
6. publish   the figures go into the version's flash.json, the folder is renamed into the store

Nothing is published unless every step succeeds; then `deploy/redeploy.sh VERSION` serves it.
Exit status: 0 published, 3 refused by the quality gate, 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from deploy import store as st

if TYPE_CHECKING:
    from flash.eval.run import Row

GATE_FILE = Path(__file__).with_name("gate.json")
EXPORTS = ("none", "onnx", "tensorrt")
EXIT_FAILED, EXIT_REFUSED = 1, 3


class RetrainError(Exception):
    """A step that failed; nothing was published."""


class GateRefused(RetrainError):
    """The candidate's figures fell below the current version's by more than the margin."""


@dataclass
class RetrainConfig:
    store: Path
    family: str
    teacher: Path | None = None  # None: the store's current version
    configs: list[Path] = field(default_factory=list)  # distill configs (JSON DistillConfig)
    students: list[Path] = field(default_factory=list)  # finished student folders to add
    version: str | None = None  # None: a UTC timestamp
    n: int = 200  # evaluation prompts
    batch: int = 50
    rows: list[str] = field(default_factory=list)  # keep rows whose name contains one of these
    margin: st.Margin = 0.0
    export: str = "none"
    work: Path | None = None  # distillation runs; default runs/retrain/<family>-<version>
    keep_staging: bool = False
    refit_decoder: bool = True  # re-fit the family's fast decoder (if any) when its students change
    decoder_config: Path | None = None  # the re-fit's DecoderConfig JSON; None: distill.decoder.REFIT

    def __post_init__(self) -> None:
        if self.export not in EXPORTS:
            raise ValueError(f"unknown export {self.export!r}; allowed: {', '.join(EXPORTS)}")
        if self.n < 1 or self.batch < 1:
            raise ValueError(f"n and batch must be >= 1, got n={self.n}, batch={self.batch}")
        for path in [*self.configs, *self.students, *([self.decoder_config] if self.decoder_config else [])]:
            if not Path(path).exists():
                raise ValueError(f"{path} does not exist")
        self.version = st.check_version_name(self.version or time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
        self.work = Path(self.work or Path("runs") / "retrain" / f"{self.family}-{self.version}")


def say(step: int, total: int, message: str) -> None:
    print(f"[{step}/{total}] {message}", flush=True)


def stage(teacher: Path, dest: Path) -> None:
    """Copy a family (teacher + students) without its exported graphs and engines."""
    shutil.rmtree(dest, ignore_errors=True)
    top = Path(teacher).resolve()
    shutil.copytree(
        top, dest, ignore=lambda d, names: [n for n in names if Path(d) == top and n in ("onnx", "tensorrt")]
    )


def distill_into(config: Path, family_dir: Path, work: Path) -> Path:
    """Distil one student from the staged teacher and put it under family_dir/students/."""
    from distill.config import DistillConfig
    from distill.trainer import distill
    from flash.models import publish_student

    cfg = DistillConfig.load(config, teacher=str(family_dir), out=str(work / Path(config).stem))
    original = DistillConfig.load(config)
    init = Path(cfg.student_init)
    if cfg.student_init and init.is_relative_to(original.teacher):
        # e.g. models/shapes64/students/3-step: the student just made for this version (list it first)
        cfg.student_init = str(family_dir / init.relative_to(original.teacher))
    return publish_student(distill(cfg), family_dir)


def name_student(folder: Path, version: str) -> Path:
    """A student made for this version carries its name (before any export hashes the folder)."""
    from flash.models import read_student_card, write_card

    write_card(folder, read_student_card(folder).model_copy(update={"version": version}))
    return folder


def add_student(folder: Path, family_dir: Path) -> Path:
    """A student distilled elsewhere (e.g. multi-node); refused if its card names another teacher."""
    from flash.models import folder_sha256, publish_student, read_student_card

    want = read_student_card(folder).teacher_sha256
    have = folder_sha256(family_dir / "unet")
    if want and want != have:
        raise RetrainError(
            f"{folder} was distilled from another teacher (teacher_sha256 {want[:12]}..., "
            f"this teacher's U-Net is {have[:12]}...)"
        )
    return publish_student(folder, family_dir)


def refit_decoder(family_dir: Path, work: Path, config: Path | None) -> dict:
    """Re-fit the staged family's fast decoder on its (new) students' latents, in place; returns
    the run's report (held-out PSNR against the full decoder)."""
    from distill.decoder import refit_config, train_tiny_vae
    from flash.models import TINY_VAE, publish_tiny_vae

    folder = train_tiny_vae(refit_config(family_dir, family_dir / TINY_VAE, work / "decoder", config))
    report = json.loads((folder / "train.json").read_text())
    publish_tiny_vae(folder, family_dir)
    return report


FAST_DECODER = ", fast decoder"  # suffix of the rows evaluated with the family's vae_tiny/


def gated_rows(family_dir: Path, keys: list[str]) -> list[tuple[Row, str]]:
    """(row, decoder) pairs a family is judged on: the evaluator's rows (`flash eval`) with the
    full decoder, and where the family ships a fast decoder (vae_tiny/, which the service serves
    by default) every student's row again with it, named "<row>, fast decoder"; `keys` keeps
    the rows whose name contains one of them."""
    from flash.eval.run import default_rows
    from flash.models import TINY_VAE

    rows = [(r, "full") for r in default_rows(family_dir)]
    if (Path(family_dir) / TINY_VAE).is_dir():
        rows += [(replace(r, name=r.name + FAST_DECODER), "tiny") for r, _ in rows if r.kind == "student"]
    return [(r, d) for r, d in rows if not keys or any(k in r.name for k in keys)]


def evaluate(family_dir: Path, n: int, batch: int, keys: list[str]) -> dict:
    """The evaluator's figures for a family's gated rows: {"n": n, "rows": {row name: metrics}}."""
    from flash.eval.run import evaluate_rows

    rows = gated_rows(family_dir, keys)
    if not rows:
        raise RetrainError(f"no evaluation rows of {family_dir} match {keys}")
    results = []
    for decoder in ("full", "tiny"):
        chosen = [r for r, d in rows if d == decoder]
        if chosen:
            results += evaluate_rows(family_dir, chosen, n=n, batch=batch, decoder=decoder)
    data = [{"row": {"name": r.row.name}, "metrics": r.metrics} for r in results]
    return st.figures_from_results(json.loads(json.dumps(data, default=float)))


def current_figures(cfg: RetrainConfig) -> tuple[str | None, dict | None]:
    """The current version's figures for the rows the candidate is judged on: recorded ones when
    they were made with the same n, else evaluated again."""
    version = st.current(cfg.store, cfg.family)
    if version is None:
        return None, None
    folder = st.version_dir(cfg.store, cfg.family, version)
    recorded = st.read_card(folder).get("eval") or {}
    rows = recorded.get("rows") or {}
    current_rows = [r.name for r, _ in gated_rows(folder, cfg.rows)]
    if recorded.get("n") == cfg.n and all(r in rows for r in current_rows):
        print(f"      current version {version}: recorded figures (n={cfg.n})", flush=True)
        return version, {"n": cfg.n, "rows": {r: rows[r] for r in current_rows}}
    print(
        f"      current version {version}: evaluating again with n={cfg.n} (recorded n={recorded.get('n')})",
        flush=True,
    )
    return version, evaluate(folder, cfg.n, cfg.batch, cfg.rows)


def print_checks(candidate: dict, current: dict, margin: st.Margin) -> None:
    checks = st.compare(candidate, current, margin)
    width = max([len(c.row) for c in checks] + [4])
    for c in checks:
        value = "missing" if c.candidate is None else f"{c.candidate:10.4g}"
        mark = "ok" if c.ok else "WORSE"
        print(
            f"      {c.row:<{width}}  {c.figure:<18} {c.current:10.4g} -> {value:>10}  "
            f"(allowed drop {c.allowed:.4g})  {mark}",
            flush=True,
        )


def export(family_dir: Path, kind: str) -> None:
    """The project's export commands, into the folder the serving backends read by default."""
    cmd = [sys.executable, "-m", "flash.cli", "export"]
    steps = [[*cmd, "onnx", str(family_dir), "--out", str(family_dir / "onnx")]]
    if kind == "tensorrt":
        steps.append([*cmd, "tensorrt", str(family_dir / "onnx"), "--out", str(family_dir / "tensorrt")])
    for step in steps:
        r = subprocess.run(step, check=False)
        if r.returncode != 0:
            raise RetrainError(f"export failed (exit {r.returncode}): {' '.join(step)}")


def retrain(cfg: RetrainConfig) -> Path:
    """Run the steps; returns the published version folder. Raises GateRefused or RetrainError."""
    from flash.models import TINY_VAE

    root = st.family_root(cfg.store, cfg.family)
    if (root / cfg.version).exists():
        raise RetrainError(f"version {cfg.version} already exists in {root}; pick another --version")
    teacher = cfg.teacher
    if teacher is None:
        cur = st.current(cfg.store, cfg.family)
        if cur is None:
            raise RetrainError(f"{root} has no current version: pass --teacher FAMILY_DIR for the first one")
        teacher = st.version_dir(cfg.store, cfg.family, cur)
    total = 6
    staging = root / f".staging-{cfg.version}"
    root.mkdir(parents=True, exist_ok=True)
    try:
        say(1, total, f"staging {teacher} as {cfg.family}/{cfg.version}")
        stage(Path(teacher), staging)

        if cfg.configs or cfg.students:
            say(2, total, f"distilling {len(cfg.configs)} student(s), adding {len(cfg.students)}")
        else:
            say(2, total, "no --config or --student: the family's students as they are")
        for config in cfg.configs:
            folder = name_student(distill_into(config, staging, cfg.work), cfg.version)
            print(f"      distilled {config} -> {short(folder)}", flush=True)
        for student in cfg.students:
            folder = name_student(add_student(Path(student), staging), cfg.version)
            print(f"      added {student} -> {short(folder)}", flush=True)
        if (staging / TINY_VAE).is_dir() and (cfg.configs or cfg.students):
            if cfg.refit_decoder:
                print("      re-fitting the fast decoder (vae_tiny/) on the new students' latents", flush=True)
                report = refit_decoder(staging, cfg.work, cfg.decoder_config)
                print(f"      fast decoder: {report['steps']} steps, held-out PSNR against the full decoder "
                      f"{report['psnr_vs_full_decoder_db']} dB", flush=True)  # fmt: skip
            else:
                print("      fast decoder kept as it is (--no-refit-decoder)", flush=True)

        say(3, total, f"evaluating the candidate (n={cfg.n})")
        candidate = evaluate(staging, cfg.n, cfg.batch, cfg.rows)

        say(4, total, "quality gate")
        current_version, current = current_figures(cfg)
        ok, reasons = st.gate(candidate, current, cfg.margin)
        if current:
            print_checks(candidate, current, cfg.margin)
        if not ok:
            raise GateRefused(
                f"version {cfg.version} is worse than the current version {current_version}: "
                + "; ".join(reasons)
            )
        print(
            f"      passed: {'; '.join(reasons) or f'no figure worse than {current_version} beyond its margin'}",
            flush=True,
        )

        say(5, total, "export: " + ("skipped (--export none)" if cfg.export == "none" else cfg.export))
        if cfg.export != "none":
            export(staging, cfg.export)

        say(6, total, f"publishing {cfg.family}/{cfg.version}")
        card = st.read_card(staging)
        st.write_json(staging / st.CARD, {**card, "eval": candidate})
        dest = st.publish(cfg.store, cfg.family, staging, cfg.version, move=True)
    except BaseException:
        if not cfg.keep_staging:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def short(folder: Path) -> str:
    return f"{folder.parent.name}/{folder.name}"


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    p = argparse.ArgumentParser(
        prog="deploy/retrain.sh",
        description="Distil new students, evaluate them, refuse them if worse than the current version, "
        "optionally export, and publish a new version to the model store.",
        epilog="examples:\n  deploy/retrain.sh --teacher models/shapes64 --version v1 --n 200\n"
        "  deploy/retrain.sh --config configs/shapes64-3step.json --config configs/shapes64-1step.json\n"
        "  deploy/retrain.sh --student runs/ddp-3step/student --export onnx\n"
        "exit status: 0 published, 3 refused by the quality gate, 1 any other failure",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--store", default=env.get("FLASH_STORE", "store"), help="store folder (FLASH_STORE)")
    p.add_argument("--family", default=env.get("FLASH_FAMILY", "shapes64"), help="family (FLASH_FAMILY)")
    p.add_argument(
        "--teacher", default=None, help="family folder to start from (default: the current version)"
    )
    p.add_argument("--config", action="append", default=[], help="distill config JSON (repeatable)")
    p.add_argument(
        "--student", action="append", default=[], help="finished student folder to add (repeatable)"
    )
    p.add_argument("--version", default=None, help="version name (default: UTC timestamp)")
    p.add_argument("--n", type=int, default=200, help="evaluation prompts (default %(default)s)")
    p.add_argument("--batch", type=int, default=50, help="evaluation batch (default %(default)s)")
    p.add_argument(
        "--rows", nargs="*", default=[], help="evaluate only rows whose name contains one of these"
    )
    p.add_argument(
        "--gate", default=str(GATE_FILE), help="gate file with per-figure margins (default %(default)s)"
    )
    p.add_argument(
        "--margin", default=None, help="one margin for every figure: a number or 'P%%' (overrides --gate)"
    )
    p.add_argument(
        "--export", default="none", choices=EXPORTS, help="export after the gate (default %(default)s)"
    )
    p.add_argument(
        "--work", default=None, help="distillation run folder (default runs/retrain/FAMILY-VERSION)"
    )
    p.add_argument("--keep-staging", action="store_true", help="keep the staged folder when a step fails")
    p.add_argument(
        "--decoder-config", default=None,
        help="DecoderConfig JSON for re-fitting the fast decoder (default: distill.decoder.REFIT)",
    )  # fmt: skip
    p.add_argument(
        "--no-refit-decoder", action="store_true",
        help="keep the family's fast decoder as it is when its students change",
    )  # fmt: skip
    a = p.parse_args(argv)
    try:
        margin = st.load_margin(a.gate) if a.margin is None else _parse_margin(a.margin)
        cfg = RetrainConfig(
            store=Path(a.store), family=a.family, teacher=Path(a.teacher) if a.teacher else None,
            configs=[Path(c) for c in a.config], students=[Path(s) for s in a.student], version=a.version,
            n=a.n, batch=a.batch, rows=a.rows, margin=margin, export=a.export,
            work=Path(a.work) if a.work else None, keep_staging=a.keep_staging,
            refit_decoder=not a.no_refit_decoder, decoder_config=Path(a.decoder_config) if a.decoder_config else None,
        )  # fmt: skip
        dest = retrain(cfg)
    except GateRefused as e:
        print(f"retrain: REFUSED by the quality gate, nothing published: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except (RetrainError, st.StoreError, ValueError, OSError, RuntimeError) as e:
        print(f"retrain: error, nothing published: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"published {dest}\nnext: deploy/redeploy.sh {cfg.version}   (or: python -m deploy.store set-current {cfg.version})"
    )
    return 0


def _parse_margin(text: str) -> st.Margin:
    margin: st.Margin = text if text.endswith("%") else float(text)
    st.allowed_drop(margin, "every figure", 1.0)
    return margin


if __name__ == "__main__":
    sys.exit(main())
