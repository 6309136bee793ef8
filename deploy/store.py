"""The model store: immutable versions of a family and atomic `current` / `previous` pointers.

    store/
      shapes64/
        20261126-0930/  20261127-1412/  ...   family folders: teacher + students/ + flash.json
        current  -> 20261127-1412             relative symlinks, swapped with os.replace
        previous -> 20261126-0930

Every version's flash.json (the family card) carries its evaluation figures under `eval`
({"n": N, "rows": {row name: evaluator metrics}}) and its own version name, which the
service reports on /health/ready and /v1/models. Replicas serve `store/<family>/current`
(FLASH_MODEL_DIR): the service keeps that path as given, so a reload re-reads through the
link and picks up whatever it points at then. The links are relative, so the store can be
mounted anywhere (a container's /store, a Kubernetes volume).

Standard library only: this runs in the service image and on any ops host.

    python -m deploy.store --store store --family shapes64 list
    python -m deploy.store --store store --family shapes64 publish models/shapes64 --version v1
    python -m deploy.store --store store --family shapes64 set-current v1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CARD = "flash.json"
POINTERS = ("current", "previous")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LOWER_IS_BETTER = frozenset({"fid"})  # every other figure: higher is better

Margin = float | str | Mapping[str, float | str]


class StoreError(Exception):
    """A store operation that cannot be done; the message says why and what to do."""


# -- layout ------------------------------------------------------------------------------------


def family_root(store: str | Path, family: str) -> Path:
    if not VERSION_PATTERN.match(family):
        raise StoreError(f"invalid family name {family!r}: letters, digits, '.', '_' and '-' only")
    return Path(store) / family


def check_version_name(version: str) -> str:
    if not VERSION_PATTERN.match(version) or version in POINTERS:
        raise StoreError(
            f"invalid version name {version!r}: 1-64 letters, digits, '.', '_' or '-', "
            f"not starting with '.' and not one of {', '.join(POINTERS)}"
        )
    return version


def read_card(folder: str | Path) -> dict:
    f = Path(folder) / CARD
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise StoreError(f"{folder} has no {CARD}: not a model family folder") from None
    except ValueError as e:
        raise StoreError(f"{f} is not valid JSON: {e}") from e


def write_json(path: Path, data: dict) -> None:
    """Write then rename, so a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def version_dir(store: str | Path, family: str, version: str) -> Path:
    """The folder of a published version; StoreError if there is none."""
    folder = family_root(store, family) / check_version_name(version)
    if not (folder / CARD).is_file():
        known = ", ".join(versions(store, family)) or "none"
        raise StoreError(f"no version {version!r} in {family_root(store, family)} (published: {known})")
    return folder


def versions(store: str | Path, family: str) -> list[str]:
    """Published versions, oldest first."""
    root = family_root(store, family)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_symlink() or not d.is_dir() or not VERSION_PATTERN.match(d.name) or d.name in POINTERS:
            continue
        if (d / CARD).is_file():
            found.append((read_card(d).get("published_at", ""), d.name))
    return [name for _, name in sorted(found)]


# -- publish -----------------------------------------------------------------------------------


