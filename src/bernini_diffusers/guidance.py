"""Guidance of the Bernini-R renderer (docs/design.md#guidance) as pure tensor functions.

The denoising loop only chooses which branches to run; these functions combine the branch outputs. The only state
is the APG momentum buffer, created per call (one per APG link) and kept across steps and the expert switch.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .tasks import GuidanceMode

# APG reduces per latent frame over (C, H, W) of a [B, C, T, H, W] tensor.
APG_DIMS = (-1, -2, -4)


class Combo(enum.Enum):
    """Which clean condition streams a branch sees (docs/design.md#combos)."""

    NONE = "none"  # target only
    V = "v"  # the first video (source id 1)
    I = "i"  # noqa: E741 - the reference images alone (ids 1..n)
    VI = "vi"  # every video, then `image`, then `images`


@dataclass(frozen=True)
class Branch:
    combo: Combo
    positive: bool  # positive (system prefix + prompt) or negative text


@dataclass(frozen=True)
class GuidanceSpec:
    """A chain `b0 + w1*(b1-b0) + w2*(b2-b1) + ...` over `branches`, in velocity space or (APG) in x0 space."""

    branches: tuple[Branch, ...]
    weights: tuple[str, ...]  # the omega name of each link, len(branches) - 1
    apg: bool

    @property
    def forwards_per_step(self) -> int:
        return len(self.branches)


_NEG, _POS = False, True
GUIDANCE_SPECS: dict[GuidanceMode, GuidanceSpec] = {
    GuidanceMode.T2V: GuidanceSpec((Branch(Combo.NONE, _NEG), Branch(Combo.NONE, _POS)), ("omega_txt",), False),
    GuidanceMode.V2V: GuidanceSpec((Branch(Combo.VI, _NEG), Branch(Combo.VI, _POS)), ("omega_txt",), False),
    GuidanceMode.V2V_CHAIN: GuidanceSpec(
        (Branch(Combo.NONE, _NEG), Branch(Combo.V, _NEG), Branch(Combo.VI, _POS)), ("omega_vid", "omega_txt"), False
    ),
    GuidanceMode.RV2V: GuidanceSpec(
        (Branch(Combo.NONE, _NEG), Branch(Combo.V, _NEG), Branch(Combo.VI, _NEG), Branch(Combo.VI, _POS)),
        ("omega_vid", "omega_img", "omega_txt"),
        False,
    ),
    GuidanceMode.T2V_APG: GuidanceSpec((Branch(Combo.NONE, _NEG), Branch(Combo.NONE, _POS)), ("omega_txt",), True),
    GuidanceMode.V2V_APG: GuidanceSpec((Branch(Combo.VI, _NEG), Branch(Combo.VI, _POS)), ("omega_txt",), True),
    GuidanceMode.R2V_APG: GuidanceSpec(
        (Branch(Combo.NONE, _NEG), Branch(Combo.I, _NEG), Branch(Combo.I, _POS)), ("omega_img", "omega_txt"), True
    ),
}


class MomentumBuffer:
    """APG momentum: `buf <- d + momentum * buf`, starting from zero."""

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.running_average: torch.Tensor | float = 0.0

    def update(self, value: torch.Tensor) -> torch.Tensor:
        self.running_average = value + self.momentum * self.running_average
        return self.running_average


def chained_cfg(outputs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """`o0 + w1*(o1-o0) + w2*(o2-o1) + ...` in the outputs' dtype (bf16 for bf16 experts, as upstream)."""
    result = outputs[0]
    for weight, previous, current in zip(weights, outputs[:-1], outputs[1:]):
        result = result + weight * (current - previous)
    return result


def apg_project(
    diff: torch.Tensor,
    reference: torch.Tensor,
    *,
    eta: float,
    norm_threshold: float,
    buffer: MomentumBuffer | None = None,
) -> torch.Tensor:
    """The APG operator N(d, r): momentum, per-frame norm clamp, then `d_orth + eta * d_par` w.r.t. `reference`."""
    if buffer is not None:
        diff = buffer.update(diff)
    if norm_threshold > 0:
        norm = torch.linalg.vector_norm(diff, ord=2, dim=APG_DIMS, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(norm), norm_threshold / norm)
    dtype = diff.dtype
    # The projection runs in float64, as upstream.
    diff64, ref64 = diff.double(), reference.double()
    ref_unit = ref64 / torch.linalg.vector_norm(ref64, ord=2, dim=APG_DIMS, keepdim=True).clamp_min(1e-12)
    parallel = (diff64 * ref_unit).sum(dim=APG_DIMS, keepdim=True) * ref_unit
    orthogonal = diff64 - parallel
    return orthogonal.to(dtype) + eta * parallel.to(dtype)


def x0_from_velocity(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    # sigma is a 0-dim fp32 tensor: `sigma * velocity` stays in the velocity's dtype, the difference is fp32.
    return latents - sigma * velocity


def chained_apg(
    latents: torch.Tensor,
    outputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    sigma: torch.Tensor,
    *,
    eta: float,
    norm_thresholds: Sequence[float],
    buffers: Sequence[MomentumBuffer | None],
) -> torch.Tensor:
    """APG chain in x0 space, returned as a float32 velocity `(x_t - x_g) / sigma` for the scheduler."""
    x0 = [x0_from_velocity(latents, v, sigma) for v in outputs]
    guided = x0[0]
    for k, (weight, previous, current) in enumerate(zip(weights, x0[:-1], x0[1:])):
        delta = apg_project(
            current - previous, current, eta=eta, norm_threshold=norm_thresholds[k], buffer=buffers[k]
        )
        guided = guided + weight * delta
    return ((latents - guided) / sigma).float()


class Guidance:
    """One call's guidance: the mode's spec plus its per-call state (the APG momentum buffers)."""

    def __init__(self, mode: GuidanceMode, *, eta: float, momentum: float, norm_threshold: float | Sequence[float]):
        self.mode = mode
        self.spec = GUIDANCE_SPECS[mode]
        self.eta = eta
        links = len(self.spec.weights)
        thresholds = [norm_threshold] if isinstance(norm_threshold, (int, float)) else list(norm_threshold)
        if not thresholds:
            raise ValueError("`norm_threshold` must hold at least one value.")
        # A single threshold serves every link, as upstream expands (x,) to [x, x].
        self.norm_thresholds = [float(thresholds[min(k, len(thresholds) - 1)]) for k in range(links)]
        self.buffers = [MomentumBuffer(momentum) if momentum != 0 else None for _ in range(links)]

    def __call__(
        self,
        latents: torch.Tensor,
        outputs: Sequence[torch.Tensor],
        weights: Sequence[float],
        sigma: torch.Tensor,
    ) -> torch.Tensor:
        if not self.spec.apg:
            return chained_cfg(outputs, weights)
        return chained_apg(
            latents, outputs, weights, sigma, eta=self.eta, norm_thresholds=self.norm_thresholds, buffers=self.buffers
        )
