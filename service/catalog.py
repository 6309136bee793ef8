"""What a loaded family serves, under which names: the source of every allowed value.

Students are `flash-1step`, `flash-2step`, `flash-3step` (one per student folder);
`flash` is an alias whose `steps` picks the student; `teacher` runs the teacher with
DPM-Solver++ and classifier-free guidance. A request without `model` means `flash`.
"""

from __future__ import annotations

from dataclasses import dataclass

ALIAS = "flash"
TEACHER = "teacher"


def student_name(steps: int) -> str:
    return f"{ALIAS}-{steps}step"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "student" or "teacher"
    steps: tuple[int, ...]  # the step counts this name accepts
    default_steps: int
    version: str
    default_guidance: float | None = None  # teacher only

    def describe_steps(self) -> str:
        s = self.steps
        if len(s) > 3 and s == tuple(range(s[0], s[-1] + 1)):
            return f"{s[0]} to {s[-1]}"
        return ", ".join(map(str, s))


@dataclass(frozen=True)
class Catalog:
    models: dict[str, ModelSpec]  # concrete names: flash-Nstep and teacher
    image_size: int
    version: str
    backend: str
    decoder: str = "full"  # the VAE decoder the images go through: full, or the fast one (tiny)

    @property
    def size(self) -> str:
        return f"{self.image_size}x{self.image_size}"

    @property
    def student_steps(self) -> tuple[int, ...]:
        return tuple(sorted(m.steps[0] for m in self.models.values() if m.kind == "student"))

    def names(self) -> list[str]:
        """Every accepted `model` value, the alias included when there are students."""
        return ([ALIAS] if self.student_steps else []) + list(self.models)

    def default_model(self) -> str:
        steps = self.student_steps
        if not steps:
            return TEACHER
        return ALIAS

    def alias_spec(self) -> ModelSpec | None:
        steps = self.student_steps
        if not steps:
            return None
        default = 3 if 3 in steps else steps[-1]
        return ModelSpec(ALIAS, "student", steps, default, self.version)

    def spec(self, name: str | None) -> ModelSpec | None:
        name = name or self.default_model()
        return self.alias_spec() if name == ALIAS else self.models.get(name)

    def resolve(self, name: str | None, steps: int | None) -> tuple[str, int]:
        """(concrete model name, steps) for a validated request."""
        spec = self.spec(name)
        assert spec is not None, name
        steps = spec.default_steps if steps is None else steps
        if spec.name == ALIAS:
            return student_name(steps), steps
        return spec.name, steps


def build_catalog(family, image_size: int, max_teacher_steps: int, backend: str, decoder: str = "full") -> Catalog:
    """The names a loaded `flash.models.Family` serves."""
    version = family.card.version
    models = {
        student_name(steps): ModelSpec(student_name(steps), "student", (steps,), steps, s.card.version)
        for steps, s in sorted(family.students.items())
    }
    teacher_steps = tuple(range(1, max_teacher_steps + 1))
    default = min(family.card.teacher_steps, max_teacher_steps)
    models[TEACHER] = ModelSpec(
        TEACHER, "teacher", teacher_steps, default, version, family.card.guidance_scale
    )
    return Catalog(models, image_size, version, backend, decoder)
