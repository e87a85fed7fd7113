"""Temporal context windows (docs/design.md#long-videos): how a clip longer than one window is cut and blended.

The latent time axis of a long clip is cut into overlapping windows of `context_frames` output frames; each step
predicts every window on its own (its own slice of the video conditions, RoPE positions from 0) and blends the
predictions over the overlaps with smooth weights that sum to one on every latent frame. Everything here is
arithmetic on frame counts and one weight table; the pipeline does the predicting.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .constants import TEMPORAL_FACTOR

# The shortest window: two latent frames (the first frame alone is an image, not a clip).
MIN_CONTEXT_FRAMES = TEMPORAL_FACTOR + 1


def latent_frames(frames: int) -> int:
    """Latent frames of a clip of `frames` output frames (4k+1 frames -> k+1 latents)."""
    return (frames - 1) // TEMPORAL_FACTOR + 1


def check_context(context_frames, context_overlap, max_window: int | None = None) -> None:
    """Refuse window settings off the latent grid or that cannot tile a clip, naming the argument and the fix.

    `context_frames` is None (windows off) or an integer 4k+1 >= 5, at most `max_window` (the experts' RoPE table);
    `context_overlap` a multiple of 4 in [0, context_frames). Any integer type counts (a numpy one too); booleans
    do not.
    """

    def is_int(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if not is_int(context_overlap) or context_overlap < 0 or context_overlap % TEMPORAL_FACTOR:
        raise ValueError(
            f"`context_overlap`={context_overlap!r} must be a multiple of {TEMPORAL_FACTOR} frames >= 0 (the latent "
            f"grid: one latent frame holds {TEMPORAL_FACTOR} frames), e.g. 16."
        )
    if context_frames is None:
        return
    if not is_int(context_frames) or context_frames < MIN_CONTEXT_FRAMES or context_frames % TEMPORAL_FACTOR != 1:
        near = ""
        if is_int(context_frames) and context_frames > MIN_CONTEXT_FRAMES:
            below = (context_frames - 1) // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1
            near = f" (the nearest are {below} and {below + TEMPORAL_FACTOR})"
        raise ValueError(
            f"`context_frames`={context_frames!r} is not on the latent grid: a window is 4k+1 frames >= "
            f"{MIN_CONTEXT_FRAMES}{near}, e.g. 81; leave it unset (None) for no windows."
        )
    if max_window is not None and context_frames > max_window:
        raise ValueError(
            f"`context_frames`={context_frames} is longer than the experts' RoPE table holds ({max_window} frames)."
        )
    if context_overlap >= context_frames:
        raise ValueError(
            f"`context_overlap`={context_overlap} must be shorter than the window `context_frames`={context_frames}: "
            "neighbouring windows would otherwise never advance."
        )


@dataclass(frozen=True)
class ContextWindows:
    r"""
    The windows of one clip, in latent frames.

    Args:
        spans (`tuple[tuple[int, int], ...]`):
            `[start, end)` of each window on the clip's latent time axis, in order; the first starts at 0, the last
            ends at the clip's end, neighbours overlap by at least the requested overlap.
        weights (`torch.Tensor`):
            `(num_windows, num_latent_frames)` float64 blend weights: zero outside a window, rising and falling as
            `sin^2` across each overlap, summing to one on every latent frame.
    """

    spans: tuple[tuple[int, int], ...]
    weights: torch.Tensor

    def __len__(self) -> int:
        return len(self.spans)

    @property
    def num_latent_frames(self) -> int:
        return self.weights.shape[1]


def plan_windows(num_latent_frames: int, window: int, overlap: int) -> tuple[tuple[int, int], ...]:
    """`[start, end)` spans of `window` latent frames covering `num_latent_frames`, neighbours sharing >= `overlap`.

    The fewest windows that fit, spread evenly: n = ceil((T - O) / (W - O)) windows with starts `round(i * (T - W) /
    (n - 1))`, so every stride is at most `W - O` and the spare overlap is shared out instead of piling up at the end.
    A clip no longer than one window is one span, the whole clip.
    """
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"a window of {window} latent frames cannot overlap by {overlap}")
    if num_latent_frames <= window:
        return ((0, num_latent_frames),)
    count = math.ceil((num_latent_frames - overlap) / (window - overlap))
    room = num_latent_frames - window
    return tuple((start, start + window) for start in (round(i * room / (count - 1)) for i in range(count)))


def blend_weights(spans: tuple[tuple[int, int], ...], num_latent_frames: int) -> torch.Tensor:
    """`(len(spans), T)` float64 weights: each window ramps in (`sin^2`) across its overlap with the previous window
    and out across its overlap with the next; the columns are normalised to sum to one.

    Two windows sharing `r` frames get `sin^2` and `cos^2` of the same angle there, which already sum to one, so every
    overlap frame weighs both windows strictly between 0 and 1 and the blend moves smoothly from one to the other.
    """
    raw = torch.zeros(len(spans), num_latent_frames, dtype=torch.float64)
    for j, (start, end) in enumerate(spans):
        position = torch.arange(start, end, dtype=torch.float64)
        weight = torch.ones(end - start, dtype=torch.float64)
        if j > 0:
            shared = spans[j - 1][1] - start
            if shared > 0:
                rise = ((position - start + 1) / (shared + 1)).clamp(max=1.0)
                weight = weight * torch.sin(rise * math.pi / 2) ** 2
        if j < len(spans) - 1:
            shared = end - spans[j + 1][0]
            if shared > 0:
                fall = ((end - position) / (shared + 1)).clamp(max=1.0)
                weight = weight * torch.sin(fall * math.pi / 2) ** 2
        raw[j, start:end] = weight
    return raw / raw.sum(dim=0, keepdim=True)


def context_windows(num_latent_frames: int, context_frames: int | None, context_overlap: int) -> ContextWindows:
    """The windows of a clip of `num_latent_frames` for the call's settings in output frames (checked)."""
    if context_frames is None:
        spans = ((0, num_latent_frames),)
    else:
        window = latent_frames(context_frames)
        spans = plan_windows(num_latent_frames, window, context_overlap // TEMPORAL_FACTOR)
    return ContextWindows(spans, blend_weights(spans, num_latent_frames))


def condition_span(span: tuple[int, int], condition_frames: int) -> tuple[int, int]:
    """The latent frames of a video condition that a target window `[start, end)` sees.

    A condition at least as long as the window's end gives the same frames (the source stays aligned with the
    target). A shorter one gives the window's length from its end instead (an insert clip shorter than the source,
    say), and one no longer than a window is seen whole by every window, as a plain call sees it.
    """
    start, end = span
    if condition_frames >= end:
        return start, end
    return max(0, condition_frames - (end - start)), condition_frames


__all__ = [
    "MIN_CONTEXT_FRAMES",
    "ContextWindows",
    "blend_weights",
    "check_context",
    "condition_span",
    "context_windows",
    "latent_frames",
    "plan_windows",
]
