"""The batching layer on its own: plain queues, toy backends, no HTTP, no threads."""

import threading
import time
from queue import Queue

import numpy as np
import pytest
import torch

from flash.sampling import next_timesteps, run_student
from flash.schedule import NoiseSchedule
from flash.tiny import SD_SCHEDULER_CONFIG
from service.batching import (
    Batcher,
    Job,
    ModelSet,
    StudentPlan,
    collate_requests,
    select_teacher_batch,
    waits_for_company,
)
from service.errors import DeadlineExceeded, GenerationFailed

SCHED = NoiseSchedule.from_config(SD_SCHEDULER_CONFIG)
TIMESTEPS = {1: [999], 3: [999, 750, 500]}


# -- collate_requests -------------------------------------------------------------------------


def filled(n):
    q = Queue()
    for i in range(n):
        q.put(i)
    return q


def test_collate_respects_max_batch_size_and_keeps_order():
    q = filled(5)
    assert collate_requests(q, 3, timeout=1.0) == [0, 1, 2]
    assert collate_requests(q, 3, timeout=0.0) == [3, 4]
    assert collate_requests(q, 0, timeout=1.0) == []


def test_collate_returns_at_once_when_full():
    start = time.monotonic()
    assert collate_requests(filled(4), 4, timeout=5.0) == [0, 1, 2, 3]
    assert time.monotonic() - start < 0.5


def test_collate_waits_for_the_first_then_at_most_timeout():
    q = Queue()
    start = time.monotonic()
    assert collate_requests(q, 4, timeout=1.0, wait_first=0.05) == []
    assert 0.04 < time.monotonic() - start < 0.5

    q.put("a")
    late = threading.Timer(0.5, q.put, args=("late",))
    late.start()
    start = time.monotonic()
    assert collate_requests(q, 4, timeout=0.05) == ["a"]  # the window closed before "late"
    assert time.monotonic() - start < 0.4
    late.join()
    assert collate_requests(q, 4, timeout=0.0) == ["late"]


def test_collate_gathers_what_arrives_inside_the_window():
    q = Queue()
    q.put("a")
    threading.Timer(0.02, q.put, args=("b",)).start()
    assert collate_requests(q, 4, timeout=0.5) == ["a", "b"]  # then the window runs out


def test_collate_lingers_only_for_a_first_job_that_waits_for_company():
    q = Queue()
    q.put(job())
    q.put(second := job())
    late = threading.Timer(0.1, q.put, args=(job("teacher"),))
    late.start()
    start = time.monotonic()
    # a student first: what is queued now, no window (the next one joins at the next U-Net call)
    assert collate_requests(q, 4, timeout=1.0, linger_if=waits_for_company)[1] is second
    assert time.monotonic() - start < 0.08
    late.join()
    threading.Timer(0.05, q.put, args=(partner := job("teacher"),)).start()
    got = collate_requests(q, 4, timeout=0.3, linger_if=waits_for_company)  # a teacher first: the window
    assert [j.kind for j in got] == ["teacher", "teacher"] and got[1] is partner
    assert waits_for_company(job("teacher")) and not waits_for_company(job())


# -- grouping -------------------------------------------------------------------------------------


def job(kind="student", steps=3, seeds=(0,), guidance=None, prompt="p", **kw):
    model = "teacher" if kind == "teacher" else f"flash-{steps}step"
    return Job(model, kind, prompt, list(seeds), steps, guidance, **kw)


def test_teacher_batches_group_identical_steps_and_guidance():
    a, b = job("teacher", 25, guidance=5.0), job("teacher", 25, guidance=3.0)
    c, d = job("teacher", 25, guidance=5.0, seeds=(1, 2)), job("teacher", 10, guidance=5.0)
    student = job()
    assert select_teacher_batch([student, a, b, c, d], max_images=8) == [a, c]
    assert select_teacher_batch([a, c], max_images=2) == [a]  # c's two images do not fit
    big = job("teacher", 25, guidance=5.0, seeds=range(5))
    assert select_teacher_batch([big, a], max_images=4) == [big]  # the oldest always runs
    assert select_teacher_batch([student], max_images=4) == []


# -- the continuous batcher with a toy model ---------------------------------------------------------


class ToyBackend:
    """eps depends on x, t and cond, so mixing items at different steps would show."""

    def __init__(self):
        self.calls, self.fail, self.nan_items = [], None, ()

    def encode(self, prompts):
        return torch.stack([torch.full((2, 3), float(len(p))) for p in prompts])

    def denoise(self, x, t, cond):
        self.calls.append(t.tolist())
        if self.fail is not None:
            raise self.fail
        out = 0.3 * x + (t.float() / 1000).reshape(-1, 1, 1, 1) + cond.mean((1, 2)).reshape(-1, 1, 1, 1) / 10
        for i in self.nan_items:
            out[i] = float("nan")
        return out

    def decode(self, latents):
        self.decoded = latents.clone()
        return (
            (latents.clamp(-1, 1).flatten(1)[:, :12].reshape(-1, 2, 2, 3) * 100 + 128).to(torch.uint8).numpy()
        )


def toy_models(backend=None):
    backend = backend or ToyBackend()
    plans = {
        s: StudentPlan(
            backend, SCHED, torch.tensor(ts), torch.tensor(next_timesteps(ts)), noise_correction=True
        )
        for s, ts in TIMESTEPS.items()
    }
    return ModelSet(
        "toy", "v1", "/toy", None, torch.device("cpu"), (3, 2, 2), backend, SD_SCHEDULER_CONFIG, plans
    )


