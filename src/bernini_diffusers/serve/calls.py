"""From an OpenAI videos request to one `BerniniPipeline` call, checked before the job is queued.

The request's own fields (`prompt`, `seconds`, `size`, `model`) map onto the call's (`num_frames` at the call's fps,
`width`/`height`); Bernini's own arguments come in the same body (the SDK's `extra_body`), as JSON values or, in a
multipart request, as form strings converted here. Media are never paths: the app stores uploads under the jobs folder
and passes their paths in `media`. Every problem is a `RequestError` naming the request field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..constants import TEMPORAL_FACTOR
from ..pipeline_bernini import BerniniPipeline
from ..tasks import TASKS, Need, TaskType, parse_task_type

# Bernini's call arguments a request may set, with the type a form string is converted to.
EXTRA_FIELDS: dict[str, type] = {
    "task_type": str, "negative_prompt": str, "system_prompt": str, "guidance_mode": str, "num_frames": int,
    "height": int, "width": int, "max_image_size": int, "fps": float, "num_inference_steps": int, "flow_shift": float,
    "omega_vid": float, "omega_img": float, "omega_txt": float, "omega_scale": float, "eta": float,
    "momentum": float, "norm_threshold": list, "seed": int, "context_frames": int, "context_overlap": int,
}  # fmt: skip
# The OpenAI fields of a create request; `input_reference`, `video` and `images` are media (uploads or job ids).
OPENAI_FIELDS = ("prompt", "model", "seconds", "size")
MEDIA_FIELDS = ("input_reference", "video", "images")
DEFAULT_SEED = 42  # the official command line's
SEED_RANGE = (0, 2**63 - 1)
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
_NAMED = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:\[\d+\])?`")


class RequestError(ValueError):
    r"""
    A request the server refuses, as OpenAI's error object.

    Args:
        message (`str`): What is wrong and what is allowed.
        param (`str`, *optional*): The request field at fault.
        status (`int`): The HTTP status (400 unless said).
        code (`str`, *optional*): A machine-readable code.
        kind (`str`): OpenAI's error `type`.
    """

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.headers = message, param, status, kind, headers
        self.code = code or ("invalid_value" if status == 400 else None)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class JobSpec:
    """What the store keeps of a checked request: the call (media relative to the jobs folder) and the OpenAI view."""

    call: dict[str, Any]
    seconds: str
    size: str
    steps: int


def _convert(name: str, value: Any, kind: type) -> Any:
    if isinstance(value, list) and kind is not list:
        if len(value) != 1:
            raise RequestError(f"`{name}` takes one value, got {len(value)}.", name)
        value = value[0]
    try:
        if kind is list:
            values = value if isinstance(value, list) else str(value).replace(",", " ").split()
            return [float(v) for v in values]
        if kind is str:
            if not isinstance(value, str):
                raise TypeError
            return value
        if isinstance(value, bool):
            raise TypeError
        if kind is int:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise TypeError
            return int(number)
        number = float(value)
        if not math.isfinite(number):
            raise TypeError
        return number
    except (TypeError, ValueError, OverflowError):
        what = {int: "an integer", float: "a finite number", str: "a string", list: "a list of numbers"}[kind]
        raise RequestError(f"`{name}`={value!r} must be {what}.", name) from None


def _frames_for(seconds: str, fps: float) -> int:
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0 or value > 3600:
        raise RequestError(f"`seconds`={seconds!r} must be a number of seconds in (0, 3600].", "seconds")
    # The VAE keeps 4k+1 frames: `seconds` of motion at `fps` is the nearest 4k frame steps plus the first frame.
    return max(1, round(value * fps / TEMPORAL_FACTOR)) * TEMPORAL_FACTOR + 1


def _param_of(message: str, renames: dict[str, str]) -> str | None:
    match = _NAMED.search(message)
    if match is None:
        return None
    return renames.get(match.group(1), match.group(1))


def build_job(
    fields: dict[str, Any],
    media: dict[str, Any],
    *,
    defaults: dict[str, Any],
    max_tokens: int,
    rope_length: int | None,
    default_task: str = "t2v",
) -> JobSpec:
    r"""
    Check a request and turn it into the pipeline call a worker will make.

    Args:
        fields (`dict`):
            The request's fields other than media: OpenAI's (`prompt`, `model`, `seconds`, `size`) and Bernini's
            (`EXTRA_FIELDS`). Values may be JSON values or form strings.
        media (`dict`):
            `video` and `images` as paths of files the server stored itself (uploads or a finished job's output);
            `input_reference` is a path added to the reference `images` first.
        defaults (`dict`):
            The server's size defaults (`num_frames`, `height`, `width`, `max_image_size`, `num_inference_steps`).
        max_tokens (`int`):
            The size budget of the longest guidance branch, as `bernini generate --max_tokens`.
        rope_length (`int`, *optional*):
            The model's rope table length per axis, when known.
        default_task (`str`):
            The task when the request names none and gives no media.

    Returns:
        `JobSpec`.

    Raises:
        `RequestError` naming the field, before anything is queued.
    """
    unknown = sorted(set(fields) - set(OPENAI_FIELDS) - set(EXTRA_FIELDS))
    if unknown:
        allowed = ", ".join([*OPENAI_FIELDS, *MEDIA_FIELDS, *EXTRA_FIELDS])
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; allowed: {allowed}.", unknown[0])
    prompt = fields.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("`prompt` is required: a non-empty string.", "prompt")
    call: dict[str, Any] = {"prompt": prompt}
    for name, kind in EXTRA_FIELDS.items():
        if fields.get(name) not in (None, ""):
            call[name] = _convert(name, fields[name], kind)

    images = list(media.get("images") or [])
    if media.get("input_reference") is not None:
        images.insert(0, media["input_reference"])
    video = media.get("video")
    if "task_type" not in call:
        call["task_type"] = TaskType.V2V.value if video else (TaskType.R2V.value if images else default_task)
    try:
        spec = TASKS[parse_task_type(call["task_type"])]
    except ValueError as err:
        raise RequestError(str(err), "task_type") from None
    if video is not None:
        call["video"] = video
    if images:
        call["images"] = images

    fps = call.get("fps", 16.0)
    seconds = fields.get("seconds")
    if isinstance(seconds, list) and len(seconds) == 1:
        seconds = seconds[0]
    if seconds not in (None, "") and not spec.is_image:
        frames = _frames_for(str(seconds), fps)
        if "num_frames" in call and call["num_frames"] != frames:
            raise RequestError(
                f"`seconds`={seconds!r} is {frames} frames at {fps:g} fps but `num_frames`={call['num_frames']}; "
                "give one of them.", "seconds",
            )  # fmt: skip
        call["num_frames"] = frames
    size = fields.get("size")
    if isinstance(size, list) and len(size) == 1:
        size = size[0]
    if size not in (None, ""):
        match = _SIZE.match(str(size))
        if match is None:
            raise RequestError(f"`size`={size!r} must be WIDTHxHEIGHT in pixels, e.g. 848x480.", "size")
        width, height = int(match.group(1)), int(match.group(2))
        for name, value in (("width", width), ("height", height)):
            if name in call and call[name] != value:
                raise RequestError(f"`size`={size!r} and `{name}`={call[name]} disagree; give one of them.", "size")
        call["width"], call["height"] = width, height
        if video is not None or spec.image is not Need.NO:
            call.setdefault("max_image_size", max(width, height))  # the output follows the source's aspect
    for name, value in defaults.items():
        call.setdefault(name, value)
    if spec.is_image:
        call["num_frames"] = 1
    seed = call.pop("seed", DEFAULT_SEED)
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise RequestError(f"`seed`={seed} must be in [0, 2**63-1].", "seed")

    renames = {"images": "input_reference" if media.get("input_reference") is not None and not media.get("images")
               else "images"}  # fmt: skip
    if "seconds" in fields:
        renames["num_frames"] = "seconds"
    if size not in (None, ""):
        renames.update(height="size", width="size")
    try:
        BerniniPipeline.validate_call(**call)
    except (ValueError, FileNotFoundError) as err:
        raise RequestError(str(err), _param_of(str(err), renames)) from None
    tokens, grid = BerniniPipeline.estimate_tokens(**call)
    frames_param = renames.get("num_frames", "num_frames")
    if call.get("context_frames") is not None:
        frames_param = "context_frames"
    size_param = "size" if size not in (None, "") else "max_image_size" if video or images else "height"
    if rope_length is not None and max(grid) > rope_length:
        param = frames_param if grid[0] > rope_length else size_param
        raise RequestError(
            f"the request spans {grid[0]}x{grid[1]}x{grid[2]} latent positions (frames/4+1 x H/16 x W/16), beyond the "
            f"model's rope table of {rope_length} per axis: lower `{param}`.", param,
        )  # fmt: skip
    if tokens > max_tokens:
        raise RequestError(
            f"the request needs about {tokens:,} transformer tokens in its longest guidance branch, more than this "
            f"server's limit of {max_tokens:,}: lower `{frames_param}`, `size` or `max_image_size`.",
            "size" if size not in (None, "") else frames_param,
        )  # fmt: skip
    call["seed"] = seed
    frames = call["num_frames"]
    shown_seconds = str(seconds) if seconds not in (None, "") else f"{(frames - 1) / fps:g}"
    shown_size = f"{call['width']}x{call['height']}"
    return JobSpec(call=call, seconds=shown_seconds, size=shown_size, steps=call["num_inference_steps"])
