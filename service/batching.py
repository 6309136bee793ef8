"""Batching: which requests share a device call. No threads and no HTTP here.

`collate_requests` takes jobs off a plain queue within a time window. `Batcher` holds
what the device thread is working on and makes one device call per `run_once`:

* Students: continuous batching. Each image is an `Item` with its own step index;
  one U-Net call advances up to `max_batch_size` items of the same student, each at
  its own timestep (`ddim_step` takes per-item t, t' and a per-item noise-correction
  mask, eq. 9, set only for items at step 0). A request that arrives while others
  are mid-trajectory joins at the next U-Net call.
* The teacher: jobs with identical (steps, guidance_scale) run together through
  DPM-Solver++ with a fresh diffusers scheduler per batch (schedulers count steps).

Each item's x_T comes from its own seeded generator, so an image does not depend on
its batch. A failing call fails exactly the jobs in it, each with its own error.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from queue import Empty, Queue
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flash.pipeline import initial_noise, make_scheduler
from flash.sampling import ddim_step, run_diffusers_scheduler
from flash.schedule import NoiseSchedule
from service.backends import Backend
from service.catalog import TEACHER, Catalog, student_name
from service.errors import DeadlineExceeded, GenerationFailed, InvalidRequest

log = logging.getLogger(__name__)

TEACHER_SCHEDULER = "dpmsolver++"


def collate_requests(
    queue: Queue, max_batch_size: int, timeout: float, wait_first: float = 0.0,
    linger_if: Callable[[Any], bool] | None = None,
) -> list:
    """Up to `max_batch_size` items from `queue`: wait up to `wait_first` s for the first,
    then up to `timeout` s after it for more (only if `linger_if(first)`, when given),
    returning early when full. [] if none came."""
    items: list = []
    if max_batch_size <= 0:
        return items
    try:
        items.append(queue.get(timeout=wait_first) if wait_first > 0 else queue.get_nowait())
    except Empty:
        return items
    if linger_if is not None and not linger_if(items[0]):
        timeout = 0.0  # take what is already there, do not wait
    end = time.monotonic() + timeout
    while len(items) < max_batch_size:
        remaining = end - time.monotonic()
        try:
            items.append(queue.get(timeout=remaining) if remaining > 0 else queue.get_nowait())
        except Empty:
            break
    return items


def waits_for_company(job: Job) -> bool:
    """Whether an idle loop holds `job` for `max_wait_ms` so requests sent with it share its call.

    Teacher jobs: a trajectory cannot be joined once it runs. Student jobs do not wait: a
    request that comes a moment later joins at the next U-Net call (continuous batching), and
    the window would only add its length to a lone request's latency (docs/benchmarks.md).
    """
    return job.kind == "teacher"


@dataclass(frozen=True)
class StudentPlan:
    backend: Backend
    schedule: NoiseSchedule  # the student's own parameterisation
    timesteps: Tensor  # [steps] long: where step i evaluates
    targets: Tensor  # [steps] long: where step i lands (FINAL for the last)
    noise_correction: bool


@dataclass(eq=False)
class ModelSet:
    """One loaded version of a family: what the loop runs on. Swapped whole on reload."""

    name: str
    version: str
    model_dir: str
    catalog: Catalog
    device: torch.device
    latent_shape: tuple[int, int, int]
    teacher: Backend
    teacher_schedule_config: dict
    students: dict[int, StudentPlan]
    uncond: Tensor | None = None  # encode([""]), computed on the device thread
    warm_batches: list[int] = field(default_factory=list)  # compiled batch shapes warm-up runs

    def noise(self, seeds: Sequence[int]) -> Tensor:
        return initial_noise(seeds, self.latent_shape, torch.float32, self.device)


@dataclass
class JobResult:
    images: list[np.ndarray]  # uint8 [H, W, 3] each
    version: str
    queue_s: float
    compute_s: float


@dataclass(eq=False)
class Job:
    """One validated request on its way to the device. `seeds` has one entry per image."""

    model: str  # flash-Nstep or teacher
    kind: str  # "student" or "teacher"
    prompt: str
    seeds: list[int]
    steps: int
    guidance_scale: float | None = None
    deadline: float = float("inf")  # time.monotonic()
    enqueued_at: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    abandoned: bool = False  # the client left after the job started
    started_at: float | None = None
    images: list[Any] = field(default_factory=list)

    @property
    def teacher_key(self) -> tuple[int, float | None]:
        return self.steps, self.guidance_scale

    @property
    def gone(self) -> bool:
        return self.abandoned or self.future.done()

    def start(self, now: float) -> bool:
        """Mark running; False when the client already cancelled (drop it)."""
        if not self.future.set_running_or_notify_cancel():
            return False
        self.started_at = now
        self.images = [None] * len(self.seeds)
        return True

    def fail(self, error: Exception) -> None:
        try:
            self.future.set_exception(error)
        except InvalidStateError:  # cancelled or settled meanwhile
            pass

    def finish(self, version: str, now: float) -> None:
        try:
            self.future.set_result(
                JobResult(
                    list(self.images), version, self.started_at - self.enqueued_at, now - self.started_at
                )
            )
        except InvalidStateError:
            pass


@dataclass(eq=False)
class Item:
    job: Job
    index: int  # which of the job's images
    x: Tensor  # [C, h, w] the current latent, x_T at step 0
    cond: Tensor  # [L, D]
    step: int = 0


def select_teacher_batch(waiting: Sequence[Job], max_images: int) -> list[Job]:
    """The oldest teacher job and the later ones with the same (steps, guidance), up to
    `max_images` images (the first job always goes, even if it alone is larger)."""
    teachers = [j for j in waiting if j.kind == "teacher"]
    if not teachers:
        return []
    lead, batch, images = teachers[0], [teachers[0]], len(teachers[0].seeds)
    for job in teachers[1:]:
        if job.teacher_key == lead.teacher_key and images + len(job.seeds) <= max_images:
            batch.append(job)
            images += len(job.seeds)
    return batch


@dataclass
class BatchStats:
    unet_calls: int = 0
    largest_batch: int = 0
    mixed_step_calls: int = 0  # student calls whose items sat at different steps
    dropped: int = 0  # cancelled before their turn
    failed_calls: int = 0


# (stage, seconds, images in the call, model); must be cheap: it runs on the device thread.
Recorder = Callable[[str, float, int, str], None]


class Batcher:
    """Jobs waiting for admission and student items in flight; `run_once` makes one call."""

    def __init__(self, max_batch_size: int, record: Recorder | None = None, clock=time.monotonic):
        self.max_batch_size = max_batch_size
        self.record = record or (lambda *a: None)
        self.clock = clock
        self.waiting: deque[Job] = deque()
        self.groups: dict[tuple[ModelSet, int], list[Item]] = {}
        self.stats = BatchStats()

    def has_work(self) -> bool:
        return bool(self.waiting) or any(self.groups.values())

    def room(self) -> int:
        """How many more jobs the loop may take off the queue (the rest wait there, bounded)."""
        return max(0, self.max_batch_size - len(self.waiting))

    def add(self, jobs: Sequence[Job]) -> None:
        self.waiting.extend(jobs)

    def abort_all(self, error: Exception) -> None:
        for job in [*self.waiting, *(it.job for items in self.groups.values() for it in items)]:
            job.fail(error)
        self.waiting.clear()
        self.groups.clear()

    def run_once(self, models: ModelSet) -> None:
        """Admit what fits, then one device call: a student step or a teacher batch."""
        self._prune()
        self._admit_students(models)
        group, oldest = None, float("inf")
        for key, items in self.groups.items():
            if items and items[0].job.enqueued_at < oldest:
                group, oldest = key, items[0].job.enqueued_at
        teacher = next((j for j in self.waiting if j.kind == "teacher"), None)
        if teacher is not None and teacher.enqueued_at < oldest:
            self._teacher_batch(models)
        elif group is not None:
            self._student_step(*group)

    # -- admission ---------------------------------------------------------------------

    def _prune(self) -> None:
        """Drop jobs whose client left or whose deadline passed before their turn."""
        now, kept = self.clock(), deque()
        for job in self.waiting:
            if job.future.cancelled() or job.abandoned:
                self.stats.dropped += 1
            elif now > job.deadline:
                job.fail(DeadlineExceeded(f"request waited {now - job.enqueued_at:.2f} s, past its deadline"))
            else:
                kept.append(job)
        self.waiting = kept
        for key in list(self.groups):
            self.groups[key] = [it for it in self.groups[key] if not it.job.gone]
            if not self.groups[key]:
                del self.groups[key]

    def _admit_students(self, models: ModelSet) -> None:
        admitted: dict[int, list[Job]] = {}
        for job in list(self.waiting):
            if job.kind != "student":
                continue
            if job.steps not in models.students:
                self.waiting.remove(job)
                job.fail(
                    InvalidRequest(
                        f"model {job.model!r} is no longer served (version {models.version})", "model"
                    )
                )
                continue
            in_group = len(self.groups.get((models, job.steps), ())) + sum(
                len(j.seeds) for j in admitted.get(job.steps, ())
            )
            if in_group >= self.max_batch_size:
                continue
            self.waiting.remove(job)
            if job.start(self.clock()):
                admitted.setdefault(job.steps, []).append(job)
            else:
                self.stats.dropped += 1
        for steps, jobs in admitted.items():
            try:
                conds = self._encode(models.students[steps].backend, [j.prompt for j in jobs], jobs[0].model)
                x_T = models.noise([s for j in jobs for s in j.seeds])  # [items, C, h, w]
            except Exception as e:
                self._fail(jobs, e, "exception")
                continue
            items, k = self.groups.setdefault((models, steps), []), 0
            for j, job in enumerate(jobs):
                for i in range(len(job.seeds)):
                    items.append(Item(job, i, x_T[k], conds[j]))
                    k += 1

    # -- device calls ----------------------------------------------------------------------

    def _encode(self, backend: Backend, prompts: list[str], model: str) -> Tensor:
        t0 = time.perf_counter()
        cond = backend.encode(prompts)
        self.record("text_encoder", time.perf_counter() - t0, len(prompts), model)
        _check(cond, len(prompts), "text encoder")
        return cond

    def _decode(self, backend: Backend, latents: Tensor, model: str) -> np.ndarray:
        t0 = time.perf_counter()
        images = backend.decode(latents)
        self.record("vae_decode", time.perf_counter() - t0, len(latents), model)
        if len(images) != len(latents):
            raise GenerationFailed(
                f"VAE returned {len(images)} images for {len(latents)} latents", "output_count"
            )
        return images

    def _student_step(self, models: ModelSet, steps: int) -> None:
        """One U-Net call for up to max_batch_size items of one student, each at its own step."""
        plan, items = models.students[steps], self.groups[(models, steps)]
        batch = items[: self.max_batch_size]
        jobs = list({id(it.job): it.job for it in batch}.values())
        try:
            x = torch.stack([it.x for it in batch])  # [B, C, h, w]
            cond = torch.stack([it.cond for it in batch])  # [B, L, D]
            idx = torch.tensor([it.step for it in batch])  # [B]
            t, t_next = plan.timesteps[idx], plan.targets[idx]
            t0 = time.perf_counter()
            out = plan.backend.denoise(x, t.to(x.device), cond)
            self.record("unet", time.perf_counter() - t0, len(batch), student_name(steps))
            self._count_call(len(batch), mixed=len(set(idx.tolist())) > 1)
            _check(out, len(batch), "U-Net", x.shape)
            first = (idx == 0) & plan.noise_correction  # eq. 9 only where x is x_T
            x_next, _ = ddim_step(plan.schedule, x, out, t, t_next, noise_correction=first)
        except Exception as e:
            self._fail(jobs, e, "exception")
            return
        finite = torch.isfinite(x_next.flatten(1)).all(dim=1).tolist()
        bad = {id(it.job): it.job for it, ok in zip(batch, finite, strict=True) if not ok}
        self._fail(
            list(bad.values()), GenerationFailed("the model produced non-finite values", "non_finite"), None
        )
        done = []
        for it, x_i in zip(batch, x_next, strict=True):
            if id(it.job) in bad:
                continue
            it.x, it.step = x_i, it.step + 1
            if it.step == steps:
                done.append(it)
        if done:
            try:
                images = self._decode(plan.backend, torch.stack([it.x for it in done]), student_name(steps))
            except Exception as e:
                self._fail(list({id(it.job): it.job for it in done}.values()), e, "exception")
                return
            for it, image in zip(done, images, strict=True):
                it.job.images[it.index] = image
        self._settle(models, steps)

    def _settle(self, models: ModelSet, steps: int) -> None:
        key = (models, steps)
        items = [it for it in self.groups.get(key, ()) if not it.job.gone and it.step < steps]
        now = self.clock()
        for job in {id(it.job): it.job for it in self.groups.get(key, ())}.values():
            if not job.gone and all(im is not None for im in job.images):
                job.finish(models.version, now)
        self.groups[key] = items
        if not items:
            del self.groups[key]

    def _teacher_batch(self, models: ModelSet) -> None:
        """A whole teacher trajectory for jobs sharing (steps, guidance_scale), with CFG."""
        jobs = select_teacher_batch(self.waiting, self.max_batch_size)
        for job in jobs:
            self.waiting.remove(job)
        now = self.clock()
        started = [j for j in jobs if j.start(now)]
        self.stats.dropped += len(jobs) - len(started)
        if not started:
            return
        jobs = started
        steps, scale = jobs[0].teacher_key
        backend = models.teacher
        try:
            prompts = [j.prompt for j in jobs]
            if models.uncond is None:
                models.uncond = self._encode(backend, [""], TEACHER)
            conds = self._encode(backend, prompts, TEACHER)
            reps = torch.tensor([len(j.seeds) for j in jobs], device=conds.device)
            cond = conds.repeat_interleave(reps, dim=0)  # [images, L, D]
            uncond = models.uncond.expand(len(cond), -1, -1) if scale != 1.0 else None
            x_T = models.noise([s for j in jobs for s in j.seeds])
            scheduler = make_scheduler(TEACHER_SCHEDULER, models.teacher_schedule_config)
            t0 = time.perf_counter()
            latents = run_diffusers_scheduler(backend.denoise, x_T, cond, uncond, scheduler, steps, scale)
            self.record("unet", time.perf_counter() - t0, len(x_T), TEACHER)
            self._count_call(len(x_T), mixed=False)
            _check(latents, len(x_T), "teacher sampler", x_T.shape)
            finite = torch.isfinite(latents.flatten(1)).all(dim=1)
            if not finite.all():
                raise GenerationFailed("the model produced non-finite values", "non_finite")
            images = self._decode(backend, latents, TEACHER)
        except Exception as e:
            self._fail(jobs, e, "exception")
            return
        k, now = 0, self.clock()
        for job in jobs:
            job.images = list(images[k : k + len(job.seeds)])
            k += len(job.seeds)
            job.finish(models.version, now)

    # -- bookkeeping ------------------------------------------------------------------------

    def _count_call(self, size: int, mixed: bool) -> None:
        self.stats.unet_calls += 1
        self.stats.largest_batch = max(self.stats.largest_batch, size)
        self.stats.mixed_step_calls += int(mixed)

    def _fail(self, jobs: list[Job], error: Exception, reason: str | None) -> None:
        """Each job gets its own error; its items leave every group."""
        if not jobs:
            return
        if not isinstance(error, GenerationFailed):
            log.error("batch of %d request(s) failed", len(jobs), exc_info=error)
            error = GenerationFailed(
                f"generation failed: {type(error).__name__}: {error}", reason or "exception"
            )
        self.stats.failed_calls += 1
        for job in jobs:
            job.fail(GenerationFailed(error.message, error.reason))
        gone = {id(j) for j in jobs}
        for key in list(self.groups):
            self.groups[key] = [it for it in self.groups[key] if id(it.job) not in gone]


def _check(out: Tensor, n: int, what: str, shape: torch.Size | None = None) -> None:
    """The number (and shape) of outputs must match the inputs."""
    if not isinstance(out, Tensor) or out.shape[0] != n or (shape is not None and out.shape != shape):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise GenerationFailed(f"{what} returned {got} for {n} inputs", "output_count")