def drain(batcher, models, limit=50):
    for _ in range(limit):
        if not batcher.has_work():
            return
        batcher.run_once(models)
    raise AssertionError("batcher did not finish")


def test_a_job_joins_others_mid_trajectory_and_gets_the_same_result():
    models = toy_models()
    b = Batcher(max_batch_size=8)
    first, late = job(seeds=(1,), prompt="aa"), job(seeds=(7, 8), prompt="bbbb")
    b.add([first])
    b.run_once(models)  # first: step 0 -> 1
    b.add([late])
    b.run_once(models)  # one U-Net call: first at t=750, late at t=999
    assert models.students[3].backend.calls[-1] == [750, 999, 999]
    assert b.stats.mixed_step_calls == 1 and b.stats.largest_batch == 3
    drain(b, models)
    for j in (first, late):
        result = j.future.result(timeout=0)
        assert len(result.images) == len(j.seeds)

    # each image is what the sampler gives it alone
    alone = ToyBackend()
    x_T = models.noise([7, 8])
    cond = alone.encode(["bbbb", "bbbb"])
    want = run_student(alone.denoise, x_T, cond, SCHED, TIMESTEPS[3])
    b2, m2 = Batcher(8), toy_models(alone)
    lone = job(seeds=(7, 8), prompt="bbbb")
    b2.add([lone])
    drain(b2, m2)
    assert torch.allclose(alone.decoded, want, atol=1e-6)
    np.testing.assert_array_equal(
        np.stack(lone.future.result().images), np.stack(late.future.result().images)
    )


def test_a_call_never_exceeds_max_batch_size():
    models = toy_models()
    b = Batcher(max_batch_size=2)
    jobs = [job(seeds=(i,)) for i in range(5)] + [job(seeds=(9, 10, 11))]
    b.add(jobs)
    drain(b, models)
    assert max(len(c) for c in models.students[3].backend.calls) <= 2
    assert all(j.future.result(timeout=0) for j in jobs)


def test_students_with_different_step_counts_never_share_a_call():
    models = toy_models()
    b = Batcher(max_batch_size=8)
    b.add([job(steps=3), job(steps=1), job(steps=3)])
    drain(b, models)
    calls = models.students[3].backend.calls  # one backend object serves both plans here
    assert [999] in calls  # the 1-step student ran alone
    assert all(set(c) <= {999, 750, 500} for c in calls)
    assert [999, 999] in calls  # the two 3-step jobs ran together


def test_a_failing_call_fails_each_of_its_jobs_and_the_loop_goes_on():
    backend = ToyBackend()
    models = toy_models(backend)
    b = Batcher(max_batch_size=8)
    victims = [job(), job(seeds=(3,))]
    b.add(victims)
    backend.fail = RuntimeError("device on fire")
    b.run_once(models)
    for v in victims:
        with pytest.raises(GenerationFailed, match="device on fire") as e:
            v.future.result(timeout=0)
        assert e.value.reason == "exception"
    assert not b.has_work()
    backend.fail = None
    after = job()
    b.add([after])
    drain(b, models)
    assert len(after.future.result(timeout=0).images) == 1


def test_non_finite_output_fails_only_the_job_it_belongs_to():
    backend = ToyBackend()
    models = toy_models(backend)
    b = Batcher(max_batch_size=8)
    bad, good = job(seeds=(1,)), job(seeds=(2,))
    b.add([bad, good])
    backend.nan_items = (0,)
    b.run_once(models)
    backend.nan_items = ()
    drain(b, models)
    with pytest.raises(GenerationFailed, match="non-finite") as e:
        bad.future.result(timeout=0)
    assert e.value.reason == "non_finite"
    assert len(good.future.result(timeout=0).images) == 1


def test_the_number_of_outputs_is_checked():
    backend = ToyBackend()
    backend.denoise = lambda x, t, cond: torch.zeros(len(x) - 1, *x.shape[1:])
    b = Batcher(max_batch_size=8)
    jobs = [job(), job()]
    b.add(jobs)
    drain(b, toy_models(backend))
    for j in jobs:
        with pytest.raises(GenerationFailed, match="for 2 inputs") as e:
            j.future.result(timeout=0)
        assert e.value.reason == "output_count"


def test_cancelled_and_expired_jobs_never_reach_the_device():
    backend = ToyBackend()
    b = Batcher(max_batch_size=8)
    gone, late = job(), job(deadline=time.monotonic() - 1)
    gone.future.cancel()
    b.add([gone, late])
    drain(b, toy_models(backend))
    assert backend.calls == [] and b.stats.dropped == 1
    with pytest.raises(DeadlineExceeded):
        late.future.result(timeout=0)


def test_teacher_jobs_run_as_one_batch_with_cfg():
    backend = ToyBackend()
    b = Batcher(max_batch_size=8)
    jobs = [job("teacher", 3, guidance=4.0, seeds=(1,)), job("teacher", 3, guidance=4.0, seeds=(2, 3))]
    b.add(jobs)
    b.run_once(toy_models(backend))
    assert not b.has_work()
    assert [len(c) for c in backend.calls] == [6, 6, 6]  # 3 images, cond + uncond, 3 steps
    assert [len(j.future.result(timeout=0).images) for j in jobs] == [1, 2]
