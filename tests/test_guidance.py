"""Guidance math (docs/design.md#guidance), the mode table, the expert switch (docs/design.md#expert-switch) and the
pipeline's loop.

Every formula is checked against a float64 reference written here from docs/design.md#guidance, with explicit
per-frame loops, not against the package's own helpers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bernini_diffusers.guidance import (
    GUIDANCE_SPECS,
    Branch,
    Combo,
    Guidance,
    MomentumBuffer,
    apg_project,
    chained_apg,
    chained_cfg,
)
from bernini_diffusers.scheduling import official_flow_sigmas
from bernini_diffusers.tasks import DEFAULT_NEGATIVE_PROMPT, GuidanceMode, TaskType
from bernini_diffusers.text import positive_text

F64 = torch.float64
SHAPE = (1, 4, 3, 5, 6)  # [B, C, T, H, W]


# --- float64 reference, written from docs/design.md#guidance ----------------------------------------------------------


def _frame_norm(frame: torch.Tensor) -> float:
    """L2 norm of one frame [C, H, W]: sqrt of the sum of squares."""
    return math.sqrt(float((frame.double() ** 2).sum()))


def ref_apg_operator(d, r, *, eta, tau):
    """N(d, r) without momentum: per frame, clamp ||d|| to tau (tau > 0), then d_orth + eta * d_par w.r.t. r."""
    d, r = d.double(), r.double()
    out = torch.empty_like(d)
    batch, _, frames, _, _ = d.shape
    for b in range(batch):
        for t in range(frames):
            df = d[b, :, t].clone()
            if tau > 0:
                n = _frame_norm(df)
                if n > tau:
                    df = df * (tau / n)
            rf = r[b, :, t]
            r_unit = rf / max(_frame_norm(rf), 1e-12)
            par = float((df * r_unit).sum()) * r_unit
            orth = df - par
            out[b, :, t] = orth + eta * par
    return out


class RefBuffer:
    """Momentum `buf <- d + mu * buf` from zero, in float64."""

    def __init__(self, mu):
        self.mu = mu
        self.buf = None

    def __call__(self, d):
        d = d.double()
        self.buf = d if self.buf is None else d + self.mu * self.buf
        return self.buf


def ref_chained_apg(latents, outputs, weights, sigma, *, eta, taus, buffers):
    """x0 = x_t - sigma*v per branch; x_g = x0_0 + sum_k w_k N(x0_k - x0_{k-1}, x0_k); v = (x_t - x_g)/sigma."""
    s = float(sigma)
    x_t = latents.double()
    x0 = [x_t - s * v.double() for v in outputs]
    guided = x0[0].clone()
    for k, w in enumerate(weights):
        d = x0[k + 1] - x0[k]
        if buffers[k] is not None:
            d = buffers[k](d)
        guided = guided + w * ref_apg_operator(d, x0[k + 1], eta=eta, tau=taus[k])
    return (x_t - guided) / s


def _rand(*shape, dtype=F64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape or SHAPE, generator=g, dtype=torch.float64) * scale).to(dtype)


def _frame_scaled(seed, scales, dtype=F64):
    """A [1, 4, T, 5, 6] tensor whose frame t is scaled by scales[t] (so frame norms differ a lot)."""
    x = _rand(1, 4, len(scales), 5, 6, seed=seed)
    x = x * torch.tensor(scales, dtype=F64).view(1, 1, -1, 1, 1)
    return x.to(dtype)


# --- chained CFG (docs/design.md#cfg) ---------------------------------------------------------------------------------


def test_chained_cfg_one_link_t2v_v2v():
    neg, pos = _rand(seed=1), _rand(seed=2)
    w = 4.0
    expected = neg + w * (pos - neg)
    torch.testing.assert_close(chained_cfg([neg, pos], [w]), expected, rtol=1e-12, atol=1e-12)
    for mode in (GuidanceMode.T2V, GuidanceMode.V2V):
        out = Guidance(mode, eta=0.5, momentum=0.0, norm_threshold=50.0)(_rand(seed=3), [neg, pos], [w], None)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_chained_cfg_two_links_v2v_chain():
    e0, e_v, e_vti = _rand(seed=1), _rand(seed=2), _rand(seed=3)
    w_vid, w_txt = 1.25, 4.0
    expected = e0 + w_vid * (e_v - e0) + w_txt * (e_vti - e_v)
    torch.testing.assert_close(chained_cfg([e0, e_v, e_vti], [w_vid, w_txt]), expected, rtol=1e-12, atol=1e-12)
    guidance = Guidance(GuidanceMode.V2V_CHAIN, eta=0.5, momentum=0.0, norm_threshold=50.0)
    out = guidance(_rand(seed=4), [e0, e_v, e_vti], [w_vid, w_txt], None)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_chained_cfg_three_links_rv2v():
    e0, e_v, e_vi, e_vti = (_rand(seed=s) for s in (1, 2, 3, 4))
    w_vid, w_img, w_txt = 1.25, 4.5, 4.0
    expected = e0 + w_vid * (e_v - e0) + w_img * (e_vi - e_v) + w_txt * (e_vti - e_vi)
    out = chained_cfg([e0, e_v, e_vi, e_vti], [w_vid, w_img, w_txt])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    guidance = Guidance(GuidanceMode.RV2V, eta=0.5, momentum=0.0, norm_threshold=50.0)
    out = guidance(_rand(seed=5), [e0, e_v, e_vi, e_vti], [w_vid, w_img, w_txt], None)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# --- the APG operator N(d, r) (docs/design.md#apg) --------------------------------------------------------------------


def test_apg_norm_clamp_per_frame():
    scales = [0.05, 1.0, 3.0, 0.2]  # frame norms ~0.5, ~11, ~33, ~2 for 120 unit-variance entries
    d = _frame_scaled(1, scales)
    r = _rand(1, 4, 4, 5, 6, seed=2)
    tau = 5.0
    norms_before = [_frame_norm(d[0, :, t]) for t in range(4)]
    assert sum(n > tau for n in norms_before) == 2 and sum(n < tau for n in norms_before) == 2
    out = apg_project(d, r, eta=1.0, norm_threshold=tau)  # eta=1: d_orth + d_par = d, the clamp alone remains
    for t, n in enumerate(norms_before):
        if n > tau:
            assert _frame_norm(out[0, :, t]) == pytest.approx(tau, rel=1e-12)
            torch.testing.assert_close(out[0, :, t], d[0, :, t] * (tau / n), rtol=1e-12, atol=1e-12)
        else:
            torch.testing.assert_close(out[0, :, t], d[0, :, t], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, ref_apg_operator(d, r, eta=1.0, tau=tau), rtol=1e-12, atol=1e-12)


def test_apg_zero_threshold_disables_clamp():
    d = _frame_scaled(1, [0.05, 1.0, 30.0, 0.2])
    r = _rand(1, 4, 4, 5, 6, seed=2)
    out = apg_project(d, r, eta=1.0, norm_threshold=0.0)
    torch.testing.assert_close(out, d, rtol=1e-12, atol=1e-12)
    out = apg_project(d, r, eta=0.5, norm_threshold=0.0)
    torch.testing.assert_close(out, ref_apg_operator(d, r, eta=0.5, tau=0.0), rtol=1e-12, atol=1e-12)


def test_apg_projection_split_per_frame():
    d = _rand(seed=1)
    r = _frame_scaled(2, [1.0, 5.0, 0.1])
    d_orth = apg_project(d, r, eta=0.0, norm_threshold=0.0)
    d_par = d - d_orth
    for t in range(d.shape[2]):
        rf, of, pf = r[0, :, t], d_orth[0, :, t], d_par[0, :, t]
        # orthogonal part: zero inner product with the frame's reference
        assert abs(float((of * rf).sum())) < 1e-12 * _frame_norm(of) * _frame_norm(rf) + 1e-13
        # parallel part: |<d_par, r>| = ||d_par|| ||r||
        cos = float((pf * rf).sum()) / (_frame_norm(pf) * _frame_norm(rf))
        assert abs(cos) == pytest.approx(1.0, abs=1e-12)
        # the split matches an explicit per-frame projection
        r_unit = rf / _frame_norm(rf)
        torch.testing.assert_close(pf, float((d[0, :, t] * r_unit).sum()) * r_unit, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_orth, ref_apg_operator(d, r, eta=0.0, tau=0.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, 2.0])
def test_apg_eta_scales_parallel_part(eta):
    d, r = _rand(seed=1), _rand(seed=2)
    d_orth = ref_apg_operator(d, r, eta=0.0, tau=0.0)
    d_par = d - d_orth
    out = apg_project(d, r, eta=eta, norm_threshold=0.0)
    torch.testing.assert_close(out, d_orth + eta * d_par, rtol=1e-12, atol=1e-12)
    tau = 4.0
    torch.testing.assert_close(
        apg_project(d, r, eta=eta, norm_threshold=tau), ref_apg_operator(d, r, eta=eta, tau=tau), rtol=1e-12,
        atol=1e-12,
    )


def test_apg_reference_zero_frame_is_safe():
    d, r = _rand(seed=1), _rand(seed=2)
    r[0, :, 1] = 0.0  # ||r|| clamps at 1e-12: no parallel part in that frame, no NaN
    out = apg_project(d, r, eta=0.5, norm_threshold=0.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :, 1], d[0, :, 1], rtol=1e-12, atol=1e-12)


def test_momentum_buffer_recurrence():
    mu = -0.5
    ds = [_rand(seed=s) for s in (1, 2, 3)]
    buffer = MomentumBuffer(mu)
    expected, buf = [], torch.zeros(SHAPE, dtype=F64)
    for d in ds:
        buf = d + mu * buf
        expected.append(buf)
    for d, exp in zip(ds, expected):
        torch.testing.assert_close(buffer.update(d), exp, rtol=1e-12, atol=1e-12)
    # inside the operator the momentum comes first: with tau=0 and eta=1 the operator returns the buffer itself
    buffer, r = MomentumBuffer(mu), _rand(seed=9)
    for d, exp in zip(ds, expected):
        torch.testing.assert_close(apg_project(d, r, eta=1.0, norm_threshold=0.0, buffer=buffer), exp, rtol=1e-12,
                                   atol=1e-12)


def test_momentum_then_clamp_then_project():
    mu, tau, eta = -0.5, 6.0, 0.5
    ds = [_frame_scaled(s, [0.1, 1.0, 2.0]) for s in (1, 2, 3)]
    r = _rand(seed=7)
    buffer, ref_buffer = MomentumBuffer(mu), RefBuffer(mu)
    for d in ds:
        out = apg_project(d, r, eta=eta, norm_threshold=tau, buffer=buffer)
        torch.testing.assert_close(out, ref_apg_operator(ref_buffer(d), r, eta=eta, tau=tau), rtol=1e-12, atol=1e-12)


# --- chained APG (docs/design.md#apg) ---------------------------------------------------------------------------------


def _apg_inputs(n_branches, dtype, seed=0):
    latents = _rand(seed=seed, dtype=dtype)
    # frame scales so that some frame differences exceed the threshold and some do not
    outputs = [_frame_scaled(seed + 10 + k, [0.3, 1.0, 3.0], dtype=dtype) for k in range(n_branches)]
    sigma = torch.tensor(0.7, dtype=torch.float32)  # 0-dim float32, as the pipeline passes scheduler.sigmas[i]
    return latents, outputs, sigma


@pytest.mark.parametrize("mode", [GuidanceMode.T2V_APG, GuidanceMode.V2V_APG])
@pytest.mark.parametrize("momentum", [0.0, -0.5])
def test_chained_apg_one_link(mode, momentum):
    eta, tau, w = 0.5, 8.0, 4.0
    assert GUIDANCE_SPECS[mode].weights == ("omega_txt",)
    guidance = Guidance(mode, eta=eta, momentum=momentum, norm_threshold=tau)
    guidance64 = Guidance(mode, eta=eta, momentum=momentum, norm_threshold=tau)
    ref_buffers = [RefBuffer(momentum) if momentum else None]
    for step in range(3):
        latents, outputs, sigma = _apg_inputs(2, torch.float32, seed=10 * step)
        expected = ref_chained_apg(latents, outputs, [w], sigma, eta=eta, taus=[tau], buffers=ref_buffers)
        out = guidance(latents, outputs, [w], sigma)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        # float64 inputs: the math runs in float64; the result goes to the scheduler as float32 (docs/design.md#apg),
        # so it must be the float64 reference rounded to float32 (within one float32 ulp).
        out64 = guidance64(latents.double(), [o.double() for o in outputs], [w], sigma)
        assert out64.dtype == torch.float32
        torch.testing.assert_close(out64, expected.float(), rtol=1.2e-7, atol=1e-10)


@pytest.mark.parametrize("momentum", [0.0, -0.5])
def test_chained_apg_r2v_two_links(momentum):
    eta, taus, weights = 0.5, (8.0, 5.0), (4.5, 4.0)
    guidance = Guidance(GuidanceMode.R2V_APG, eta=eta, momentum=momentum, norm_threshold=list(taus))
    assert guidance.norm_thresholds == list(taus)
    ref_buffers = [RefBuffer(momentum), RefBuffer(momentum)] if momentum else [None, None]
    for step in range(3):
        latents, outputs, sigma = _apg_inputs(3, torch.float32, seed=10 * step + 1)
        expected = ref_chained_apg(latents, outputs, weights, sigma, eta=eta, taus=taus, buffers=ref_buffers)
        out = guidance(latents, outputs, list(weights), sigma)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_chained_apg_function_float64():
    eta, taus, weights = 0.5, (8.0, 5.0), (4.5, 4.0)
    latents, outputs, sigma = _apg_inputs(3, F64, seed=3)
    expected = ref_chained_apg(latents, outputs, weights, sigma, eta=eta, taus=taus, buffers=[None, None])
    out = chained_apg(latents, outputs, weights, sigma, eta=eta, norm_thresholds=taus, buffers=[None, None])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected.float(), rtol=1.2e-7, atol=1e-10)
    # the guided x0 recovered from the float64 chain, before the final float32 cast
    x0 = [latents - sigma * v for v in outputs]
    assert x0[0].dtype == F64
    guided = x0[0]
    for k, w in enumerate(weights):
        guided = guided + w * apg_project(x0[k + 1] - x0[k], x0[k + 1], eta=eta, norm_threshold=taus[k])
    torch.testing.assert_close((latents - guided) / sigma, expected, rtol=1e-10, atol=1e-10)


def test_r2v_apg_buffers_are_separate():
    """With momentum, each link keeps its own buffer: a shared buffer would give a different second step."""
    eta, taus, weights, mu = 0.5, (0.0, 0.0), (4.5, 4.0), -0.5
    guidance = Guidance(GuidanceMode.R2V_APG, eta=eta, momentum=mu, norm_threshold=0.0)
    assert len(guidance.buffers) == 2 and guidance.buffers[0] is not guidance.buffers[1]
    ref_buffers = [RefBuffer(mu), RefBuffer(mu)]
    for step in range(2):
        latents, outputs, sigma = _apg_inputs(3, torch.float32, seed=step + 5)
        expected = ref_chained_apg(latents, outputs, weights, sigma, eta=eta, taus=taus, buffers=ref_buffers)
        torch.testing.assert_close(guidance(latents, outputs, list(weights), sigma).double(), expected, rtol=1e-5,
                                   atol=1e-5)


# --- the Guidance class -------------------------------------------------------------------------------------------


def test_single_threshold_serves_every_link():
    guidance = Guidance(GuidanceMode.R2V_APG, eta=0.5, momentum=0.0, norm_threshold=3.0)
    assert guidance.norm_thresholds == [3.0, 3.0]
    latents, outputs, sigma = _apg_inputs(3, torch.float32, seed=2)
    expected = ref_chained_apg(latents, outputs, [4.5, 4.0], sigma, eta=0.5, taus=[3.0, 3.0], buffers=[None, None])
    torch.testing.assert_close(guidance(latents, outputs, [4.5, 4.0], sigma).double(), expected, rtol=1e-5, atol=1e-5)
    assert Guidance(GuidanceMode.T2V_APG, eta=0.5, momentum=0.0, norm_threshold=7).norm_thresholds == [7.0]
    assert Guidance(GuidanceMode.R2V_APG, eta=0.5, momentum=0.0, norm_threshold=[2.0]).norm_thresholds == [2.0, 2.0]


def test_threshold_list_gives_one_per_link():
    guidance = Guidance(GuidanceMode.R2V_APG, eta=0.5, momentum=0.0, norm_threshold=[3.0, 9.0])
    assert guidance.norm_thresholds == [3.0, 9.0]
    latents, outputs, sigma = _apg_inputs(3, torch.float32, seed=4)
    expected = ref_chained_apg(latents, outputs, [4.5, 4.0], sigma, eta=0.5, taus=[3.0, 9.0], buffers=[None, None])
    torch.testing.assert_close(guidance(latents, outputs, [4.5, 4.0], sigma).double(), expected, rtol=1e-5, atol=1e-5)
    # the CLI's three values: only the first (one link) or the first two (two links) are read
    assert Guidance(GuidanceMode.T2V_APG, eta=0.5, momentum=0.0, norm_threshold=(5, 6, 7)).norm_thresholds == [5.0]
    assert Guidance(GuidanceMode.R2V_APG, eta=0.5, momentum=0.0, norm_threshold=(5, 6, 7)).norm_thresholds == [5, 6]


def test_momentum_persists_across_calls_and_is_per_instance():
    mu = -0.5
    steps = [_apg_inputs(2, torch.float32, seed=s) for s in (1, 2, 3)]
    first = Guidance(GuidanceMode.T2V_APG, eta=0.5, momentum=mu, norm_threshold=0.0)
    ref_buffers = [RefBuffer(mu)]
    results = []
    for latents, outputs, sigma in steps:
        expected = ref_chained_apg(latents, outputs, [4.0], sigma, eta=0.5, taus=[0.0], buffers=ref_buffers)
        results.append(first(latents, outputs, [4.0], sigma))
        torch.testing.assert_close(results[-1].double(), expected, rtol=1e-5, atol=1e-5)
    # the buffer really carried over: the third step differs from a momentum-free one
    no_momentum = Guidance(GuidanceMode.T2V_APG, eta=0.5, momentum=0.0, norm_threshold=0.0)(*steps[2][:2], [4.0],
                                                                                            steps[2][2])
    assert not torch.allclose(results[2], no_momentum, atol=1e-3)
    # a new instance starts from zero: its first call equals a momentum-free call
    fresh = Guidance(GuidanceMode.T2V_APG, eta=0.5, momentum=mu, norm_threshold=0.0)
    torch.testing.assert_close(fresh(*steps[2][:2], [4.0], steps[2][2]), no_momentum, rtol=0, atol=0)
    torch.testing.assert_close(
        Guidance(GuidanceMode.T2V_APG, eta=0.5, momentum=mu, norm_threshold=0.0)(*steps[0][:2], [4.0], steps[0][2]),
        results[0], rtol=0, atol=0,
    )


# --- dtypes (docs/design.md#dtypes) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(GuidanceMode))
def test_dtypes_with_bf16_branches(mode):
    spec = GUIDANCE_SPECS[mode]
    n = len(spec.branches)
    latents = _rand(seed=1, dtype=torch.float32)
    outputs = [_rand(seed=2 + k, dtype=torch.bfloat16) for k in range(n)]
    weights = [1.25, 4.5, 4.0][-(n - 1):]
    sigma = torch.tensor(0.6, dtype=torch.float32)
    out = Guidance(mode, eta=0.5, momentum=0.0, norm_threshold=50.0)(latents, outputs, weights, sigma)
    if spec.apg:
        assert out.dtype == torch.float32
    else:
        assert out.dtype == torch.bfloat16
        expected = outputs[0].double()
        for w, prev, cur in zip(weights, outputs[:-1], outputs[1:]):
            expected = expected + w * (cur.double() - prev.double())
        torch.testing.assert_close(out.double(), expected, rtol=0.05, atol=0.15)


# --- the mode table (docs/design.md#modes) ----------------------------------------------------------------------------

_N, _P = False, True
EXPECTED_MODES = {
    "t2v": ([(Combo.NONE, _N), (Combo.NONE, _P)], ("omega_txt",), False),
    "t2v_apg": ([(Combo.NONE, _N), (Combo.NONE, _P)], ("omega_txt",), True),
    "v2v": ([(Combo.VI, _N), (Combo.VI, _P)], ("omega_txt",), False),
    "v2v_apg": ([(Combo.VI, _N), (Combo.VI, _P)], ("omega_txt",), True),
    "v2v_chain": ([(Combo.NONE, _N), (Combo.V, _N), (Combo.VI, _P)], ("omega_vid", "omega_txt"), False),
    "r2v_apg": ([(Combo.NONE, _N), (Combo.I, _N), (Combo.I, _P)], ("omega_img", "omega_txt"), True),
    "rv2v": (
        [(Combo.NONE, _N), (Combo.V, _N), (Combo.VI, _N), (Combo.VI, _P)],
        ("omega_vid", "omega_img", "omega_txt"),
        False,
    ),
}
FORWARDS = {"t2v": 2, "t2v_apg": 2, "v2v": 2, "v2v_apg": 2, "v2v_chain": 3, "r2v_apg": 3, "rv2v": 4}


def test_mode_table_covers_every_mode():
    assert {m.value for m in GUIDANCE_SPECS} == set(EXPECTED_MODES) == {m.value for m in GuidanceMode}


@pytest.mark.parametrize("mode", sorted(EXPECTED_MODES))
def test_mode_table(mode):
    spec = GUIDANCE_SPECS[GuidanceMode(mode)]
    branches, weights, apg = EXPECTED_MODES[mode]
    assert spec.forwards_per_step == FORWARDS[mode] == len(spec.branches)
    assert list(spec.branches) == [Branch(c, p) for c, p in branches]
    assert spec.weights == weights
    assert spec.apg is apg


# --- the schedule, the expert switch and omega_scale (docs/design.md#scheduler-and-expert-switch) ---------------------


def _timesteps(pipe, shift, steps):
    scheduler = pipe._scheduler_for_call(shift)
    scheduler.set_timesteps(sigmas=official_flow_sigmas(steps))
    return scheduler


def test_official_six_step_timesteps(tiny_pipe):
    assert _timesteps(tiny_pipe, 5.0, 6).timesteps.tolist() == [999, 961, 908, 833, 713, 499]


def test_official_forty_step_sigmas(tiny_pipe):
    scheduler = _timesteps(tiny_pipe, 5.0, 40)
    s = 0.999 * (40 - np.arange(40)) / 40
    sigma = 5.0 * s / (1 + 4.0 * s)
    assert scheduler.timesteps.tolist() == (sigma * 1000).astype(np.int64).tolist()
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), sigma.astype(np.float32), rtol=1e-6)
    assert float(scheduler.sigmas[-1]) == 0.0


OMEGAS = {"omega_vid": 1.25, "omega_img": 4.5, "omega_txt": 4.0}


@pytest.mark.parametrize(("shift", "n_high"), [(5.0, 17), (3.0, 12)])
def test_expert_switch_and_omega_scale(tiny_pipe, shift, n_high):
    timesteps = _timesteps(tiny_pipe, shift, 40).timesteps.tolist()
    plan = tiny_pipe.plan_steps(timesteps, dict(OMEGAS), 0.8, 1000)
    assert len(plan) == 40
    experts = [expert for expert, _ in plan]
    assert experts == [0] * n_high + [1] * (40 - n_high)
    assert all(t >= 875 for t in timesteps[:n_high]) and all(t < 875 for t in timesteps[n_high:])
    if shift == 5.0:
        assert timesteps[0] == 999 and timesteps[16] == 882 and timesteps[17] == 870
    for i, (_, omegas) in enumerate(plan):
        if i < n_high:
            assert omegas == OMEGAS
        else:  # scaled once at the first low-noise step, not compounding
            assert omegas == {name: value * 0.8 for name, value in OMEGAS.items()}
    assert plan[-1][1]["omega_txt"] == 0.8 * 4.0


def test_single_expert_never_switches_or_rescales(tiny_pipe_1p3b):
    timesteps = _timesteps(tiny_pipe_1p3b, 5.0, 40).timesteps.tolist()
    plan = tiny_pipe_1p3b.plan_steps(timesteps, dict(OMEGAS), 0.8, 1000)
    assert [expert for expert, _ in plan] == [0] * 40
    assert all(omegas == OMEGAS for _, omegas in plan)


# --- the pipeline's loop applies guidance as specified ------------------------------------------------------------

PROMPT = "a red fox runs through snow"


@torch.no_grad()
def _hand_loop(pipe, latents, combine, steps=2, omega_txt=4.0, omega_scale=0.8):
    """The denoising loop written out: both text branches, guidance combined here, a fresh scheduler stepped."""
    dtype = pipe.transformer.dtype
    device = torch.device("cpu")
    positive = positive_text(PROMPT, TaskType.T2V, None)
    pos_embeds, neg_embeds = pipe.encode_prompt(
        positive, DEFAULT_NEGATIVE_PROMPT, device=device, dtype=dtype, task_type=None  # the prefix is in `positive`
    )
    scheduler = pipe._scheduler_for_call(5.0)
    scheduler.set_timesteps(sigmas=official_flow_sigmas(steps))
    scheduler.set_begin_index(0)
    x = latents.clone()
    history = []
    scaled = False
    for i, t in enumerate(scheduler.timesteps):
        low = int(t) < 875
        model = pipe.transformer_2 if low else pipe.transformer
        w = omega_txt * omega_scale if low else omega_txt
        scaled = scaled or low
        kwargs = dict(hidden_states=x.to(dtype), timestep=t.expand(1), return_dict=False)
        neg = model(encoder_hidden_states=neg_embeds, **kwargs)[0]
        pos = model(encoder_hidden_states=pos_embeds, **kwargs)[0]
        sigma = scheduler.sigmas[i]
        v = combine(x, neg, pos, w, sigma)
        x = scheduler.step(v, t, x, return_dict=False)[0]
        history.append(x.clone())
    assert scaled  # the two steps cross the boundary (t = 999, then 833): both experts are exercised
    return x, history


def _run_pipe(pipe, mode, latents, steps=2, callback=None):
    out = pipe(
        PROMPT,
        task_type="t2v",
        guidance_mode=mode,
        num_frames=5,
        height=32,
        width=48,
        num_inference_steps=steps,
        latents=latents.clone(),
        output_type="latent",
        callback_on_step_end=callback,
    )
    return out.frames


def _initial_latents():
    return torch.randn((1, 16, 2, 4, 6), generator=torch.Generator().manual_seed(123), dtype=torch.float32)


def _cfg(x, neg, pos, w, sigma):
    return neg + w * (pos - neg)


def _apg(x, neg, pos, w, sigma):
    """t2v_apg in float64: agrees with the pipeline's float32 x-space arithmetic to float32 rounding only."""
    return ref_chained_apg(x, [neg, pos], [w], sigma, eta=0.5, taus=[50.0], buffers=[None]).float()


