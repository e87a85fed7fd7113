"""The denoising loop of `BerniniPipeline`: which expert and guidance weights each step uses, every branch's
forward (shared where branches coincide, dealt out under branch parallelism), context windows blended into one
prediction, and the loop itself with its on-device non-finite check."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .conditions import WindowBranches, _Conditions
from .transformer_bernini import BerniniTransformer3DModel


class BerniniDenoisingMixin:
    """The denoising steps of `BerniniPipeline` (it provides the experts, `config.boundary_ratio`, the progress bar,
    `_parallel_state` and the call's `interrupt`)."""

    def plan_steps(
        self, timesteps: list[int], omegas: dict[str, float], omega_scale: float, num_train_timesteps: int
    ) -> list[tuple[int, dict[str, float]]]:
        """Per step: which expert (0 high, 1 low) and which guidance weights, decided before the loop.

        `t >= boundary` (on the integer timestep) uses the high-noise expert. At the first low-noise step the weights
        are multiplied by `omega_scale`, once; they stay scaled to the end. A single expert never rescales. Without a
        high-noise expert (`transformer=None`, `boundary_ratio >= 1`) every step is a low-noise step.
        """
        two_experts = self.transformer_2 is not None and self.config.boundary_ratio is not None
        boundary = self.config.boundary_ratio * num_train_timesteps if two_experts else None
        if two_experts and self.transformer is None:
            boundary = math.inf  # a timestep of exactly 1000 (the Euler fallback's first) stays on `transformer_2`
        plan, scaled = [], False
        for t in timesteps:
            expert = 1 if two_experts and t < boundary else 0
            if expert == 1 and not scaled:
                omegas = {name: value * omega_scale for name, value in omegas.items()}
                scaled = True
            plan.append((expert, omegas))
        return plan

    def predict_branches(
        self,
        model: BerniniTransformer3DModel,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        branches: Sequence[tuple[_Conditions, bool]],
        branch_keys: Sequence[tuple],
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        attention_kwargs: dict[str, Any] | None = None,
        branch_names: Sequence[str] | None = None,
        cache_context_kwargs: dict[str, Any] | None = None,
    ) -> list[torch.Tensor]:
        """One step's prediction of every guidance branch, in branch order.

        Branches with the same key (identical conditions and text, e.g. V == none without a video) share one forward.
        Under branch parallelism the distinct forwards are dealt to the branch groups and exchanged, so every process
        returns all of them.

        Each forward runs inside `model.cache_context(name, **cache_context_kwargs)`, `name` being the first of its
        branches' `branch_names` (by default `"branch<i>"`), so that diffusers' cache hooks keep one state per branch.
        """
        names = list(branch_names) if branch_names is not None else [f"branch{i}" for i in range(len(branches))]
        forwards: dict[tuple, Callable[[], torch.Tensor]] = {}
        for (conditions, positive), key, name in zip(branches, branch_keys, names):
            if key in forwards:
                continue

            def forward(conditions=conditions, positive=positive, name=name) -> torch.Tensor:
                with model.cache_context(name, **(cache_context_kwargs or {})):
                    return model(
                        hidden_states=latents,
                        timestep=timestep,
                        encoder_hidden_states=prompt_embeds if positive else negative_prompt_embeds,
                        condition_latents=conditions.latents or None,
                        condition_source_ids=conditions.ids or None,
                        attention_kwargs=attention_kwargs,
                        return_dict=False,
                    )[0]

            forwards[key] = forward
        if self._parallel_state is None:
            outputs = [forward() for forward in forwards.values()]
        else:
            outputs = self._parallel_state.run_branches(list(forwards.values()), like=latents, model=model)
        by_key = dict(zip(forwards, outputs))
        return [by_key[key] for key in branch_keys]

    def _predict_step(
        self, model: BerniniTransformer3DModel, latents: torch.Tensor, t: torch.Tensor, weights: dict[str, float],
        sigma: torch.Tensor, per_window: list[WindowBranches], blend: torch.Tensor, prompt_embeds,
        negative_prompt_embeds, attention_kwargs, cache_kwargs: dict[str, Any], dtype: torch.dtype,
    ) -> torch.Tensor:
        """One step's guided prediction of the whole clip. With context windows every window is guided on its own,
        then the guided predictions are blended (weights summing to one per latent frame) into one prediction."""
        timestep = t.expand(latents.shape[0])
        link_weights = [weights[name] for name in per_window[0].guidance.spec.weights]
        if len(per_window) == 1:
            window = per_window[0]
            branch_outputs = self.predict_branches(
                model, latents.to(dtype), timestep, window.branches, window.keys, prompt_embeds,
                negative_prompt_embeds, attention_kwargs, window.names, cache_context_kwargs=cache_kwargs,
            )
            return window.guidance(latents, branch_outputs, link_weights, sigma)
        noise_pred = torch.zeros_like(latents)
        for j, window in enumerate(per_window):
            start, end = window.span
            clip = latents[:, :, start:end].contiguous()
            branch_outputs = self.predict_branches(
                model, clip.to(dtype), timestep, window.branches, window.keys, prompt_embeds,
                negative_prompt_embeds, attention_kwargs, window.names, cache_context_kwargs=cache_kwargs,
            )
            prediction = window.guidance(clip, branch_outputs, link_weights, sigma)
            noise_pred[:, :, start:end] += blend[j, start:end].view(1, 1, -1, 1, 1) * prediction.float()
        return noise_pred

    def denoise(
        self, latents: torch.Tensor, scheduler, plan: list[tuple[int, dict[str, float]]],
        per_window: list[WindowBranches], blend: torch.Tensor, prompt_embeds, negative_prompt_embeds,
        attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs: list[str], dtype: torch.dtype,
        start: int = 0, stop: int | None = None, progress_bar=None,
    ) -> tuple[torch.Tensor, int | None, list[str]]:
        """Step 7, the denoising loop: each step's expert and weights come from `plan`, decided before it.

        Guidance reduces per sample (APG norms over each video's frames), so the batch's videos never mix. Returns the
        final latents, the first step whose latents were not finite (`None` when all were: it is recorded on the
        device and read once, after the loop) and the causes the loop adds to a non-finite result. `start`/`stop` run
        only those steps (an expert-major batch runs each expert's steps for every case in turn); the scheduler keeps
        its own history between the parts.
        """
        timesteps, experts = scheduler.timesteps, (self.transformer, self.transformer_2)
        sigmas = list(scheduler.sigmas.to(torch.float32).unbind(0))  # 0-dim float32 tensors
        stop = len(timesteps) if stop is None else stop
        # Cache hooks start clean even when an earlier call stopped on an error before its reset.
        for expert in (e for e in experts if e is not None and start == 0):
            expert._reset_stateful_cache()
        # The first step whose latents hold a NaN/inf, kept on the device (no host sync per step); `len(timesteps)`
        # while all are finite (docs/design.md#non-finite-results).
        first_bad = torch.full((), len(timesteps), dtype=torch.long, device=latents.device)
        replaced_latents = False
        # A call's parts share the call's bar (`progress_bar`); on its own the loop opens one for its steps.
        bar = self.progress_bar(total=stop - start) if progress_bar is None else contextlib.nullcontext(progress_bar)
        with bar as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt or not start <= i < stop:
                    continue
                self._current_timestep = t
                expert_index, weights = plan[i]
                cache_kwargs = {"step_index": i, "sigma": sigmas[i], "num_inference_steps": len(timesteps)}
                noise_pred = self._predict_step(
                    experts[expert_index], latents, t, weights, sigmas[i], per_window, blend, prompt_embeds,
                    negative_prompt_embeds, attention_kwargs, cache_kwargs, dtype,
                )
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    tensors = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    returned = callback_outputs.pop("latents", latents)
                    replaced_latents |= returned is not latents
                    latents = returned
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                first_bad = torch.minimum(first_bad, torch.where(torch.isfinite(latents).all(), len(timesteps), i))
                progress_bar.update()
        self._current_timestep = None
        bad_step = int(first_bad)  # the check's one host sync, after the loop
        causes = ["the latents returned by callback_on_step_end"] if replaced_latents else []
        return latents, (bad_step if bad_step < len(timesteps) else None), causes

    def _non_finite_message(self, step: int, num_steps: int, plan, given: list[str], causes: list[str]) -> str:
        """The one-line message of a `NonFiniteOutputError`: where the latents went bad and what likely caused it."""
        names = ("transformer", "transformer_2")
        experts = (self.transformer, self.transformer_2)
        adapters = sorted({a for e in experts for a in (getattr(e, "peft_config", None) or {})})
        likely = [f"a LoRA ({', '.join(adapters)}): try the call without it"] if adapters else []
        likely += ([f"the given {', '.join(given)}"] if given else []) + causes
        likely.append(
            "a guidance setting (omega_*, omega_scale, eta, momentum, norm_threshold, flow_shift) too large for the "
            f"experts' dtype ({self._first_expert().dtype}), or non-finite expert weights"
        )
        return (
            f"The denoising produced non-finite latents (NaN or inf) at step {step + 1} of {num_steps} "
            f"({names[plan[step][0]]}); nothing was decoded or written. Likely cause: {'; or '.join(likely)}."
        )
