"""The engine: owns the loaded models and the device thread.

One worker thread owns the device and runs the `Batcher`; the asyncio side only puts
jobs on a bounded queue and awaits their `concurrent.futures.Future`. Anything else
that must touch the device (warm-up) is sent to the same thread with `on_device`.
A reload loads a new `ModelSet` on a short-lived loader thread, warms it up on the device
thread (a short pause of serving: warm-up is one image per model), then swaps one
reference: the loop reads it before each admission, so jobs already in flight
finish on the version they started with.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from queue import Empty, Full, Queue

import torch

from flash.models import load_family
from flash.pipeline import TextToImage
from flash.sampling import next_timesteps
from flash.schedule import NoiseSchedule
from service.backends import make_backend
from service.batching import (
    Batcher,
    Job,
    JobResult,
    ModelSet,
    StudentPlan,
    collate_requests,
    waits_for_company,
)
from service.catalog import TEACHER, build_catalog, student_name
from service.config import Settings
from service.errors import DeadlineExceeded, NotReady, QueueFull, ReloadFailed, ReloadInProgress
from service.metrics import Metrics
from service.schemas import ReloadStatus

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often an idle device thread looks at its control queue and stop flag


def load_model_set(settings: Settings, model_dir: Path) -> ModelSet:
    """Read a family folder and build its backends (runs off the device thread)."""
    decoder = settings.served_decoder(model_dir)
    family = load_family(model_dir, decoder=decoder)
    backends = make_backend(settings.backend, family, settings.model_copy(update={"decoder": decoder}))
    geometry = TextToImage(family.teacher, backends.device)
    alphas = NoiseSchedule.from_config(family.teacher.scheduler_config).alphas_cumprod
    students = {
        steps: StudentPlan(
            backend=backends.students[steps],
            schedule=NoiseSchedule(alphas, s.card.prediction_type),
            timesteps=torch.tensor(s.card.timesteps),
            targets=torch.tensor(next_timesteps(s.card.timesteps)),
            noise_correction=s.card.noise_correction,
        )
        for steps, s in family.students.items()
    }
    return ModelSet(
        name=family.card.name,
        version=family.card.version,
        model_dir=str(model_dir),
        catalog=build_catalog(family, geometry.image_size, settings.max_teacher_steps, backends.name, decoder),
        device=backends.device,
        latent_shape=geometry.latent_shape,
        teacher=backends.teacher,
        teacher_schedule_config=dict(family.teacher.scheduler_config),
        students=students,
        warm_batches=backends.warm_batches,
    )


def warmup(models: ModelSet, max_batch_size: int) -> None:
    """Every model once, through the batching code itself; raises if any fails."""
    batcher = Batcher(max_batch_size)
    jobs = [Job(student_name(s), "student", "warm up", [0], s) for s in models.students]
    guidance = models.catalog.models[TEACHER].default_guidance
    jobs.append(Job(TEACHER, "teacher", "warm up", [0], 2, guidance_scale=guidance))
    batcher.add(jobs)
    while batcher.has_work():
        batcher.run_once(models)
    for job in jobs:
        job.future.result(timeout=0)
    compile_buckets(models, max_batch_size)


@torch.no_grad()
def compile_buckets(models: ModelSet, max_batch_size: int) -> None:
    """One U-Net call per compiled batch bucket (students up to max_batch_size; the teacher's
    guided calls are twice as large), so no request waits for torch.compile."""
    if not models.warm_batches:
        return
    cond1 = models.teacher.encode([""])
    plans = [(p.backend, max_batch_size) for p in models.students.values()]
    for backend, largest in [*plans, (models.teacher, 2 * max_batch_size)]:
        for n in (k for k in models.warm_batches if k <= largest):
            x = torch.zeros(n, *models.latent_shape, device=models.device)
            t = torch.full((n,), 999, device=models.device, dtype=torch.long)
            backend.denoise(x, t, cond1.repeat(n, 1, 1))


async def in_own_thread(fn: Callable, *args, name: str = "flash-loader"):
    """`fn(*args)` on a new thread that exits when done.

    Not `asyncio.to_thread`: a pooled thread that has run torch keeps its OpenMP thread team
    alive, and once a process holds more OpenMP threads than cores, libgomp stops spin-waiting
    (GOMP_SPINCOUNT is throttled), so every small op on the device thread pays a futex
    wake-up: 2x per call on 2 cores (docs/benchmarks.md). An exited thread frees its team.
    """
    fut: Future = Future()

    def run() -> None:
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # handed to the awaiting coroutine
                fut.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await asyncio.wrap_future(fut)


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics, loader: Callable = load_model_set):
        self.settings, self.metrics, self._loader = settings, metrics, loader
        self.batcher = Batcher(settings.max_batch_size, record=metrics.record_stage)
        self.models: ModelSet | None = None
        self.ready = False  # loaded and warmed up
        self.draining = False
        self.load_error: str | None = None
        self.reload_status = ReloadStatus(state="idle")
        self._queue: Queue[Job] = Queue(maxsize=settings.queue_size)
        self._control: Queue[tuple[Callable, Future]] = Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="flash-device", daemon=True)
        self._reload_lock = asyncio.Lock()
        self._in_flight = 0  # requests awaiting a result (asyncio side only)
        self._tasks: set[asyncio.Task] = set()
        metrics.pending.set_function(self.pending)

    # -- asyncio side ------------------------------------------------------------------------

    def pending(self) -> int:
        return self._queue.qsize() + len(self.batcher.waiting)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    async def start(self) -> None:
        """Start the device thread, then load and warm up; failures land in `load_error`."""
        self._thread.start()
        try:
            self._swap(await self._load(Path(self.settings.model_dir)))
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("could not load %s: %s", self.settings.model_dir, self.load_error)

    async def generate(self, job: Job) -> JobResult:
        """Enqueue and await; QueueFull, NotReady, DeadlineExceeded or the job's own error."""
        if self.draining or not self.ready:
            raise NotReady(
                "the server is shutting down" if self.draining else "the models are not loaded yet"
            )
        try:
            self._queue.put_nowait(job)
        except Full:
            raise QueueFull(
                f"{self.settings.queue_size} requests are already waiting; retry later",
                self.settings.retry_after_s,
            ) from None
        self._in_flight += 1
        try:
            async with asyncio.timeout(max(0.0, job.deadline - time.monotonic())):
                return await asyncio.wrap_future(job.future)
        except TimeoutError:
            raise DeadlineExceeded(
                f"no result within the {self.settings.request_timeout_s:g} s deadline"
            ) from None
        finally:
            job.abandoned = not job.future.done() or job.future.cancelled()
            self._in_flight -= 1

    async def on_device(self, fn: Callable, *args):
        """Run `fn(*args)` on the device thread between two batches."""
        fut: Future = Future()
        self._control.put((partial(fn, *args), fut))
        return await asyncio.wrap_future(fut)

    async def reload(self, model_dir: str | Path | None = None) -> ModelSet:
        """Load, warm up and swap in a family; on failure the old version keeps serving."""
        if self._reload_lock.locked():
            raise ReloadInProgress("a reload is already running")
        async with self._reload_lock:
            path = Path(model_dir or (self.models.model_dir if self.models else self.settings.model_dir))
            old = self.models.version if self.models else None
            self.reload_status = ReloadStatus(state="loading", version=old, model_dir=str(path))
            try:
                models = await self._load(path)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                self.reload_status = ReloadStatus(
                    state="failed", version=old, model_dir=str(path), error=error
                )
                log.error("reload of %s failed; still serving version %s: %s", path, old, error)
                raise ReloadFailed(f"reload of {path} failed; still serving version {old}: {error}") from e
            self._swap(models)
            self.reload_status = ReloadStatus(state="ok", version=models.version, model_dir=str(path))
            log.info("now serving %s version %s", path, models.version)
            return models

    def reload_in_background(self, model_dir: str | Path | None = None) -> None:
        """For SIGHUP and `wait=false`: the outcome lands in `reload_status` and the log."""

        async def quietly():
            try:
                await self.reload(model_dir)
            except Exception as e:  # already logged and recorded
                log.debug("background reload: %s", e)

        task = asyncio.get_running_loop().create_task(quietly())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish (up to `timeout`), stop the thread."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._stop.set()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, 10)

    async def _load(self, path: Path) -> ModelSet:
        models = await in_own_thread(self._loader, self.settings, path)
        if self.settings.warmup:
            await self.on_device(warmup, models, self.settings.max_batch_size)
        return models

    def _swap(self, models: ModelSet) -> None:
        self.models = models  # one reference: the device thread picks it up at its next iteration
        self.metrics.set_model(
            models.version, models.catalog.backend, models.name, models.model_dir, models.catalog.decoder
        )
        self.load_error, self.ready = None, True

    # -- device thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        # thread-local; inference mode skips autograd's version counters as well (4% of a
        # 3-step student's latency on 2 CPU cores, docs/benchmarks.md)
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        window = self.settings.max_wait_ms / 1000
        b = self.batcher
        while not self._stop.is_set():
            if self.models is None:
                self._run_control(POLL_S)
                continue
            self._run_control(0)
            idle = not b.has_work()
            b.add(collate_requests(self._queue, b.room(), window if idle else 0.0, POLL_S if idle else 0.0,
                                   linger_if=waits_for_company))
            if b.has_work():
                try:
                    b.run_once(self.models)  # read after the wait: a swap applies to the next admission
                except Exception:  # the batcher fails its own jobs; this is a bug, never a crash
                    log.exception("batching loop error; continuing")
        b.add(collate_requests(self._queue, 1 << 30, 0.0))
        b.abort_all(NotReady("the server is shutting down"))
        self._run_control(0, error=NotReady("the server is shutting down"))

    def _run_control(self, timeout: float, error: Exception | None = None) -> None:
        try:
            fn, fut = self._control.get(timeout=timeout) if timeout > 0 else self._control.get_nowait()
        except Empty:
            return
        while True:
            if fut.set_running_or_notify_cancel():
                if error is not None:
                    fut.set_exception(error)
                else:
                    try:
                        fut.set_result(fn())
                    except Exception as e:
                        fut.set_exception(e)
            try:
                fn, fut = self._control.get_nowait()
            except Empty:
                return