def _apg_float32_path(x, neg, pos, w, sigma, eta=0.5, tau=50.0):
    """t2v_apg at the precision docs/design.md#dtypes and #apg prescribe: x0, the difference, the clamp and the chain
    in float32 (sigma a 0-dim float32 tensor), only the per-frame projection in float64, cast back before
    `d_orth + eta*d_par`."""
    x0_u, x0_c = x - sigma * neg, x - sigma * pos
    d = x0_c - x0_u
    out = torch.empty_like(d)
    for t in range(d.shape[2]):
        df = d[0, :, t]
        if tau > 0:
            n = torch.sqrt((df * df).sum())
            df = df * torch.clamp(tau / n, max=1.0)
        d64, r64 = df.double(), x0_c[0, :, t].double()
        r_unit = r64 / max(_frame_norm(r64), 1e-12)
        par = (d64 * r_unit).sum() * r_unit
        out[0, :, t] = (d64 - par).float() + eta * par.float()
    return ((x - (x0_u + w * out)) / sigma).float()


def _run_with_callback(pipe, mode, latents):
    recorded = []

    def callback(pipe, i, t, callback_kwargs):
        recorded.append((i, int(t), callback_kwargs["latents"].clone()))
        return {}

    result = _run_pipe(pipe, mode, latents, callback=callback)
    assert [(i, t) for i, t, _ in recorded] == [(0, 999), (1, 833)]  # high expert, then low expert
    return result, [x for _, _, x in recorded]


def test_pipeline_loop_t2v_cfg(tiny_pipe):
    latents = _initial_latents()
    result, recorded = _run_with_callback(tiny_pipe, "t2v", latents)
    expected, history = _hand_loop(tiny_pipe, latents, _cfg)
    for got, exp in zip(recorded, history):  # after every step, via callback_on_step_end
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-6)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)


def test_pipeline_loop_t2v_apg(tiny_pipe):
    latents = _initial_latents()
    result, recorded = _run_with_callback(tiny_pipe, "t2v_apg", latents)
    expected, history = _hand_loop(tiny_pipe, latents, _apg_float32_path)
    for got, exp in zip(recorded, history):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-6)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)
    # the float64 reference: float32 x-space rounding (~1e-6 per step, over 1/sigma) is the only difference
    expected64, _ = _hand_loop(tiny_pipe, latents, _apg)
    torch.testing.assert_close(result, expected64, rtol=0, atol=1e-5)
    # CFG and APG really differ on these inputs, so the check above tells them apart
    cfg_expected, _ = _hand_loop(tiny_pipe, latents, _cfg)
    assert not torch.allclose(cfg_expected, result, atol=1e-4)
