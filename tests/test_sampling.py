"""The diffusion core: schedule, parameterisations, student sampler, teacher solvers."""

import pytest
import torch

from flash.sampling import cfg_output, ddim_step, next_timesteps, run_student, teacher_ddim
from flash.schedule import FINAL, NoiseSchedule, from_x0_eps, to_x0_eps, validate_timesteps
from flash.tiny import SD_SCHEDULER_CONFIG

SCHED = NoiseSchedule.from_config(SD_SCHEDULER_CONFIG)
MU, STD = 0.7, 0.5  # the data: x0 ~ N(MU, STD^2) per coordinate


def gaussian_eps(x, t, cond=None):
    """Exact E[eps | x_t] for Gaussian data: sigma (x - alpha mu) / (alpha^2 s^2 + sigma^2)."""
    alpha, sigma = SCHED.alpha_sigma(t, x)
    return sigma * (x - alpha * MU) / (alpha**2 * STD**2 + sigma**2)


def test_sd_schedule_matches_diffusers():
    from diffusers import DDIMScheduler

    ref = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG).alphas_cumprod
    assert torch.allclose(SCHED.alphas_cumprod.float(), ref, atol=1e-7)
    assert SCHED.T == 999 and abs(SCHED.alphas_cumprod[999].item() - 0.00466) < 1e-4


@pytest.mark.parametrize("ptype", ["epsilon", "sample", "v_prediction"])
def test_parameterisations_round_trip(ptype):
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    alpha, sigma = torch.tensor(0.6), torch.tensor(0.8)
    x_t = alpha * x0 + sigma * eps
    out = from_x0_eps(x0, eps, alpha, sigma, ptype)
    x0_hat, eps_hat = to_x0_eps(out, x_t, alpha, sigma, ptype)
    assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(eps_hat, eps, atol=1e-5)


def test_many_step_ddim_recovers_gaussian_data():
    torch.manual_seed(0)
    # start from the exact marginal at t = 999 (SD's schedule keeps alpha_T = 0.068 > 0)
    alpha, sigma = SCHED.alpha_sigma(torch.tensor([999]), torch.zeros(1, 1))
    x = alpha * MU + (alpha**2 * STD**2 + sigma**2).sqrt() * torch.randn(20000, 1)
    ts = list(range(999, -1, -10))  # 100 steps
    x0 = run_student(gaussian_eps, x, torch.zeros(len(x), 1), SCHED, ts, noise_correction=False)
    assert abs(x0.mean().item() - MU) < 0.02
    assert abs(x0.std().item() - STD) < 0.02


def test_noise_correction_first_update_is_exact():
    torch.manual_seed(1)
    x_T = torch.randn(3, 4, 2, 2)
    eps_hat = torch.randn_like(x_T)  # a deliberately wrong noise prediction
    t, t_next = torch.tensor([999] * 3), torch.tensor([750] * 3)
    x_next, x0_hat = ddim_step(SCHED, x_T, eps_hat, t, t_next, noise_correction=True)
    a_T, s_T = SCHED.alpha_sigma(t, x_T)
    a_n, s_n = SCHED.alpha_sigma(t_next, x_T)
    assert torch.equal(x0_hat, (x_T - s_T * eps_hat) / a_T)
    assert torch.equal(x_next, a_n * x0_hat + s_n * x_T)
    without, _ = ddim_step(SCHED, x_T, eps_hat, t, t_next, noise_correction=False)
    assert torch.equal(without, a_n * x0_hat + s_n * eps_hat)
    assert not torch.allclose(without, x_next)


def test_noise_correction_mask_is_per_item():
    x, out = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    t, tn = torch.tensor([999, 999]), torch.tensor([750, 750])
    both = ddim_step(SCHED, x, out, t, tn, noise_correction=torch.tensor([True, False]))[0]
    assert torch.equal(both[0], ddim_step(SCHED, x[:1], out[:1], t[:1], tn[:1], True)[0][0])
    assert torch.equal(both[1], ddim_step(SCHED, x[1:], out[1:], t[1:], tn[1:], False)[0][0])