def publish(
    store: str | Path, family: str, src: str | Path, version: str | None = None, *, move: bool = False
) -> Path:
    """Add a family folder to the store as `version` (default: a UTC timestamp).

    The folder must be a family (model_index.json + flash.json) whose card has evaluation
    figures. It is copied (or moved, `move=True`) under a hidden name, its card is stamped
    with the version, then renamed into place: a version appears whole or not at all.
    Versions are immutable: publishing an existing name is an error."""
    src = Path(src)
    card = read_card(src)
    if not (src / "model_index.json").is_file():
        raise StoreError(f"{src} is not a family folder: no model_index.json (the teacher)")
    if not (card.get("eval") or {}).get("rows"):
        raise StoreError(
            f"{src / CARD} has no evaluation figures (eval.rows): evaluate it first "
            "(deploy/retrain.sh does, `flash eval --json` gives the figures)"
        )
    version = check_version_name(version or time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    root = family_root(store, family)
    root.mkdir(parents=True, exist_ok=True)
    dest = root / version
    if dest.exists() or dest.is_symlink():
        raise StoreError(
            f"version {version} already exists in {root}; versions are immutable, pick another name"
        )
    tmp = root / f".publishing-{version}"
    shutil.rmtree(tmp, ignore_errors=True)
    if move:
        try:
            os.rename(src, tmp)
        except OSError:  # another file system: copy, then remove the source
            shutil.copytree(src, tmp)
            shutil.rmtree(src)
    else:
        shutil.copytree(src, tmp)
    stamp_version(tmp, version)
    os.rename(tmp, dest)
    _fsync_dir(root)
    return dest


def stamp_version(folder: Path, version: str) -> None:
    """Write the version name into the family card (the version the service reports).

    Student cards are left alone: an ONNX or TensorRT export records the hash of every student
    folder, card included, and would no longer match. deploy/retrain.sh gives the students it
    distils the version name before it exports; carried-over students keep theirs."""
    card = read_card(folder)
    card.update(version=version, published_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_json(folder / CARD, card)


# -- pointers ----------------------------------------------------------------------------------


def _pointer(store: str | Path, family: str, name: str) -> str | None:
    link = family_root(store, family) / name
    if not link.is_symlink():
        if link.exists():
            raise StoreError(f"{link} is not a symlink; move it away (the store manages it)")
        return None
    return Path(os.readlink(link)).name


def current(store: str | Path, family: str) -> str | None:
    """The version `current` points at (None before the first deploy)."""
    return _pointer(store, family, "current")


def previous(store: str | Path, family: str) -> str | None:
    """The version that was current before the current one (what --rollback returns to)."""
    return _pointer(store, family, "previous")


def _point(root: Path, name: str, version: str | None) -> None:
    """Atomically make `root/name` a relative link to `version` (or remove it for None)."""
    link = root / name
    if version is None:
        link.unlink(missing_ok=True)
        return
    tmp = root / f".{name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(version, tmp)
    try:
        os.replace(tmp, link)  # rename(2): readers see the old link or the new one, never none
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot replace {link}: {e}") from e
    _fsync_dir(root)


def set_current(store: str | Path, family: str, version: str) -> str | None:
    """Point `current` at a published version; the old one becomes `previous`. Returns the old one."""
    version_dir(store, family, version)
    root = family_root(store, family)
    old = current(store, family)
    if old is not None and old != version:
        _point(root, "previous", old)
    _point(root, "current", version)
    return old


def restore(
    store: str | Path, family: str, current_version: str | None, previous_version: str | None
) -> None:
    """Put both pointers back as they were (a failed deploy undoing its own set_current)."""
    root = family_root(store, family)
    _point(root, "previous", previous_version)
    _point(root, "current", current_version)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- figures and the quality gate --------------------------------------------------------------


def figures_from_results(results: list[dict]) -> dict:
    """`flash eval --json` output -> the card's `eval`: {"n": N, "rows": {row name: metrics}}."""
    rows = {r["row"]["name"]: r["metrics"] for r in results}
    ns = {m.get("n") for m in rows.values()}
    if len(ns) != 1:
        raise StoreError(f"evaluation rows disagree on n: {sorted(map(str, ns))}")
    return {"n": ns.pop(), "rows": rows}


def flatten(metrics: Mapping, prefix: str = "") -> dict[str, float]:
    """{"alignment": {"overall": 57.0}, "fid": 12.0, "n": 500} -> {"alignment.overall": 57.0, "fid": 12.0}."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool) and key != "n":
            out[name] = float(value)
    return out


def allowed_drop(margin: Margin, figure: str, reference: float) -> float | None:
    """How much `figure` may get worse: a number (the figure's own units) or "P%" of the
    current value. None: the figure is not gated (absent from a per-figure margin)."""
    m = margin.get(figure) if isinstance(margin, Mapping) else margin
    if m is None:
        return None
    if isinstance(m, str):
        if not m.endswith("%"):
            raise ValueError(f"margin {m!r} for {figure}: use a number or a percentage like '10%'")
        return abs(reference) * float(m[:-1]) / 100
    if isinstance(m, bool) or not isinstance(m, int | float) or m < 0:
        raise ValueError(f"margin {m!r} for {figure}: use a non-negative number or a percentage like '10%'")
    return float(m)


@dataclass(frozen=True)
class Check:
    row: str
    figure: str
    current: float
    candidate: float | None  # None: missing from the candidate
    allowed: float

    @property
    def worse_by(self) -> float:
        if self.candidate is None or math.isnan(self.candidate):
            return math.inf
        delta = self.candidate - self.current
        return delta if self.figure in LOWER_IS_BETTER else -delta

    @property
    def ok(self) -> bool:
        return self.worse_by <= self.allowed + 1e-9

    def describe(self) -> str:
        if self.candidate is None:
            return f"{self.row}: {self.figure} is missing from the candidate (current {self.current:.4g})"
        return (
            f"{self.row}: {self.figure} fell from {self.current:.4g} to {self.candidate:.4g} "
            f"(worse by {self.worse_by:.4g}, allowed {self.allowed:.4g})"
        )


def compare(candidate: Mapping, current: Mapping, margin: Margin) -> list[Check]:
    """One check per gated figure of every row the current figures and the candidate share."""
    checks = []
    cand_rows = candidate.get("rows") or {}
    for row, metrics in (current.get("rows") or {}).items():
        if row not in cand_rows:
            continue  # gate() reports the whole row
        cand = flatten(cand_rows[row])
        for figure, value in flatten(metrics).items():
            allowed = allowed_drop(margin, figure, value)
            if allowed is not None:
                checks.append(Check(row, figure, value, cand.get(figure), allowed))
    return checks


def gate(candidate: Mapping | None, current: Mapping | None, margin: Margin) -> tuple[bool, list[str]]:
    """The quality gate: (ok, reasons). Refuses a candidate any of whose gated figures is worse
    than the current version's by more than the margin, or that lacks a row the current has.
    Both sets of figures must come from the same evaluation size (`n`)."""
    if not current or not current.get("rows"):
        return True, ["no current figures: nothing to compare against"]
    if not candidate or not candidate.get("rows"):
        return False, ["the candidate has no evaluation figures"]
    if candidate.get("n") != current.get("n"):
        return False, [
            f"figures from different evaluation sizes (candidate n={candidate.get('n')}, "
            f"current n={current.get('n')}): evaluate both with the same --n"
        ]
    missing = [
        f"{row}: missing from the candidate" for row in current["rows"] if row not in candidate["rows"]
    ]
    failed = [c.describe() for c in compare(candidate, current, margin) if not c.ok]
    return not (missing or failed), missing + failed


def load_margin(path: str | Path) -> Margin:
    """A gate file: {"margin": number | "P%" | {figure: number | "P%"}}."""
    data = json.loads(Path(path).read_text())
    if "margin" not in data:
        raise ValueError(f"{path}: no 'margin' key")
    margin = data["margin"]
    for figure, m in margin.items() if isinstance(margin, Mapping) else [("every figure", margin)]:
        allowed_drop(m, figure, 1.0)  # raises ValueError naming a bad value
    return margin


# -- command line ------------------------------------------------------------------------------


def _summary(card: dict) -> str:
    rows = (card.get("eval") or {}).get("rows") or {}
    parts = [
        f"{name.split(', ')[-1]} {m['alignment']['overall']:.1f}%"
        for name, m in rows.items()
        if isinstance(m.get("alignment"), Mapping) and "overall" in m["alignment"]
    ]
    n = (card.get("eval") or {}).get("n")
    return f"n={n} overall: " + ", ".join(parts) if parts else "no figures"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m deploy.store",
        description="The versioned model store: list versions, publish a family folder, move the pointers.",
    )
    p.add_argument(
        "--store", default=os.environ.get("FLASH_STORE", "store"), help="store folder (FLASH_STORE)"
    )
    p.add_argument(
        "--family", default=os.environ.get("FLASH_FAMILY", "shapes64"), help="family (FLASH_FAMILY)"
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="published versions, the pointers and the key figures")
    sub.add_parser("current", help="print the current version")
    sub.add_parser("previous", help="print the previous version")
    pub = sub.add_parser("publish", help="add a family folder (with evaluation figures) as a version")
    pub.add_argument("src")
    pub.add_argument("--version", default=None, help="version name (default: UTC timestamp)")
    sc = sub.add_parser(
        "set-current", help="point `current` at a version (no reload: see deploy/redeploy.sh)"
    )
    sc.add_argument("version")
    a = p.parse_args(argv)
    try:
        if a.command == "list":
            cur, prev = current(a.store, a.family), previous(a.store, a.family)
            for v in versions(a.store, a.family):
                mark = "current " if v == cur else "previous" if v == prev else "        "
                print(f"{mark} {v}  {_summary(read_card(version_dir(a.store, a.family, v)))}")
        elif a.command in ("current", "previous"):
            v = current(a.store, a.family) if a.command == "current" else previous(a.store, a.family)
            if v is None:
                print(f"no {a.command} version in {family_root(a.store, a.family)}", file=sys.stderr)
                return 1
            print(v)
        elif a.command == "publish":
            print(f"published {publish(a.store, a.family, a.src, a.version)}")
        elif a.command == "set-current":
            old = set_current(a.store, a.family, a.version)
            print(f"current: {old or 'none'} -> {a.version}")
    except (StoreError, ValueError, OSError) as e:
        print(f"store: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
