"""The Gradio demo: every Bernini-R task in one page.

`bernini demo --model ...` serves it; `create_demo(pipe)` builds the same page around a pipeline you already hold
(in a notebook, `create_demo(pipe).launch()`). The page is driven by the task table: picking a task fills its default
guidance mode and shows only the media it takes. Requests map onto one `BerniniPipeline` call with `build_call`, the
result is written with `media.write_output` into the save folder and shown inline.

gradio, an optional part, is imported only when the page is built; torch and the pipeline when the page is built or a
request runs, so that `bernini demo --help` answers before torch loads.
"""

from __future__ import annotations

import argparse
import inspect
import numbers
import os
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import options
from .constants import (
    DEFAULT_CONTEXT_OVERLAP,
    DEFAULT_MAX_TOKENS,
    DEMO_MAX_STEPS,
    DEMO_MAX_UPLOAD_MB,
    DEMO_MAX_UPLOADS,
    MAX_FPS,
    MAX_TOKENS_ENV,
    MIN_FPS,
)
from .redaction import mask_secrets
from .tasks import (
    DEFAULT_NEGATIVE_PROMPT,
    TASKS,
    GuidanceMode,
    Need,
    TaskSpec,
    TaskType,
    parse_task_type,
)

# The generation parameters the page exposes, named as `BerniniPipeline.__call__` arguments. Their defaults are read
# from that signature, so the page and the pipeline cannot drift apart.
GENERATION_PARAMETERS = (
    "negative_prompt", "system_prompt", "guidance_mode", "num_frames", "height", "width", "max_image_size", "fps",
    "num_inference_steps", "flow_shift", "omega_vid", "omega_img", "omega_txt", "omega_scale", "eta", "momentum",
    "norm_threshold", "context_frames", "context_overlap",
)  # fmt: skip
MEDIA_INPUTS = ("video", "insert_video", "image", "images")
DEFAULT_TASK = TaskType.T2V
DEFAULT_SEED = 42  # the official command line's
DEFAULT_SAVE_DIR = "outputs/demo"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860


def default_values() -> dict[str, Any]:
    """The page's initial values: the pipeline's own defaults, with the task's guidance mode and the texts spelled out.

    `negative_prompt=None` means the standard Wan negative prompt: the page shows that text. `system_prompt=None`
    means the task's prefix: the page leaves the box empty and shows the prefix as its placeholder.
    `context_frames=None` means no context windows: the page shows 0.
    """
    from .pipeline_bernini import BerniniPipeline

    parameters = inspect.signature(BerniniPipeline.__call__).parameters
    values = {name: parameters[name].default for name in GENERATION_PARAMETERS}
    values["task_type"] = DEFAULT_TASK.value
    values["guidance_mode"] = TASKS[DEFAULT_TASK].default_guidance_mode.value
    values["negative_prompt"] = DEFAULT_NEGATIVE_PROMPT
    values["system_prompt"] = ""
    values["context_frames"] = 0
    values["seed"] = DEFAULT_SEED
    return values


@dataclass(frozen=True)
class MediaLayout:
    """Which media inputs a task shows, and their labels."""

    video: bool
    insert_video: bool
    image: bool
    images: bool
    image_label: str
    images_label: str


def _need_label(label: str, need: Need) -> str:
    return f"{label} (optional)" if need is Need.OPTIONAL else label


def media_layout(spec: TaskSpec) -> MediaLayout:
    """The media inputs of a task, from the task table.

    The single image goes to `image` when the task takes a source image (i2i); otherwise, for tasks with references,
    it is the first reference (image0), as in the official demo.
    """
    takes_source = spec.image is not Need.NO
    takes_references = spec.images is not Need.NO
    if takes_source:
        image_label, images_label = "Source image", _need_label("Reference images", spec.images)
    else:
        image_label = _need_label("Reference image (image0)", spec.images)
        images_label = _need_label("More reference images (after image0)", spec.images)
    return MediaLayout(
        video=spec.video is not Need.NO,
        insert_video=spec.num_videos[1] > 1,
        image=takes_source or takes_references,
        images=takes_references,
        image_label=image_label,
        images_label=images_label,
    )


