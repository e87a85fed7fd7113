"""Prompt rewriting through any OpenAI-compatible chat-completions endpoint, before generation.

A short user instruction becomes the detailed prompt the renderer was trained on. Video tasks send three evenly
spaced frames of each video, image tasks the image files, as data URLs; reference tasks ask for a JSON reply. The
endpoint is configured like the official enhancer:

- key: `api_key`, else `BERNINI_PE_API_KEY`, else `OPENAI_API_KEY`;
- endpoint: `base_url`, else `BERNINI_PE_BASE_URL`, else `OPENAI_BASE_URL` (else OpenAI's own);
- model: `model`, else `BERNINI_PE_MODEL`, else `DEFAULT_PE_MODEL`.

`openai` (the `[pe]` extra) is imported when a request is made, never at package import. A failure of any kind (no
key, no `openai`, a timeout, an error status, a malformed reply) never raises: the raw prompt is returned and one
warning is logged. The key never appears in a log, an error or a repr.
"""

from __future__ import annotations

import base64
import enum
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_PE_MODEL = "gpt-5.4-2026-03-05"
API_KEY_ENV = ("BERNINI_PE_API_KEY", "OPENAI_API_KEY")
BASE_URL_ENV = ("BERNINI_PE_BASE_URL", "OPENAI_BASE_URL")
MODEL_ENV = "BERNINI_PE_MODEL"
FRAMES_PER_VIDEO = 3
# Status codes worth another try: the server may answer the same request later.
RETRYABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))

# ---------------------------------------------------------------------------------------------------- instructions

_DIRECTOR = (
    "You are a film director who turns a user's short idea into one rich, concrete prompt for a {medium} generation "
    "model. Keep every subject, object, number, colour and relation the user asked for; never drop or contradict any "
    "of them. Add what a camera would record: who or what is in the frame and how it looks, the setting, the light "
    "and the time of day, {motion}the shot size and the camera angle, and the visual style. Describe only what can "
    "be seen, in plain declarative sentences, without lists, headings or quotation marks. Stay under 150 words. "
    "Answer in the language of the user's idea, and answer with the prompt alone."
)
T2V_SYSTEM = _DIRECTOR.format(
    medium="text-to-video", motion="the movement of the subjects and of the camera over the clip, "
)
T2I_SYSTEM = _DIRECTOR.format(medium="text-to-image", motion="a single frozen moment (no motion over time), ")
HELPFUL_SYSTEM = "You are a helpful assistant."

_PLAIN_ANSWER = "Answer with the rewritten instruction alone, in the language of the user's instruction."
_JSON_ANSWER = (
    'Answer with a JSON object of the form {"rewritten_text": "..."} and nothing else; the rewritten instruction is '
    "its only value."
)

V2V_TEMPLATE = (
    "The images below are frames taken at the start, the middle and the end of a source video. A video editing "
    "model will apply this instruction to the video:\n\n{prompt}\n\n"
    "Rewrite the instruction so the editing model cannot misread it. Name the exact things to change, using what the "
    "frames show (position, colour, size, what surrounds them), say what the result should look like, and say that "
    "everything else (people, background, camera movement, lighting) stays as in the source unless the instruction "
    "changes it. Keep the user's intent; add no new edits. " + _PLAIN_ANSWER
)
I2I_TEMPLATE = (
    "The first image below is the picture to edit; any further images are references the instruction may point to. "
    "An image editing model will apply this instruction:\n\n{prompt}\n\n"
    "Rewrite the instruction so the editing model cannot misread it: name the exact regions or objects to change, "
    "describe the intended result (shape, material, colour, light), and say that the rest of the picture stays "
    "unchanged. Keep the user's intent; add no new edits. " + _PLAIN_ANSWER
)
I2V_TEMPLATE = (
    "The image below is the first frame of a video still to be generated. The user describes the video:\n\n{prompt}"
    "\n\nRewrite the description as a prompt for an image-to-video model: start from what the frame shows, then say "
    "how the subjects move, how the camera moves and how the scene evolves over about five seconds. Do not describe "
    "a different starting picture. " + _PLAIN_ANSWER
)
ADS2V_TEMPLATE = (
    "The images below are frames of two videos: first three frames of the source scene (start, middle, end), then "
    "three frames of the product or advertisement clip to insert into it. An ad-insertion model will follow this "
    "instruction:\n\n{prompt}\n\n"
    "Rewrite the instruction precisely: identify the inserted product from its frames (kind, shape, colours, logo or "
    "text), say where and at what size it appears in the scene, how it is lit and how it interacts with the people "
    "or surfaces around it, and that the rest of the scene and the camera motion stay unchanged. " + _PLAIN_ANSWER
)
VI2V_TEMPLATE = (
    "The first three images below are frames of a source video (start, middle, end); the images after them are "
    "reference pictures whose content should be carried into the video. A video editing model will follow this "
    "instruction:\n\n{prompt}\n\n"
    "Rewrite it so the model cannot misread it: say which content from the references goes where in the video, how "
    "it should look there, and that everything else in the video stays unchanged. " + _PLAIN_ANSWER
)
R2V_TEMPLATE = (
    "The images below are reference pictures of subjects (people, animals, objects or places). In the rewritten "
    "text they are called image0, image1, ... in the order shown: [Image 0] is image0, [Image 1] is image1, and so on. "
    "A reference-to-video model will make a new video from this request:\n\n{prompt}\n\n"
    "Rewrite the request as a detailed video prompt. Mention every reference the video uses by its name (image0, "
    "image1, ...) at the point where it appears, with a few words on what it is, and describe the setting, the "
    "action over about five seconds, the camera and the light. Do not describe details the references contradict. "
    + _JSON_ANSWER
)
R2I_TEMPLATE = (
    "The images below are reference pictures of subjects. In the rewritten text they are called image0, image1, ... "
    "in the order shown: [Image 0] is image0, [Image 1] is image1, and so on. A reference-to-image model will make "
    "a new picture from this request:\n\n{prompt}\n\n"
    "Rewrite the request as a detailed image prompt. Mention every reference the picture uses by its name (image0, "
    "image1, ...) with a few words on what it is, and describe the composition, the setting and the light. "
    + _JSON_ANSWER
)
VR2V_TEMPLATE = (
    "The first three images below are frames of a source video (start, middle, end). The images after them are "
    "reference pictures; in the rewritten text the references are called image0, image1, ... in their order, so the "
    "first picture after the three frames is image0. A video editing model will follow this instruction:\n\n"
    "{prompt}\n\n"
    "Rewrite the instruction so the model cannot misread it: name what in the video changes, say which reference "
    "(image0, image1, ...) it takes its appearance from, and keep the motion, the background and the camera of the "
    "source video unless the instruction changes them. " + _JSON_ANSWER
)


