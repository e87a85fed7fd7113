"""The output of a [`BerniniPipeline`] call, and the error a call raises instead of a non-finite result."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers.utils import BaseOutput

from . import media

OUTPUT_TYPES = ("np", "pil", "pt", "latent")


@dataclass
class BerniniPipelineOutput(BaseOutput):
    r"""
    Output of [`BerniniPipeline`].

    Args:
        frames (`np.ndarray`, `torch.Tensor` or `list[list[PIL.Image.Image]]`):
            The decoded frames, `(batch_size, num_frames, height, width, 3)` for `"np"`, `(batch_size, num_frames, 3,
            height, width)` for `"pt"`, nested PIL lists for `"pil"`; for `"latent"` the final normalised latents
            `(batch_size, 16, latent_frames, height / 8, width / 8)`. `None` on the processes of a parallel run that
            do not write ([`~BerniniPipeline.is_writer`] is `False`): they skip the VAE decode.
        fps (`float`):
            The frame rate the frames were sampled at; `save` writes the video at it.
        output_type (`str`):
            The `output_type` of the call.
    """

    frames: Any
    fps: float = 16
    output_type: str = "np"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the first result: a PNG for one frame, an H.264 MP4 at `fps` otherwise. Returns the path written.

        The file is verified before it replaces `path` (`media.write_output`): on failure `path` holds nothing new and
        a `media.OutputWriteError` (an `OSError`) names the path and the cause.
        """
        if self.output_type == "latent":
            raise ValueError("`save` needs decoded frames; this output holds latents (output_type='latent').")
        if self.frames is None:
            raise ValueError("`save` needs decoded frames; this process does not write (`pipe.is_writer` is False).")
        frames = self.frames[0]
        if self.output_type == "pt":
            frames = frames.permute(0, 2, 3, 1).float().cpu().numpy()  # (T, C, H, W) -> (T, H, W, C)
        return media.write_output(frames, path, self.fps)


class NonFiniteOutputError(RuntimeError):
    r"""
    The denoising loop produced NaN or inf latents: nothing was decoded, nothing is written.

    A `RuntimeError`, not a `ValueError`: every argument passed its checks (non-finite `prompt_embeds`,
    `negative_prompt_embeds` or `latents` are refused up front as a `ValueError`); the run itself went wrong (a LoRA
    with non-finite weights, a guidance setting that overflows the experts' dtype), so the command line exits 1 and a
    batch records the case as failed and goes on.

    Args:
        message (`str`): what went wrong, the step and the likely causes.
        step (`int`): the 0-based index of the first step whose latents were not finite.
    """

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
