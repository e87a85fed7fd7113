"""The renderer's samplers: UniPC on the official flow sigmas (the default) and the official Euler fallback.

The scheduler config shipped with the package (`scheduler_config/scheduler_config.json`) is the default scheduler
of every load and export; the sigma grids are the official ones, which diffusers 0.42 computes differently.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteSchedulerOutput,
)


def default_scheduler() -> UniPCMultistepScheduler:
    """The renderer's sampler: UniPC (order 2, bh2) on flow sigmas, from the config shipped with the package."""
    config = json.loads(resources.files(__package__).joinpath("scheduler_config/scheduler_config.json").read_text())
    return UniPCMultistepScheduler.from_config(config)


def official_flow_sigmas(num_inference_steps: int) -> np.ndarray:
    """The official (diffusers 0.35) unshifted flow sigmas `0.999 * (N - i) / N`; diffusers 0.42 uses another grid."""
    n = num_inference_steps
    return 0.999 * (n - np.arange(n)) / n


def official_euler_sigmas(num_inference_steps: int) -> np.ndarray:
    """The unshifted sigmas of the official Euler fallback: `linspace(1, 0.003 / 1.002, N)` in float32, as upstream."""
    return torch.linspace(1.0, 0.003 / 1.002, num_inference_steps, dtype=torch.float32).numpy()


class FlowMatchEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """diffusers' flow-matching Euler sampler with the official update `x + v * (sigma_next - sigma)` kept in float32.

    diffusers casts the updated sample back to the model output's dtype, which is bf16 under the CFG modes with bf16
    experts; the official fallback keeps the sample in float32. Used when `use_unipc` is off (`--no-use_unipc`).
    """

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **kwargs):
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        # A 0-dim float32 factor leaves a bf16 product in bf16, as upstream; the sum is float32.
        prev_sample = sample.float() + model_output * (sigma_next - sigma)
        self._step_index += 1
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)
