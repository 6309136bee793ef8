"""Copy a family and fill its 1/2/3-step student slots with the teacher's U-Net.

    python bench/make_standin.py models/shapes64 /tmp/standin

Latency does not depend on weights: the stand-in has real students' architecture,
schedules and cost, so the service, export and load benchmarks can run before the
students are trained. Never serve or evaluate it for quality.
"""

import argparse
import shutil
from pathlib import Path

from flash.models import StudentCard, load_components, save_student
from flash.scheduler import DEFAULT_TIMESTEPS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("family", type=Path)
    p.add_argument("out", type=Path)
    a = p.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    shutil.copytree(a.family, a.out)
    c = load_components(a.out)
    for n, ts in DEFAULT_TIMESTEPS.items():
        card = StudentCard(steps=n, timesteps=ts, version="timing-standin (teacher weights)")
        save_student(c.unet, card, a.out / "students" / f"{n}-step", c.scheduler_config)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