class _Media(enum.Enum):
    FRAMES = "three frames of each video"
    IMAGE = "the source image"
    IMAGES = "the reference images"
    FIRST_FRAME = "the images, else the first frame of the video"


@dataclass(frozen=True)
class _Route:
    """What one task sends: the system message, the user template (None: the raw prompt), the media, JSON mode."""

    system: str
    template: str | None
    media: tuple[_Media, ...] = ()
    json_mode: bool = False


ROUTES: dict[str, _Route] = {
    "t2v": _Route(T2V_SYSTEM, None),
    "t2i": _Route(T2I_SYSTEM, None),
    "v2v": _Route(HELPFUL_SYSTEM, V2V_TEMPLATE, (_Media.FRAMES,)),
    "mv2v": _Route(HELPFUL_SYSTEM, V2V_TEMPLATE, (_Media.FRAMES,)),
    "i2i": _Route(HELPFUL_SYSTEM, I2I_TEMPLATE, (_Media.IMAGE, _Media.IMAGES)),
    "i2v": _Route(HELPFUL_SYSTEM, I2V_TEMPLATE, (_Media.FIRST_FRAME,)),
    "ads2v": _Route(HELPFUL_SYSTEM, ADS2V_TEMPLATE, (_Media.FRAMES,)),
    "vi2v": _Route(HELPFUL_SYSTEM, VI2V_TEMPLATE, (_Media.FRAMES, _Media.IMAGES)),
    "r2v": _Route(HELPFUL_SYSTEM, R2V_TEMPLATE, (_Media.IMAGES,), json_mode=True),
    "r2i": _Route(HELPFUL_SYSTEM, R2I_TEMPLATE, (_Media.IMAGES,), json_mode=True),
    "rv2v": _Route(HELPFUL_SYSTEM, VR2V_TEMPLATE, (_Media.FRAMES, _Media.IMAGES), json_mode=True),
    "vrc2v": _Route(HELPFUL_SYSTEM, VR2V_TEMPLATE, (_Media.FRAMES, _Media.IMAGES), json_mode=True),
}

