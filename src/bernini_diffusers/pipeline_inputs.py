"""The argument rules of a [`BerniniPipeline`] call, as plain functions: every check that runs before any model work,
the media probing of `validate_call`, the token estimate of the size budget, and the small predicates they share.

`BerniniPipeline.check_inputs`, `validate_call` and `estimate_tokens` are the entry points; they bind the call's
arguments and hand them here. Each error names the argument, the value and what is allowed.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import media, windows
from .constants import (
    CALL_DEFAULT_NAMES,
    DEFAULT_CONTEXT_OVERLAP,
    GUIDANCE_RANGES,
    MAX_BATCH_SIZE,
    MAX_WINDOWED_FRAMES,
    TEMPORAL_FACTOR,
)
from .guidance import GUIDANCE_SPECS, Combo
from .pipeline_output import OUTPUT_TYPES
from .tasks import TASKS, GuidanceMode, Need, TaskSpec, parse_guidance_mode, parse_task_type
from .text import MAX_SEQUENCE_LENGTH

# The released models' limits: (the experts' `rope_max_seq_len`, the VAE's temporal and spatial factors).
DEFAULT_LIMITS = (1024, 4, 8)


def is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(float(value))


def check_inputs(
    spec: TaskSpec,
    prompt,
    negative_prompt,
    system_prompt,
    videos: list,
    image,
    images,
    num_frames,
    height,
    width,
    max_image_size,
    fps,
    num_inference_steps,
    flow_shift,
    scalars: dict[str, Any],
    norm_threshold,
    generator,
    latents,
    output_type,
    callback_on_step_end_tensor_inputs,
    limits: tuple[int, int, int] = DEFAULT_LIMITS,
    prompt_embeds=None,
    negative_prompt_embeds=None,
    num_videos_per_prompt=1,
    guidance_scale=None,
    max_sequence_length=MAX_SEQUENCE_LENGTH,
    context_frames=None,
    context_overlap=DEFAULT_CONTEXT_OVERLAP,
    attention_kwargs=None,
    callback_on_step_end=None,
    *,
    allowed_tensor_inputs: list[str],
    omega_txt_default: float,
    max_windowed_frames: int = MAX_WINDOWED_FRAMES,
) -> None:
    """Validate every argument of a call before any model work (`BerniniPipeline.check_inputs`).

    `limits` is (the experts' `rope_max_seq_len`, the VAE's temporal and spatial factors); the defaults are the
    released models'. `allowed_tensor_inputs` are the pipeline's `_callback_tensor_inputs`; `omega_txt_default` is
    `__call__`'s default `omega_txt` (a `guidance_scale` may only replace it, not contradict it);
    `max_windowed_frames` bounds a windowed clip (the pipeline's `MAX_WINDOWED_FRAMES`).
    """
    task = spec.task.value
    num_prompts = check_text(
        prompt, negative_prompt, system_prompt, prompt_embeds, negative_prompt_embeds, scalars, guidance_scale,
        omega_txt_default,
    )

    def need(name: str, rule: Need, given: bool, takes: str):
        if rule is Need.NO and given:
            raise ValueError(f"`{name}` is not accepted by task_type={task!r}; {takes}.")
        if rule is Need.REQUIRED and not given:
            raise ValueError(f"task_type={task!r} requires `{name}`; {takes}.")

    takes = describe_inputs(spec)
    need("video", spec.video, bool(videos), takes)
    need("image", spec.image, image is not None, takes)
    if images is not None and not isinstance(images, (list, tuple)):
        raise ValueError(f"`images` must be a list of paths or PIL images, got {type(images).__name__}.")
    need("images", spec.images, bool(images), takes)
    low, high = spec.num_videos
    if videos and not low <= len(videos) <= high:
        expected = f"{low}" if low == high else f"{low} to {high}"
        raise ValueError(f"task_type={task!r} takes {expected} video(s) in `video`, got {len(videos)}.")

    def integer(name: str, value, minimum: int, maximum: int | None = None):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum or (
            maximum is not None and value > maximum
        ):
            bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise ValueError(f"`{name}`={short(value)} must be an integer {bound}.")

    # The experts' RoPE table bounds only the sizes a call uses: image tasks make one frame whatever
    # `num_frames` says, and a source video or image sets the output size instead of `height`/`width`.
    rope_len, temporal, _ = limits
    window_cap = (rope_len - 1) * temporal + 1
    windows.check_context(context_frames, context_overlap, window_cap)
    # With context windows the clip is no longer one sequence: the RoPE table bounds each window, and the clip is
    # bounded by MAX_WINDOWED_FRAMES. A windowed source video is taken whole, so `num_frames` bounds nothing then
    # (the source's own length is checked when it is read).
    frames_cap = window_cap if context_frames is None else max_windowed_frames
    unused = spec.is_image or (context_frames is not None and bool(videos))
    integer("num_frames", num_frames, 1, None if unused else frames_cap)
    pixel_cap = None if videos or image is not None else max_pixels(limits)
    integer("height", height, 16, pixel_cap)
    integer("width", width, 16, pixel_cap)
    # A cap on the media's long side, not a size: above what the experts hold it is clamped (see `__call__`).
    integer("max_image_size", max_image_size, 16)
    integer("num_inference_steps", num_inference_steps, 1, 1000)
    integer("num_videos_per_prompt", num_videos_per_prompt, 1, MAX_BATCH_SIZE)
    integer("max_sequence_length", max_sequence_length, 1, MAX_SEQUENCE_LENGTH)
    media.check_fps(fps)  # the range the writer and the frame sampling accept, so no output is lost to it
    check_range("flow_shift", flow_shift)
    for name, value in scalars.items():
        check_range(name, value)
    thresholds = [norm_threshold] if not isinstance(norm_threshold, (list, tuple)) else list(norm_threshold)
    if not thresholds:
        raise ValueError("`norm_threshold`=[] must be a number or a non-empty list of them (0 disables).")
    for value in thresholds:
        check_range("norm_threshold", value, ", or a list of them (0 disables)")
    batch_size = num_prompts * num_videos_per_prompt
    if batch_size > MAX_BATCH_SIZE:
        raise ValueError(
            f"`num_videos_per_prompt`={num_videos_per_prompt} with {num_prompts} prompt(s) makes a batch of "
            f"{batch_size} videos; one call renders at most {MAX_BATCH_SIZE}: split the prompts over several calls."
        )
    generators = generator if isinstance(generator, (list, tuple)) else [generator]
    if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
        raise ValueError(
            f"`generator` is a list of {len(generator)} generators; it must hold one per video: {num_prompts} "
            f"prompt(s) x num_videos_per_prompt={num_videos_per_prompt} = {batch_size}."
        )
    for i, g in enumerate(generators):
        where = f"`generator[{i}]`" if isinstance(generator, (list, tuple)) else "`generator`"
        if isinstance(generator, (list, tuple)) and not isinstance(g, torch.Generator):
            # `randn_tensor` would fail mid-call on a None in a list: each video needs its own generator.
            raise ValueError(
                f"{where} is {type(g).__name__}; a list of generators must hold one torch.Generator per video "
                "(or pass one generator, or None, for the whole batch)."
            )
        if g is not None and not isinstance(g, torch.Generator):
            raise ValueError(
                f"`generator` must be a torch.Generator, a list of them (one per video) or None, got "
                f"{type(g).__name__}."
            )
        if g is not None and g.device.type != "cpu":
            raise ValueError(
                f"`generator` must be a CPU torch.Generator (the official noise is drawn on the CPU), got one on "
                f"{g.device}."
            )
    if latents is not None and not isinstance(latents, torch.Tensor):
        raise ValueError(f"`latents` must be a torch.Tensor or None, got {type(latents).__name__}.")
    for name, tensor in (
        ("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds), ("latents", latents)
    ):
        # One host sync per given tensor, before any model work: a NaN given here would only surface as a
        # non-finite result after the whole denoising loop.
        if tensor is not None and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"`{name}` holds non-finite values (NaN or inf); pass finite values.")
    if attention_kwargs is not None and not isinstance(attention_kwargs, dict):
        raise ValueError(f"`attention_kwargs` must be a dict or None, got {describe(attention_kwargs)}.")
    if callback_on_step_end is not None and not callable(callback_on_step_end):
        raise ValueError(
            f"`callback_on_step_end` must be callable (pipe, step, timestep, callback_kwargs) -> dict, or None, "
            f"got {describe(callback_on_step_end)}."
        )
    if output_type not in OUTPUT_TYPES:
        choices = ", ".join(OUTPUT_TYPES)
        raise ValueError(f"`output_type`={short(output_type)} is not supported; choose one of: {choices}.")
    unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in allowed_tensor_inputs]
    if unknown:
        raise ValueError(
            f"`callback_on_step_end_tensor_inputs` has {unknown}; allowed: {allowed_tensor_inputs}."
        )


def check_text(
    prompt, negative_prompt, system_prompt, prompt_embeds, negative_prompt_embeds, scalars, guidance_scale,
    omega_txt_default: float,
) -> int:
    """Check the text arguments and return the number of prompts (rows of `prompt_embeds` when given)."""
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("Pass either `prompt` or `prompt_embeds`, not both: the embeddings replace the text.")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError(
            "Pass either `negative_prompt` or `negative_prompt_embeds`, not both: the embeddings replace the text."
        )
    if prompt_embeds is not None:
        if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3 or not len(prompt_embeds):
            raise ValueError(
                "`prompt_embeds` must be a tensor (num_prompts, sequence_length, text_dim), got "
                f"{describe(prompt_embeds)}."
            )
        num_prompts = prompt_embeds.shape[0]
    elif isinstance(prompt, str):
        num_prompts = 1
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        num_prompts = len(prompt)
    else:
        raise ValueError(
            f"`prompt` must be a string or a non-empty list of strings (or pass `prompt_embeds`), got "
            f"{describe(prompt)}."
        )
    if isinstance(negative_prompt, (list, tuple)):
        if len(negative_prompt) != num_prompts or not all(isinstance(n, str) for n in negative_prompt):
            raise ValueError(
                f"`negative_prompt` as a list must hold one string per prompt ({num_prompts}), got "
                f"{describe(negative_prompt)}."
            )
    elif negative_prompt is not None and not isinstance(negative_prompt, str):
        raise ValueError(
            f"`negative_prompt` must be a string, a list of strings (one per prompt) or None, got "
            f"{type(negative_prompt).__name__}."
        )
    if negative_prompt_embeds is not None and (
        not isinstance(negative_prompt_embeds, torch.Tensor)
        or negative_prompt_embeds.ndim != 3
        or negative_prompt_embeds.shape[0] != num_prompts
    ):
        raise ValueError(
            f"`negative_prompt_embeds` must be a tensor (num_prompts, sequence_length, text_dim) with one row per "
            f"prompt ({num_prompts}), got {describe(negative_prompt_embeds)}."
        )
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise ValueError(f"`system_prompt` must be a string or None, got {type(system_prompt).__name__}.")
    if guidance_scale is not None:
        check_range("guidance_scale", guidance_scale, " or None")
        omega_txt = scalars["omega_txt"]
        if omega_txt != omega_txt_default and omega_txt != guidance_scale:
            raise ValueError(
                f"`guidance_scale`={guidance_scale!r} and `omega_txt`={omega_txt!r} disagree: `guidance_scale` is "
                "diffusers' name of the text weight `omega_txt`; pass one of them."
            )
    return num_prompts


def check_call(
    args: dict[str, Any],
    limits: tuple[int, int, int] = DEFAULT_LIMITS,
    *,
    allowed_tensor_inputs: list[str],
    omega_txt_default: float,
    max_windowed_frames: int = MAX_WINDOWED_FRAMES,
) -> tuple[TaskSpec, GuidanceMode, list]:
    """Resolve the task, the guidance mode and the videos of a call's bound arguments, then `check_inputs` them."""
    spec, mode, videos, scalars = resolve_call(args)
    check_inputs(
        spec, args["prompt"], args["negative_prompt"], args["system_prompt"], videos, args["image"],
        args["images"], args["num_frames"], args["height"], args["width"], args["max_image_size"], args["fps"],
        args["num_inference_steps"], args["flow_shift"], scalars, args["norm_threshold"], args["generator"],
        args["latents"], args["output_type"], args["callback_on_step_end_tensor_inputs"], limits=limits,
        prompt_embeds=args["prompt_embeds"], negative_prompt_embeds=args["negative_prompt_embeds"],
        num_videos_per_prompt=args["num_videos_per_prompt"], guidance_scale=args["guidance_scale"],
        max_sequence_length=args["max_sequence_length"], context_frames=args["context_frames"],
        context_overlap=args["context_overlap"], attention_kwargs=args["attention_kwargs"],
        callback_on_step_end=args["callback_on_step_end"], allowed_tensor_inputs=allowed_tensor_inputs,
        omega_txt_default=omega_txt_default, max_windowed_frames=max_windowed_frames,
    )
    return spec, mode, videos


def probe_media(args: dict[str, Any], videos: list, max_windowed_frames: int = MAX_WINDOWED_FRAMES) -> None:
    """Open every media file of a call (each video's container and first frame, each image decoded) and, with
    context windows, check that the source fits `MAX_WINDOWED_FRAMES`: the file errors `validate_call` adds."""
    named = [("video" if len(videos) == 1 else f"video[{i}]", v) for i, v in enumerate(videos)]
    named += [("image", args["image"])] + [(f"images[{i}]", v) for i, v in enumerate(args["images"] or [])]
    for name, value in named:
        if is_path(value):
            probe = media.probe_video if name.startswith("video") else media.probe_image
            probe(value, name)
    if videos and args["context_frames"] is not None:
        # A windowed source is taken whole: one too long for MAX_WINDOWED_FRAMES is refused now, not after loading.
        media.check_video_length(videos[0], args["fps"], None, max_windowed_frames, argument=named[0][0])


def estimate_tokens(args: dict[str, Any], media_sizes: dict[str, tuple[int, int]] | None = None) -> tuple[int, tuple]:
    """The transformer sequence length of the longest guidance branch of a call's bound arguments, and the largest
    (T_lat, H/16, W/16) grid of any stream (`BerniniPipeline.estimate_tokens` documents the bound)."""
    spec, mode, videos, _ = resolve_call(args)
    sizes, cap, stride = media_sizes or {}, args["max_image_size"], 16  # VAE 8 x patch 2

    def size(name: str) -> tuple[int, int]:
        if name in sizes:
            return media.target_size(*sizes[name], cap)
        return media.make_divisible(cap), media.make_divisible(cap)

    frames = 1 if spec.is_image else args["num_frames"] // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1
    if args["context_frames"] is not None and not spec.is_image:
        # One forward sees one window; a windowed source is not cut at `num_frames`, so bound it by the window.
        frames = args["context_frames"] if videos else min(frames, args["context_frames"])
    video_names = ["video" if len(videos) == 1 else f"video[{i}]" for i in range(len(videos))]
    video_grids = [((frames - 1) // TEMPORAL_FACTOR + 1, h // stride, w // stride) for w, h in map(size, video_names)]
    image_grid = [(1, h // stride, w // stride) for w, h in [size("image")]] if args["image"] is not None else []
    reference_grids = [
        (1, h // stride, w // stride) for w, h in (size(f"images[{i}]") for i in range(len(args["images"] or [])))
    ]
    if video_grids:
        target = video_grids[0]
    elif image_grid:
        target = image_grid[0]
    else:
        height, width = media.make_divisible(args["height"]), media.make_divisible(args["width"])
        target = ((frames - 1) // TEMPORAL_FACTOR + 1, height // stride, width // stride)
    if spec.is_image:
        target = (1, *target[1:])
    combos = {
        Combo.NONE: [],
        Combo.V: video_grids[:1],
        Combo.I: reference_grids,
        Combo.VI: [*video_grids, *image_grid, *reference_grids],
    }
    used = [[target, *combos[branch.combo]] for branch in GUIDANCE_SPECS[mode].branches]
    tokens = max(sum(t * h * w for t, h, w in streams) for streams in used)
    grids = [grid for streams in used for grid in streams]
    return tokens, tuple(max(grid[axis] for grid in grids) for axis in range(3))


def with_call_defaults(call: Callable) -> Callable:
    """Fill the size arguments a call leaves out from the pipeline's `call_defaults` config (the tiny model's); an
    argument given wins, even when it equals the official default. The signature keeps the official defaults."""
    names = list(inspect.signature(call).parameters)[1:]

    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        given = {*names[: len(args)], *kwargs}
        defaults = {k: v for k, v in (self.config.get("call_defaults") or {}).items() if k not in given}
        return call(self, *args, **defaults, **kwargs)

    return wrapper


def check_call_defaults(call_defaults: Any) -> dict[str, int] | None:
    """`call_defaults` of a pipeline: None, or a dict from some of `CALL_DEFAULT_NAMES` to positive integers."""
    if call_defaults is None:
        return None
    if not isinstance(call_defaults, dict) or not set(call_defaults) <= set(CALL_DEFAULT_NAMES):
        raise ValueError(
            f"`call_defaults`={short(call_defaults)} must be None or a dict whose keys are some of "
            f"{', '.join(CALL_DEFAULT_NAMES)}."
        )
    for name, value in call_defaults.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`call_defaults[{name!r}]`={short(value)} must be an integer >= 1.")
    return {name: int(value) for name, value in call_defaults.items()}


def check_device(device: Any, name: str = "device") -> None:
    """Refuse the meta device (no storage: weights moved there are gone); other names are left to torch."""
    try:
        kind = None if device is None else torch.device(device).type
    except (RuntimeError, TypeError):
        return
    if kind == "meta":
        raise ValueError(
            f"`{name}`={str(device)!r} is not allowed: the meta device holds no data, so moving the weights there "
            "would destroy them; use cpu, cuda or cuda:N."
        )


def check_experts(transformer, transformer_2, boundary_ratio) -> None:
    """A pipeline without a high-noise expert must send every step to `transformer_2` (as `WanPipeline` allows)."""
    if transformer is None and transformer_2 is not None and (boundary_ratio is None or boundary_ratio < 1.0):
        raise ValueError(
            f"`transformer` is None but `boundary_ratio`={boundary_ratio!r} sends the high-noise steps to it; with "
            "only the low-noise expert `transformer_2`, set `boundary_ratio=1.0` (every step runs on `transformer_2`), "
            "or pass the expert as `transformer` (a single-expert model, e.g. the 1.3B one)."
        )


def max_pixels(limits: tuple[int, int, int]) -> int:
    """The longest side, in pixels, whose 2x2-patch tokens fit the experts' RoPE table: rope_len * 2 * spatial."""
    rope_len, _, spatial = limits
    return rope_len * spatial * 2


def short(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut at `limit` characters: a message never carries a 20 MB argument."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__})"


def check_range(name: str, value: Any, alternative: str = "") -> None:
    """`value` is a finite real in `GUIDANCE_RANGES[name]` (both ends included), else a ValueError with the range."""
    low, high = GUIDANCE_RANGES[name]
    if not is_real(value) or not low <= value <= high:
        raise ValueError(f"`{name}`={short(value)} must be a number in [{low:g}, {high:g}]{alternative}.")


def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}: {short(value, 200)}"
    return type(value).__name__


def resolve_call(args: dict[str, Any]) -> tuple[TaskSpec, GuidanceMode, list, dict[str, Any]]:
    """The task spec, the guidance mode, the list of videos and the scalar weights of a call's arguments."""
    spec = TASKS[parse_task_type(args["task_type"])]
    mode = args["guidance_mode"]
    mode = spec.default_guidance_mode if mode is None else parse_guidance_mode(mode)
    names = ("omega_vid", "omega_img", "omega_txt", "omega_scale", "eta", "momentum")
    return spec, mode, media.split_videos(args["video"]), {name: args[name] for name in names}


def describe_inputs(spec: TaskSpec) -> str:
    parts = [f"`{name}` ({need.value})" for name, need in spec.inputs]
    return f"it takes {', '.join(parts)}" if parts else "it takes text only"