def describe_task(spec: TaskSpec) -> str:
    """One line for the page: what the task does and what it takes."""
    words = {
        "video": "a source video and an insert video" if spec.num_videos[1] > 1 else "a source video",
        "image": "a source image",
        "images": "reference images",
    }
    takes = [words[name] + (" (optional)" if need is Need.OPTIONAL else "") for name, need in spec.inputs]
    output = "one image" if spec.is_image else "a video"
    return (
        f"**{spec.task.value}**: {spec.description}. Takes {', '.join(takes) or 'text only'}; makes {output}. "
        f"Default guidance: `{spec.default_guidance_mode.value}`."
    )


def build_call(
    task_type: str | TaskType,
    prompt: str,
    *,
    video: str | None = None,
    insert_video: str | None = None,
    image: str | None = None,
    images: list[str] | None = None,
    **parameters: Any,
) -> dict[str, Any]:
    r"""
    The `BerniniPipeline.__call__` keyword arguments of one request from the page (everything but `generator`).

    Media the task does not take are dropped (the page hides those inputs, but they may still hold an earlier
    upload); missing media the task needs are left for the pipeline to reject with its own message.

    Args:
        task_type (`str` or `TaskType`):
            The task picked in the page.
        prompt (`str`):
            The prompt, already enhanced if the enhancer ran.
        video (`str`, *optional*):
            The source video.
        insert_video (`str`, *optional*):
            The insert video of ads2v; `video` becomes `[video, insert_video]`.
        image (`str`, *optional*):
            The single image: the source image of i2i, else prepended to `images` as the first reference.
        images (`list[str]`, *optional*):
            Reference images.
        parameters:
            The values of `GENERATION_PARAMETERS`. An empty `system_prompt` or `guidance_mode` means the task's own;
            an empty or 0 `context_frames`, no context windows. Image tasks always get `num_frames=1`.

    Returns:
        `dict`: keyword arguments for `BerniniPipeline.__call__`.
    """
    unknown = sorted(set(parameters) - set(GENERATION_PARAMETERS))
    if unknown:
        raise ValueError(f"build_call got unknown parameters {unknown}; allowed: {', '.join(GENERATION_PARAMETERS)}.")
    spec = TASKS[parse_task_type(task_type)]
    layout = media_layout(spec)

    videos = [video] if layout.video else []
    if layout.insert_video:
        videos.append(insert_video)
    videos = [v for v in videos if v]
    call_video = None
    if videos:
        call_video = videos if layout.insert_video else videos[0]

    references = list(images or []) if layout.images else []
    call_image = None
    if image and layout.image:
        if spec.image is not Need.NO:
            call_image = image
        else:
            references.insert(0, image)

    kwargs: dict[str, Any] = dict(parameters)
    kwargs.update(
        prompt=prompt,
        task_type=spec.task.value,
        video=call_video,
        image=call_image,
        images=references or None,
    )
    if not kwargs.get("system_prompt"):
        kwargs["system_prompt"] = None
    if not kwargs.get("guidance_mode"):
        kwargs["guidance_mode"] = None
    if "context_frames" in kwargs and not kwargs["context_frames"]:
        kwargs["context_frames"] = None  # a cleared field or 0: the windows are off
    if spec.is_image:
        kwargs["num_frames"] = 1
    return kwargs


