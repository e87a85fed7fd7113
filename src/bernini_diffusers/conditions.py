"""The condition streams of a call: which media a guidance mode reads, their latents grouped into the combos of its
branches (with source ids), the cache name of each branch, and the per-window branches of a windowed call
(docs/design.md#combos, docs/design.md#long-videos).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import windows
from .guidance import GUIDANCE_SPECS, Branch, Combo, Guidance
from .tasks import GuidanceMode
from .transformer_bernini import assign_source_ids


@dataclass
class _Conditions:
    """Clean condition latents of one combo, in sequence order, with their source ids."""

    latents: list[torch.Tensor]
    ids: list[float]

    def key(self) -> tuple:
        return tuple((id(latent), source_id) for latent, source_id in zip(self.latents, self.ids))


def branch_name(branch: Branch) -> str:
    """The cache-context name of a guidance branch: `"cond"` or `"uncond"` for its text, then `_<combo>` for its
    condition streams (`"uncond"`, `"uncond_v"`, `"uncond_vi"`, `"cond_vi"`, `"cond_i"`, ...)."""
    text = "cond" if branch.positive else "uncond"
    return text if branch.combo is Combo.NONE else f"{text}_{branch.combo.value}"


def build_conditions(
    video_latents: list[torch.Tensor],
    image_latent: torch.Tensor | None,
    reference_latents: list[torch.Tensor],
    *,
    max_trained_src_id: int,
    interpolate_src_id: bool,
    use_src_id_rotary_emb: bool,
) -> dict[Combo, _Conditions]:
    """The condition streams of each combo (docs/design.md#combos) with their source ids, videos first."""

    def with_ids(latents: list[torch.Tensor]) -> _Conditions:
        ids = assign_source_ids(len(latents), max_trained_src_id, interpolate_src_id)
        if not use_src_id_rotary_emb:
            ids = [0.0] * len(latents)  # id 0 adds no phase: every stream keeps the plain 3-D RoPE
        return _Conditions(list(latents), ids)

    everything = [*video_latents, *([image_latent] if image_latent is not None else []), *reference_latents]
    return {
        Combo.NONE: _Conditions([], []),
        Combo.V: with_ids(video_latents[:1]),
        Combo.I: with_ids(reference_latents),
        Combo.VI: with_ids(everything),
    }


def drop_unused_media(mode: GuidanceMode, video_pixels: list, image_pixels, reference_pixels: list):
    """The media the mode's branches read: the others (e.g. references under v2v_chain's V) are not encoded."""
    needed = {branch.combo for branch in GUIDANCE_SPECS[mode].branches}
    if not needed & {Combo.V, Combo.VI}:
        video_pixels = []
    elif Combo.VI not in needed:
        video_pixels = video_pixels[:1]
    if Combo.VI not in needed:
        image_pixels = None
    if not needed & {Combo.I, Combo.VI}:
        reference_pixels = []
    return video_pixels, image_pixels, reference_pixels


def window_conditions(
    build: Callable[..., dict[Combo, _Conditions]],
    context: windows.ContextWindows,
    video_latents: list[torch.Tensor],
    image_latent: torch.Tensor | None,
    reference_latents: list[torch.Tensor],
) -> list[dict[Combo, _Conditions]]:
    """The combos of each context window, made by `build` (the pipeline's `build_conditions`). Each window sees its
    own slice of every video condition (`windows.condition_span`); the source image and the references are shared.
    One window is the whole clip with the conditions as they are."""
    if len(context) == 1:
        return [build(video_latents, image_latent, reference_latents)]
    return [
        build(
            [v[:, :, slice(*windows.condition_span(span, v.shape[2]))] for v in video_latents],
            image_latent,
            reference_latents,
        )
        for span in context.spans
    ]


@dataclass
class WindowBranches:
    """What one context window runs each step: its latent span, its branches (conditions, positive text), the keys
    that tell which branches share a forward, their cache names, and its own guidance state."""

    span: tuple[int, int]
    branches: list[tuple[_Conditions, bool]]
    keys: list[tuple]
    names: list[str]
    guidance: Guidance


def window_branches(
    mode: GuidanceMode,
    context: windows.ContextWindows,
    window_combos: list[dict[Combo, _Conditions]],
    guidance: Guidance,
    guidance_settings: dict[str, Any],
) -> list[WindowBranches]:
    """Per window: its branches, their keys and cache names, and its guidance (the first window uses `guidance`, the
    others a fresh `Guidance(mode, **guidance_settings)`: APG momentum is per window)."""
    plans = []
    for j, (span, combos) in enumerate(zip(context.spans, window_combos)):
        branches = [(combos[b.combo], b.positive) for b in GUIDANCE_SPECS[mode].branches]
        names = [branch_name(b) for b in GUIDANCE_SPECS[mode].branches]
        if len(context) > 1:
            names = [f"{name}_w{j}" for name in names]  # cache hooks keep one state per window and branch
        window_guidance = guidance if j == 0 else Guidance(mode, **guidance_settings)
        plans.append(WindowBranches(span, branches, [(c.key(), positive) for c, positive in branches], names,
                                    window_guidance))
    return plans
