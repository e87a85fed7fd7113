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


def scheduler_for_call(scheduler, use_unipc: bool, flow_shift: float):
    """A fresh scheduler for one call with this call's `flow_shift`: `scheduler`'s class and config (UniPC), or the
    official Euler fallback (`use_unipc=False`). The pipeline's own scheduler is never changed."""
    if not use_unipc:
        return FlowMatchEulerScheduler(num_train_timesteps=scheduler.config.num_train_timesteps, shift=flow_shift)
    config = dict(scheduler.config)
    shift_key = "flow_shift" if "flow_shift" in config else "shift"
    return type(scheduler).from_config(config, **{shift_key: flow_shift})


def set_official_timesteps(scheduler, num_inference_steps: int, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Set the official sigma grid of `scheduler` (Euler or flow-sigma UniPC; another scheduler's own grid), starting
    at step 0. Returns its timesteps and its sigmas as 0-dim float32 tensors."""
    if isinstance(scheduler, FlowMatchEulerScheduler):
        scheduler.set_timesteps(sigmas=official_euler_sigmas(num_inference_steps), device=device)
    elif scheduler.config.get("use_flow_sigmas", False):
        scheduler.set_timesteps(sigmas=official_flow_sigmas(num_inference_steps), device=device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
    scheduler.set_begin_index(0)
    return scheduler.timesteps, list(scheduler.sigmas.to(torch.float32).unbind(0))