def test_final_step_returns_x0():
    x, out = torch.randn(2, 4), torch.randn(2, 4)
    x_next, x0 = ddim_step(SCHED, x, out, torch.tensor([500, 500]), torch.tensor([FINAL, FINAL]))
    assert torch.equal(x_next, x0)


def test_per_item_timesteps_match_separate_runs(tiny):
    from flash.pipeline import TextToImage, unet_denoiser

    pipe = TextToImage(tiny)
    den = unet_denoiser(tiny.unet)
    x = pipe.noise([0, 1])
    cond = pipe.encode(["a red circle", "a blue square"])
    with torch.no_grad():
        out = den(x, torch.tensor([999, 750]), cond)
        mixed, _ = ddim_step(SCHED, x, out, torch.tensor([999, 750]), torch.tensor([750, 500]), torch.tensor([1, 0]))
        a = ddim_step(SCHED, x[:1], den(x[:1], torch.tensor([999]), cond[:1]), 999, 750, True)[0]
        b = ddim_step(SCHED, x[1:], den(x[1:], torch.tensor([750]), cond[1:]), 750, 500, False)[0]
    assert torch.allclose(mixed, torch.cat([a, b]), atol=1e-5)


def test_run_student_stops_per_item(tiny):
    from flash.pipeline import TextToImage, unet_denoiser

    pipe = TextToImage(tiny)
    den, ts = unet_denoiser(tiny.unet), [999, 750, 500]
    x_T, cond = pipe.noise([3, 4, 5]), pipe.encode(["a", "b", "c"])
    with torch.no_grad():
        mixed = run_student(den, x_T, cond, SCHED, ts, num_steps=torch.tensor([0, 1, 3]))
        for i, n in enumerate([0, 1, 3]):
            alone = run_student(den, x_T[i : i + 1], cond[i : i + 1], SCHED, ts, num_steps=n)
            assert torch.allclose(mixed[i], alone[0], atol=1e-5)
    assert torch.equal(mixed[0], x_T[0])  # zero steps: still pure noise


def test_teacher_ddim_on_gaussian_data_is_close_to_exact():
    torch.manual_seed(0)
    x0 = MU + STD * torch.randn(4000, 1)
    t = torch.full((4000,), 600)
    x_t = SCHED.add_noise(x0, torch.randn_like(x0), t)
    out = teacher_ddim(gaussian_eps, x_t, t, torch.zeros(4000, 1), None, SCHED, 50, 1.0)
    assert abs(out.mean().item() - MU) < 0.03 and abs(out.std().item() - STD) < 0.03
    with pytest.raises(ValueError, match="num_steps"):
        teacher_ddim(gaussian_eps, x_t, t, x_t, None, SCHED, 0, 1.0)


def test_cfg_combines_branches():
    def den(x, t, c):
        return c.expand_as(x) * 1.0

    x = torch.zeros(2, 1)
    out = cfg_output(den, x, torch.tensor([5, 5]), torch.ones(2, 1), torch.zeros(2, 1), 3.0)
    assert torch.equal(out, torch.full((2, 1), 3.0))


def test_next_timesteps():
    assert next_timesteps([999, 750, 500]) == [750, 500, FINAL]


@pytest.mark.parametrize(
    ("ts", "match"),
    [([999, 1000], "out of range"), ([500, 750], "descending"), ([], "empty"), ([999, 999], "descending")],
)
def test_bad_timesteps(ts, match):
    with pytest.raises(ValueError, match=match):
        validate_timesteps(ts)


def test_bad_prediction_type():
    with pytest.raises(ValueError, match="'x_prediction'"):
        NoiseSchedule.from_config({**SD_SCHEDULER_CONFIG, "prediction_type": "x_prediction"})


def test_alpha_sigma_rejects_out_of_range():
    with pytest.raises(ValueError, match="1000"):
        SCHED.alpha_sigma(torch.tensor([1000]), torch.zeros(1, 2))