@dataclass(frozen=True)
class Budget:
    r"""
    What one request of the page may cost, checked before it is queued behind the only worker.

    Args:
        max_tokens (`int`, *optional*):
            The longest guidance branch in transformer tokens, as `bernini generate --max_tokens`; defaults to
            `$BERNINI_MAX_TOKENS`, else 2**20.
        max_steps (`int`, defaults to 200):
            The most denoising steps.
        max_upload_mb (`float`, defaults to 512):
            The largest uploaded file, in MB (also gradio's `max_file_size`, so larger ones are refused on upload).
        max_uploads (`int`, defaults to 10):
            The most media files in one request.
    """

    max_tokens: int | None = None
    max_steps: int = DEMO_MAX_STEPS
    max_upload_mb: float = DEMO_MAX_UPLOAD_MB
    max_uploads: int = DEMO_MAX_UPLOADS

    def __post_init__(self):
        if self.max_tokens is None:
            raw = os.environ.get(MAX_TOKENS_ENV, "").strip()
            if raw and (not raw.isdigit() or int(raw) < 1):
                raise ValueError(f"${MAX_TOKENS_ENV}={raw!r} must be an integer >= 1.")
            object.__setattr__(self, "max_tokens", int(raw) if raw else DEFAULT_MAX_TOKENS)
        for name in ("max_tokens", "max_steps", "max_uploads"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}`={value!r} must be an integer >= 1.")
        if not isinstance(self.max_upload_mb, numbers.Real) or not 0 < self.max_upload_mb < float("inf"):
            raise ValueError(f"`max_upload_mb`={self.max_upload_mb!r} must be a number > 0.")

    def check(self, kwargs: Mapping[str, Any]) -> None:
        """Refuse a request (a `ValueError` naming the budget and the estimate) that exceeds the budget."""
        files = [f for f in _media_files(kwargs) if f]
        if len(files) > self.max_uploads:
            raise ValueError(
                f"this request has {len(files)} media files, more than the demo's limit of {self.max_uploads} "
                "(`max_uploads`, bernini demo --max_uploads)."
            )
        limit = self.max_upload_mb * 1e6
        for file in files:
            try:
                size = os.path.getsize(file)
            except (OSError, TypeError, ValueError):
                continue  # a missing file is the pipeline's to name
            if size > limit:
                raise ValueError(
                    f"{Path(str(file)).name!r} is {size / 1e6:,.1f} MB, more than the demo's limit of "
                    f"{self.max_upload_mb:g} MB per file (`max_upload_mb`, bernini demo --max_upload_mb)."
                )
        from .pipeline_bernini import BerniniPipeline  # the command line's deferred import, as `bernini generate`

        tokens, _ = BerniniPipeline.estimate_tokens(**kwargs)
        steps = kwargs.get("num_inference_steps")
        work = f"about {tokens:,} transformer tokens in its longest guidance branch, for {steps} steps"
        if tokens > self.max_tokens:
            raise ValueError(
                f"this request needs {work}: more than the limit of {self.max_tokens:,} tokens (`max_tokens`, "
                f"bernini demo --max_tokens or ${MAX_TOKENS_ENV}); lower `num_frames`, `height`/`width` or "
                "`max_image_size`."
            )
        if isinstance(steps, numbers.Real) and steps > self.max_steps:
            raise ValueError(
                f"`num_inference_steps`={steps} is more than the demo's limit of {self.max_steps} steps (`max_steps`, "
                f"bernini demo --max_steps); this request needs {work}."
            )


def _media_files(kwargs: Mapping[str, Any]) -> list[Any]:
    video = kwargs.get("video")
    videos = list(video) if isinstance(video, (list, tuple)) else [video]
    return [*videos, kwargs.get("image"), *(kwargs.get("images") or [])]


def _output_name(task: str, seed: int) -> str:
    # Time first so the folder lists in order; the random part keeps two results of the same second apart.
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}_{task}_seed{seed}"


def generate(
    pipe,
    values: Mapping[str, Any],
    *,
    save_dir: str | Path = DEFAULT_SAVE_DIR,
    prompt_enhancer=None,
    progress=None,
    budget: Budget | None = None,
) -> tuple[Path, str]:
    r"""
    Run one request of the page: enhance the prompt (optional), call the pipeline, write the result.

    Args:
        pipe (`BerniniPipeline`):
            The loaded pipeline.
        values (`Mapping[str, Any]`):
            `task_type`, `prompt`, `seed`, the media inputs (`MEDIA_INPUTS`) and `GENERATION_PARAMETERS`.
        save_dir (`str` or `Path`):
            Where the PNG or MP4 is written (atomically, by `media.write_output`).
        prompt_enhancer (*optional*):
            An object with `enhance(prompt, task_type, video=..., image=..., images=...) -> str`, e.g.
            `bernini_diffusers.prompt_enhancer.PromptEnhancer`. If it fails, the raw prompt is used.
        progress (`Callable`, *optional*):
            Called as `progress((step, total), desc=...)` before the model work and after every denoising step
            (`gr.Progress` in the page).
        budget (`Budget`, *optional*):
            What the request may cost (tokens, steps, uploads); defaults to `Budget()`.

    Returns:
        `tuple[Path, str]`: the file written and the prompt used.

    Raises:
        `ValueError` or `FileNotFoundError` for bad input, before any model work.
    """
    import torch

    from . import media

    def report(*args, **kwargs):
        if progress is not None:
            progress(*args, **kwargs)

    prompt = values.get("prompt") or ""
    seed = values.get("seed")
    if not isinstance(seed, numbers.Real) or isinstance(seed, bool) or not float(seed).is_integer() or not (
        0 <= seed < 2**63
    ):
        raise ValueError(f"`seed`={seed!r} must be an integer in [0, 2**63).")
    seed = int(seed)
    kwargs = build_call(
        values["task_type"],
        prompt,
        **{name: values.get(name) for name in MEDIA_INPUTS},
        **{name: values[name] for name in GENERATION_PARAMETERS if name in values},
    )
    type(pipe).validate_call(**kwargs)  # bad input fails here, before the enhancer or the model run
    (budget or Budget()).check(kwargs)  # and a request too large for the one worker

    if prompt_enhancer is not None and prompt.strip():
        report(0.0, desc="Enhancing the prompt")
        try:
            enhanced = prompt_enhancer.enhance(
                prompt, kwargs["task_type"], video=kwargs["video"], image=kwargs["image"], images=kwargs["images"]
            )
        except Exception as err:  # the official demo falls back to the raw prompt whatever went wrong
            reason = mask_secrets(str(err))
            print(f"warning: the prompt enhancer failed ({reason}); using the raw prompt.", file=sys.stderr)
            enhanced = None
        if isinstance(enhanced, str) and enhanced.strip():
            kwargs["prompt"] = enhanced

    steps = kwargs["num_inference_steps"]
    report((0, steps), desc="Denoising", unit="steps")

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        # After the last step the VAE decode and the write follow: say so rather than sit silently at 100%.
        report((step + 1, steps), desc="Denoising" if step + 1 < steps else "Decoding and writing", unit="steps")
        return callback_kwargs

    out = pipe(
        **kwargs,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        callback_on_step_end=on_step_end,
    )
    path = media.write_output(out.frames[0], Path(save_dir) / _output_name(kwargs["task_type"], seed), out.fps)
    return path, kwargs["prompt"]


def create_demo(
    pipe,
    *,
    save_dir: str | Path = DEFAULT_SAVE_DIR,
    prompt_enhancer=None,
    defaults: Mapping[str, Any] | None = None,
    title: str = "Bernini-R",
    max_tokens: int | None = None,
    max_steps: int = DEMO_MAX_STEPS,
    max_upload_mb: float = DEMO_MAX_UPLOAD_MB,
    max_uploads: int = DEMO_MAX_UPLOADS,
):
    r"""
    Build the demo page around a loaded pipeline.

    Args:
        pipe (`BerniniPipeline`):
            The pipeline every request runs on. One generation runs at a time; the others wait in the queue.
        save_dir (`str` or `Path`, defaults to `"outputs/demo"`):
            Where results are written. Gradio serves files under the working directory and the temporary folder;
            for a folder elsewhere pass it to `launch(allowed_paths=[save_dir])`.
        prompt_enhancer (*optional*):
            Runs before each generation (see `generate`); the page shows the prompt used.
        defaults (`Mapping[str, Any]`, *optional*):
            Initial values that replace `default_values()`, e.g. `{"num_inference_steps": 20}`.
        title (`str`):
            The page title.
        max_tokens, max_steps, max_upload_mb, max_uploads:
            What one request may cost (see `Budget`); a request over budget is refused with the estimate, not
            queued. The page's `launch` gets `max_file_size` from `max_upload_mb` (`demo.max_file_size`).

    Returns:
        `gr.Blocks`: call `.launch()` on it.
    """
    import gradio as gr

    budget = Budget(max_tokens, max_steps, max_upload_mb, max_uploads)

    values = default_values()
    unknown = sorted(set(defaults or {}) - set(values))
    if unknown:
        raise ValueError(f"`defaults` has unknown names {unknown}; allowed: {', '.join(sorted(values))}.")
    values.update(defaults or {})
    start = TASKS[parse_task_type(values["task_type"])]
    layout = media_layout(start)
    save_dir = Path(save_dir)

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {title}\nByteDance's video renderer: generation and editing of images and videos from text, source "
            "media and reference images. Pick a task, give its inputs, generate."
        )
        with gr.Row():
            with gr.Column():
                task = gr.Dropdown(
                    [(f"{s.task.value}: {s.description}", s.task.value) for s in TASKS.values()],
                    value=start.task.value, label="Task", elem_id="task_type",
                )
                task_info = gr.Markdown(describe_task(start), elem_id="task_info")
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt")
                with gr.Row():
                    video = gr.Video(label="Source video", sources=["upload"], visible=layout.video, elem_id="video")
                    insert_video = gr.Video(
                        label="Insert video", sources=["upload"], visible=layout.insert_video, elem_id="insert_video"
                    )
                with gr.Row():
                    image = gr.Image(
                        label=layout.image_label, type="filepath", sources=["upload"], visible=layout.image,
                        elem_id="image",
                    )
                    images = gr.File(
                        label=layout.images_label, file_count="multiple", file_types=["image"],
                        visible=layout.images, elem_id="images",
                    )
                guidance_mode = gr.Dropdown(
                    [m.value for m in GuidanceMode], value=values["guidance_mode"], label="Guidance mode",
                    info="filled with the task's default; any mode works with any task", elem_id="guidance_mode",
                )
                with gr.Row():
                    num_frames = gr.Number(
                        values["num_frames"], label="Frames", precision=0, minimum=1, interactive=not start.is_image,
                        info="4k+1; with a source video, the cap (none with a context window)", elem_id="num_frames",
                    )
                    height = gr.Number(
                        values["height"], label="Height", precision=0, minimum=16,
                        info="without a source video or image", elem_id="height",
                    )
                    width = gr.Number(
                        values["width"], label="Width", precision=0, minimum=16,
                        info="without a source video or image", elem_id="width",
                    )
                with gr.Row():
                    num_inference_steps = gr.Number(
                        values["num_inference_steps"], label="Steps", precision=0, minimum=1, maximum=budget.max_steps,
                        elem_id="num_inference_steps",
                    )
                    seed = gr.Number(values["seed"], label="Seed", precision=0, minimum=0, elem_id="seed")
                with gr.Accordion("Advanced", open=False):
                    negative_prompt = gr.Textbox(
                        values["negative_prompt"], label="Negative prompt", lines=2, elem_id="negative_prompt"
                    )
                    system_prompt = gr.Textbox(
                        values["system_prompt"], label="System prompt", placeholder=start.system_prompt,
                        info="empty: the task's own prefix (shown greyed)", elem_id="system_prompt",
                    )
                    with gr.Row():
                        max_image_size = gr.Number(
                            values["max_image_size"], label="Max image size", precision=0, minimum=16,
                            info="long-side limit of the inputs", elem_id="max_image_size",
                        )
                        fps = gr.Number(
                            values["fps"], label="FPS", minimum=MIN_FPS, maximum=MAX_FPS, info="source videos are resampled to it",
                            elem_id="fps",
                        )
                        flow_shift = gr.Number(values["flow_shift"], label="Flow shift", elem_id="flow_shift")
                    with gr.Row():
                        omega_vid = gr.Number(values["omega_vid"], label="ω video", step=0.05, elem_id="omega_vid")
                        omega_img = gr.Number(values["omega_img"], label="ω image", step=0.05, elem_id="omega_img")
                        omega_txt = gr.Number(values["omega_txt"], label="ω text", step=0.05, elem_id="omega_txt")
                        omega_scale = gr.Number(
                            values["omega_scale"], label="ω scale", step=0.05,
                            info="from the low-noise expert on", elem_id="omega_scale",
                        )
                    with gr.Row():
                        eta = gr.Number(values["eta"], label="APG η", step=0.05, elem_id="eta")
                        momentum = gr.Number(values["momentum"], label="APG momentum", step=0.05, elem_id="momentum")
                        norm_threshold = gr.Number(
                            values["norm_threshold"], label="APG norm threshold", minimum=0, info="0 disables",
                            elem_id="norm_threshold",
                        )
                    with gr.Row():
                        context_frames = gr.Number(
                            values["context_frames"], label="Context window (frames)", precision=0, minimum=0,
                            info="4k+1, for clips past one window; a source video is then taken whole, not cut at "
                            "Frames. 0 or empty: off",
                            elem_id="context_frames",
                        )
                        context_overlap = gr.Number(
                            values["context_overlap"], label="Context overlap (frames)", precision=0, minimum=0,
                            info="shared by neighbouring windows; a multiple of 4 below the window",
                            elem_id="context_overlap",
                        )
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                result_video = gr.Video(
                    label="Result", interactive=False, visible=not start.is_image, elem_id="result_video"
                )
                result_image = gr.Image(
                    label="Result", type="filepath", interactive=False, visible=start.is_image, elem_id="result_image"
                )
                download = gr.File(label="Download", interactive=False, elem_id="download")
                prompt_used = gr.Textbox(label="Prompt used", interactive=False, elem_id="prompt_used")

        inputs = {
            "task_type": task, "prompt": prompt, "seed": seed, "video": video, "insert_video": insert_video,
            "image": image, "images": images, "negative_prompt": negative_prompt, "system_prompt": system_prompt,
            "guidance_mode": guidance_mode, "num_frames": num_frames, "height": height, "width": width,
            "max_image_size": max_image_size, "fps": fps, "num_inference_steps": num_inference_steps,
            "flow_shift": flow_shift, "omega_vid": omega_vid, "omega_img": omega_img, "omega_txt": omega_txt,
            "omega_scale": omega_scale, "eta": eta, "momentum": momentum, "norm_threshold": norm_threshold,
            "context_frames": context_frames, "context_overlap": context_overlap,
        }  # fmt: skip

        def on_task(task_type: str):
            spec = TASKS[parse_task_type(task_type)]
            shown = media_layout(spec)
            return (
                describe_task(spec),
                gr.update(value=spec.default_guidance_mode.value),
                gr.update(visible=shown.video),
                gr.update(visible=shown.insert_video),
                gr.update(visible=shown.image, label=shown.image_label),
                gr.update(visible=shown.images, label=shown.images_label),
                gr.update(interactive=not spec.is_image),
                gr.update(placeholder=spec.system_prompt),
                gr.update(visible=not spec.is_image),
                gr.update(visible=spec.is_image),
            )

        task.change(
            on_task,
            inputs=task,
            outputs=[
                task_info, guidance_mode, video, insert_video, image, images, num_frames, system_prompt,
                result_video, result_image,
            ],
            queue=False,  # a layout change must not wait behind a running generation
        )

        def on_generate(*values):
            *values, progress = values  # gradio passes the progress tracker last (see the signature below)
            request = dict(zip(inputs, values))
            try:
                path, used = generate(
                    pipe, request, save_dir=save_dir, prompt_enhancer=prompt_enhancer, progress=progress, budget=budget
                )
            except (ValueError, FileNotFoundError) as err:  # bad input: shown in the page, the server carries on
                raise gr.Error(mask_secrets(str(err)), print_exception=False) from None
            except OSError as err:  # the output could not be written (no space, file too large): nothing was kept
                raise gr.Error(mask_secrets(str(err)), print_exception=False) from None
            is_image = path.suffix == ".png"
            return (
                gr.update(value=None if is_image else str(path), visible=not is_image),
                gr.update(value=str(path) if is_image else None, visible=is_image),
                str(path),
                used,
            )

        # gradio names the API's parameters after the handler's (gradio_client's `view_api`, the API page): the input
        # names, as `bernini generate`'s flags, rather than param_0 ... param_25.
        on_generate.__signature__ = inspect.Signature(
            [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in inputs]
            + [inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress())]
        )
        run.click(
            on_generate,
            inputs=list(inputs.values()),
            outputs=[result_video, result_image, download, prompt_used],
            concurrency_limit=1,
            concurrency_id="generate",
        )
    # One pipeline, one generation at a time: the rest wait in the queue, with their position shown.
    demo.queue(default_concurrency_limit=1)
    demo.budget = budget
    demo.max_file_size = f"{max_upload_mb:g}mb"  # for launch(max_file_size=...): gradio refuses larger uploads
    return demo


# ------------------------------------------------------------------------------------------------ command line


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bernini demo`: the model and prompt-enhancer flags of `bernini generate` plus the official demo's
    server flags."""
    parser = subparsers.add_parser(
        "demo", help="serve the Gradio demo", formatter_class=options.HelpFormatter,
        description="Serve every Bernini-R task in a web page (Gradio). One generation runs at a time.",
    )
    options.add_model_arguments(parser.add_argument_group("model"))
    server = parser.add_argument_group("demo")
    options.add_size_arguments(parser.add_argument_group("the page's initial sizes"))
    server.add_argument("--flow_shift", type=float, default=5.0, help="the page's initial flow shift")
    server.add_argument(
        "--context_frames", type=int, default=0, help="the page's initial context window in frames (4k+1; 0: off)"
    )
    server.add_argument(
        "--context_overlap", type=int, default=DEFAULT_CONTEXT_OVERLAP,
        help="the page's initial context overlap in frames (a multiple of 4)",
    )  # fmt: skip
    server.add_argument("--ulysses", type=int, default=1, help="must be 1: the demo runs in one process")
    server.add_argument("--host", default=DEFAULT_HOST, help="address to bind; 0.0.0.0 serves the whole network")
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to bind")
    server.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    server.add_argument("--save_dir", default=DEFAULT_SAVE_DIR, help="where the PNG/MP4 results are written")
    budget = parser.add_argument_group("budget of one request (refused before it is queued)")
    budget.add_argument(
        "--max_tokens", type=int, default=None,
        help=f"the longest guidance branch in transformer tokens, as generate's (default: ${MAX_TOKENS_ENV}, else "
        f"{DEFAULT_MAX_TOKENS})",
    )
    budget.add_argument("--max_steps", type=int, default=DEMO_MAX_STEPS, help="the most denoising steps")
    budget.add_argument(
        "--max_upload_mb", type=float, default=DEMO_MAX_UPLOAD_MB, help="the largest uploaded file, in MB"
    )
    budget.add_argument("--max_uploads", type=int, default=DEMO_MAX_UPLOADS, help="the most media files per request")
    options.add_prompt_enhancer_arguments(parser.add_argument_group("prompt enhancer"))
    options.add_debug_argument(parser)
    parser.set_defaults(func=serve)
    return parser


def serve(args: argparse.Namespace) -> None:
    """Load the pipeline named by the flags and serve the page until interrupted.

    The page starts from the pipeline's defaults, with the size flags given (for `--model tiny`, small sizes and few
    steps unless they are given, as `bernini generate`).
    """
    if args.ulysses != 1:
        raise ValueError(
            f"`ulysses`={args.ulysses}: the demo serves one pipeline in one process; use 1 here, and run multi-GPU "
            "jobs with `torchrun --nproc_per_node N -m bernini_diffusers.cli generate --ulysses N ...`."
        )
    if not 0 < args.port < 65536:
        raise ValueError(f"`port`={args.port} must be in [1, 65535].")
    options.resolve_model(args)
    options.resolve_size_defaults(args)
    for name in options.SIZE_DEFAULTS:
        if getattr(args, name) < 1:
            raise ValueError(f"`{name}`={getattr(args, name)} must be >= 1.")
    from . import windows

    windows.check_context(args.context_frames or None, args.context_overlap)  # before the model loads
    defaults = {
        "flow_shift": args.flow_shift, "context_frames": args.context_frames, "context_overlap": args.context_overlap,
        **{name: getattr(args, name) for name in options.SIZE_DEFAULTS},
    }  # fmt: skip
    budget = {name: getattr(args, name) for name in ("max_tokens", "max_steps", "max_upload_mb", "max_uploads")}
    Budget(**budget)  # its values checked before the model loads
    options.check_environment(args)
    enhancer = options.load_prompt_enhancer(args)
    pipe = options.load_pipeline(args)
    save_dir = Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    demo = create_demo(pipe, save_dir=save_dir, prompt_enhancer=enhancer, defaults=defaults, **budget)
    demo.launch(
        server_name=args.host, server_port=args.port, share=args.share, show_error=True,
        allowed_paths=[str(save_dir.resolve())], max_file_size=f"{args.max_upload_mb:g}mb",
    )