# ---------------------------------------------------------------------------------------------------- media


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_data_url(image: str | os.PathLike | Image.Image) -> str:
    """A data URL of an image: a file's own bytes with its own MIME type, or a PIL image encoded as PNG."""
    if isinstance(image, Image.Image):
        return _png_data_url(image)
    path = Path(image)
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as opened:  # raises on a file that is not an image
        mime = Image.MIME.get(opened.format or "", "image/png")
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def evenly_spaced(total: int, count: int = FRAMES_PER_VIDEO) -> list[int]:
    """`count` frame indices spread from the first to the last frame: `round(i * (total - 1) / (count - 1))`."""
    if total <= 0:
        raise ValueError(f"a video needs at least one frame, got {total}")
    if count == 1:
        return [0]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def video_frames(video: Any, count: int = FRAMES_PER_VIDEO) -> list[Image.Image]:
    """`count` evenly spaced frames of a video file (read with imageio's ffmpeg, as `media.read_video`) or of frames."""
    if isinstance(video, (str, os.PathLike)):
        import imageio

        reader = imageio.get_reader(Path(video), "ffmpeg")
        try:
            indices = evenly_spaced(reader.count_frames(), count)
            # One decoding pass keeps only the frames asked for, not the whole clip.
            kept, last = {}, None
            for i, frame in enumerate(reader):
                last = frame
                if i in indices:
                    kept[i] = np.asarray(frame)
                if i >= indices[-1]:
                    break
        finally:
            reader.close()
        if last is None:
            raise ValueError(f"no frame could be decoded from '{video}'")
        # A container may announce more frames than it decodes: the last decoded one stands in.
        return [Image.fromarray(kept.get(i, np.asarray(last))) for i in indices]
    frames = list(video)
    return [f if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f)) for f in
            (frames[i] for i in evenly_spaced(len(frames), count))]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- the enhancer


class _MalformedReply(Exception):
    """The endpoint answered, but not with a usable prompt."""


class PromptEnhancer:
    r"""
    Rewrites a prompt for a task through an OpenAI-compatible chat-completions endpoint.

    Args:
        model (`str`, *optional*):
            The chat model. Defaults to `$BERNINI_PE_MODEL`, else `DEFAULT_PE_MODEL`.
        api_key (`str`, *optional*):
            Defaults to `$BERNINI_PE_API_KEY`, else `$OPENAI_API_KEY`. Never logged or shown in the repr.
        base_url (`str`, *optional*):
            The endpoint, e.g. `http://127.0.0.1:8000/v1`. Defaults to `$BERNINI_PE_BASE_URL`, else
            `$OPENAI_BASE_URL`, else OpenAI's.
        timeout (`float`, defaults to 120):
            Seconds one request may take.
        max_retries (`int`, defaults to 7):
            Further attempts after a failed one (a timeout, a connection error, a 408/409/429/5xx status, a malformed
            reply); other error statuses are not retried.
        backoff (`float`, defaults to 1.0):
            Seconds before retry `k` are `min(backoff * k, max_backoff)`.
        max_backoff (`float`, defaults to 5.0):
            The longest wait between attempts.
        max_completion_tokens (`int`, defaults to 8192):
            Passed to the endpoint; reasoning models count their reasoning in it.
    """

    def __init__(
        self,
        model: str | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 7,
        backoff: float = 1.0,
        max_backoff: float = 5.0,
        max_completion_tokens: int = 8192,
    ):
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"`timeout`={timeout!r} must be a positive number of seconds.")
        if not (isinstance(max_retries, int) and max_retries >= 0):
            raise ValueError(f"`max_retries`={max_retries!r} must be an integer >= 0.")
        if not (isinstance(backoff, (int, float)) and backoff >= 0 and max_backoff >= 0):
            raise ValueError(f"`backoff`={backoff!r} and `max_backoff`={max_backoff!r} must be numbers >= 0.")
        self.model = model or os.environ.get(MODEL_ENV) or DEFAULT_PE_MODEL
        self.base_url = base_url or _first_env(BASE_URL_ENV)
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_completion_tokens = max_completion_tokens
        self._api_key = api_key or _first_env(API_KEY_ENV)
        self._client = None
        self._unavailable: str | None = None  # set once when no request can ever work (no key, no openai)

    def __repr__(self) -> str:
        key = "set" if self._api_key else "unset"
        return (
            f"PromptEnhancer(model={self.model!r}, base_url={self.base_url!r}, api_key=<{key}>, "
            f"timeout={self.timeout}, max_retries={self.max_retries})"
        )

    # ------------------------------------------------------------------------------------------- requests

    def build_messages(
        self, prompt: str, task_type: str, video: Any = None, image: Any = None, images: Sequence[Any] | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """The chat messages for one prompt and whether the reply is JSON; raises on an unknown task or bad media."""
        if task_type not in ROUTES:
            raise ValueError(f"`task_type`={task_type!r} has no enhancer template; choose one of: {', '.join(ROUTES)}.")
        route = ROUTES[task_type]
        if route.template is None:
            return [{"role": "system", "content": route.system}, {"role": "user", "content": prompt}], route.json_mode
        # The pipeline's own reading of `video` (a path, decoded frames, or a list of either), so both see the same
        # videos; the pipeline is loaded by then wherever an enhancer runs.
        from .pipeline_bernini import _split_videos

        urls: list[str] = []
        videos = _split_videos(video)
        for kind in route.media:
            if kind is _Media.FRAMES:
                urls += [_png_data_url(frame) for v in videos for frame in video_frames(v)]
            elif kind is _Media.IMAGE and image is not None:
                urls.append(image_data_url(image))
            elif kind is _Media.IMAGES:
                urls += [image_data_url(img) for img in images or []]
            elif kind is _Media.FIRST_FRAME:
                if images:
                    urls += [image_data_url(img) for img in images]
                elif videos:
                    urls.append(_png_data_url(video_frames(videos[0], count=1)[0]))
        content: list[dict[str, Any]] = [{"type": "text", "text": route.template.replace("{prompt}", prompt)}]
        for i, url in enumerate(urls):
            content += [{"type": "text", "text": f"\n[Image {i}]:"}, {"type": "image_url", "image_url": {"url": url}}]
        return [{"role": "system", "content": route.system}, {"role": "user", "content": content}], route.json_mode

    def enhance(
        self,
        prompt: str,
        task_type: str,
        video: Any = None,
        image: Any = None,
        images: Sequence[Any] | None = None,
    ) -> str:
        """The rewritten prompt, or `prompt` itself when it is empty, the task has no template, or the request fails.

        `video`, `image` and `images` are what the pipeline takes (paths, PIL images or decoded frames). Never raises
        on endpoint failure: the raw prompt is returned and one warning is logged.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            return prompt
        task = str(task_type)  # a TaskType's str is its value
        if task not in ROUTES:
            logger.info("prompt enhancer: no template for task_type=%r; the prompt is used as given.", task)
            return prompt
        client = self._get_client()
        if client is None:
            return prompt
        try:
            messages, json_mode = self.build_messages(prompt, task, video, image, images)
        except Exception as err:  # unreadable media: enhancing is optional, generation goes on
            self._warn(f"cannot read the media of task_type={task!r} ({type(err).__name__}: {err})")
            return prompt

        request = {"model": self.model, "messages": messages, "max_completion_tokens": self.max_completion_tokens}
        if json_mode:
            request["response_format"] = {"type": "json_object"}
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff * attempt, self.max_backoff))
            try:
                reply = client.chat.completions.create(**request)
                return self._read_reply(reply, json_mode)
            except Exception as err:
                error = err
                if not _retryable(err):
                    break
        self._warn(f"gave up after {attempt + 1} attempt(s) ({_describe(error)})")
        return prompt

    # ------------------------------------------------------------------------------------------- helpers

    def _get_client(self):
        if self._client is not None or self._unavailable is not None:
            return self._client
        try:
            import openai
        except ImportError:
            self._unavailable = 'the `openai` package is not installed (pip install "bernini_diffusers[pe]")'
        else:
            if not self._api_key:
                self._unavailable = f"no API key: set {' or '.join(API_KEY_ENV)}"
            else:
                # Retries are ours (bounded, with backoff and one warning), so the SDK makes a single attempt.
                self._client = openai.OpenAI(
                    api_key=self._api_key, base_url=self.base_url, timeout=self.timeout, max_retries=0
                )
        if self._unavailable is not None:
            self._warn(self._unavailable)
        return self._client

    @staticmethod
    def _read_reply(reply: Any, json_mode: bool) -> str:
        try:
            text = reply.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            raise _MalformedReply("the reply has no message") from None
        if not isinstance(text, str) or not text.strip():
            raise _MalformedReply("the reply is empty")
        if not json_mode:
            return text.strip()
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise _MalformedReply("the reply is not the JSON object asked for") from None
        rewritten = value.get("rewritten_text") if isinstance(value, dict) else None
        if not isinstance(rewritten, str) or not rewritten.strip():
            raise _MalformedReply("the JSON reply has no non-empty 'rewritten_text'")
        return rewritten.strip()

    def _warn(self, reason: str) -> None:
        if self._api_key:  # an endpoint may echo the key in an error body; it must not reach the log
            reason = reason.replace(self._api_key, "***")
        logger.warning("prompt enhancer: %s; using the raw prompt.", reason)


def _first_env(names: Sequence[str]) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _retryable(error: Exception) -> bool:
    if isinstance(error, (_MalformedReply, json.JSONDecodeError)):
        return True  # a sampled reply may be well-formed next time
    import openai

    if isinstance(error, openai.APIStatusError):
        return error.status_code in RETRYABLE_STATUS
    # Timeouts, refused connections and bodies that are not JSON at all.
    return isinstance(error, (openai.APIConnectionError, openai.APIResponseValidationError))


def _describe(error: Exception | None) -> str:
    if isinstance(error, _MalformedReply):
        return str(error)
    if isinstance(error, json.JSONDecodeError):
        return f"the response body is not JSON ({error})"
    status = getattr(error, "status_code", None)
    detail = f"HTTP {status}" if status is not None else type(error).__name__
    message = str(error).strip()
    return f"{detail}: {message}" if message else detail
