"""Prompt rewriting through any OpenAI-compatible chat-completions endpoint, before generation.

A short user instruction becomes the detailed prompt the renderer was trained on. Video tasks send three evenly
spaced frames of each video, image tasks the image files, as data URLs; reference tasks ask for a JSON reply. The
endpoint is configured like the official enhancer:

- key: `api_key`, else `BERNINI_PE_API_KEY`, else `OPENAI_API_KEY`;
- endpoint: `base_url`, else `BERNINI_PE_BASE_URL`, else `OPENAI_BASE_URL` (else OpenAI's own);
- model: `model`, else `BERNINI_PE_MODEL`, else `DEFAULT_PE_MODEL`.

`openai` (the `[pe]` extra) is imported when a request is made, never at package import. A failure of any kind (no
key, no `openai`, a timeout, an error status, a malformed reply) never raises: the raw prompt is returned and one
warning is logged. One prompt costs at most `PromptEnhancer.budget` seconds (63 s by default; `timeout`,
`max_retries`, or `BERNINI_PE_TIMEOUT`, `BERNINI_PE_RETRIES`), and an endpoint that fails it is not asked again by
the same enhancer. Credentials (the key, those in the base URL, any the endpoint echoes) never appear in a log, an
error or a repr, and `printable` escapes the control characters of a reply before it is shown.
"""

from __future__ import annotations

import base64
import enum
import io
import json
import logging
import numbers
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import imageio
import numpy as np
from PIL import Image

from . import media, redaction
from .constants import (
    PE_MAX_RETRIES,
    PE_MAX_TIMEOUT,
    PE_RETRIES,
    PE_RETRIES_ENV,
    PE_TIMEOUT,
    PE_TIMEOUT_ENV,
)
from .redaction import mask_secrets, printable  # noqa: F401  (`printable` re-exported: its home before `redaction`)

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


class _NoReply(Exception):
    """No reply came in the time the request had: the endpoint hangs, or answers too slowly."""


class PromptEnhancer:
    r"""
    Rewrites a prompt for a task through an OpenAI-compatible chat-completions endpoint.

    One prompt never costs more than `budget` seconds: every try's `timeout` plus the waits between tries (63 s with
    the defaults: 3 tries of 20 s, waits of 1 s and 2 s), however the endpoint behaves. An endpoint that fails a
    prompt this way (no answer in time, no connection, 408/409/429/5xx on every try, or 401/403/404) is not asked
    again by this enhancer: one warning says so, and every later prompt is returned as given at once.

    Args:
        model (`str`, *optional*):
            The chat model. Defaults to `$BERNINI_PE_MODEL`, else `DEFAULT_PE_MODEL`.
        api_key (`str`, *optional*):
            Defaults to `$BERNINI_PE_API_KEY`, else `$OPENAI_API_KEY`. Never logged or shown in the repr.
        base_url (`str`, *optional*):
            The endpoint, e.g. `http://127.0.0.1:8000/v1`. Defaults to `$BERNINI_PE_BASE_URL`, else
            `$OPENAI_BASE_URL`, else OpenAI's. Credentials in it (`https://user:password@host/v1`) and its query
            (`?api_key=...`, sent with every request) are masked wherever the enhancer shows or logs it.
        timeout (`float`, *optional*):
            Seconds one request may take, in (0, 3600]. Defaults to `$BERNINI_PE_TIMEOUT`, else 20.
        max_retries (`int`, *optional*):
            Further tries after a failed one (a timeout, a connection error, a 408/409/429/5xx status, a malformed
            reply), from 0 to 100; other error statuses are not retried. Defaults to `$BERNINI_PE_RETRIES`, else 2.
        backoff (`float`, defaults to 1.0):
            Seconds before retry `k` are `min(backoff * k, max_backoff)`.
        max_backoff (`float`, defaults to 5.0):
            The longest wait between tries.
        max_completion_tokens (`int`, defaults to 8192):
            Passed to the endpoint; reasoning models count their reasoning in it.
    """

    def __init__(
        self,
        model: str | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        backoff: float = 1.0,
        max_backoff: float = 5.0,
        max_completion_tokens: int = 8192,
    ):
        self.timeout = _setting(timeout, "timeout", PE_TIMEOUT_ENV, PE_TIMEOUT, _seconds)
        self.max_retries = _setting(max_retries, "max_retries", PE_RETRIES_ENV, PE_RETRIES, _count)
        for name, value in (("backoff", backoff), ("max_backoff", max_backoff)):
            if isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0 <= value <= PE_MAX_TIMEOUT):
                raise ValueError(f"`{name}`={value!r} must be a number of seconds in [0, {PE_MAX_TIMEOUT:g}].")
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.model = model or os.environ.get(MODEL_ENV) or DEFAULT_PE_MODEL
        source, url = ("base_url", base_url) if base_url else _first_env(BASE_URL_ENV)
        self._endpoint = _Endpoint.parse(url, source) if url else None
        self.max_completion_tokens = max_completion_tokens
        self._api_key = api_key or _first_env(API_KEY_ENV)[1]
        _SECRETS.update(_secret_forms(self._api_key))
        _guard_loggers()
        self._client = None
        self._unavailable: str | None = None  # set once when no request can ever work (no key, no openai)
        self._gave_up: str | None = None  # set once when the endpoint failed a prompt's budget

    @property
    def base_url(self) -> str | None:
        """The endpoint with any credentials and query values masked (None: OpenAI's own)."""
        return self._endpoint.shown if self._endpoint else None

    @property
    def budget(self) -> float:
        """The most seconds one prompt may cost: every try's timeout plus the waits between tries."""
        waits = sum(min(self.backoff * k, self.max_backoff) for k in range(1, self.max_retries + 1))
        return self.timeout * (self.max_retries + 1) + waits

    def __repr__(self) -> str:
        key = "set" if self._api_key else "unset"
        return (
            f"PromptEnhancer(model={self.model!r}, base_url={self.base_url!r}, api_key=<{key}>, "
            f"timeout={self.timeout:g}, max_retries={self.max_retries}, budget={self.budget:g})"
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
        # videos.
        urls: list[str] = []
        videos = media.split_videos(video)
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
        on endpoint failure and never takes more than `budget` seconds of requests: the raw prompt is returned and
        one warning is logged. After the endpoint failed once (see the class), the prompt comes back at once.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            return prompt
        task = str(task_type)  # a TaskType's str is its value
        if task not in ROUTES:
            logger.info("prompt enhancer: no template for task_type=%r; the prompt is used as given.", task)
            return prompt
        if self._gave_up is not None:  # said once, in the warning that gave up
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
        start = time.monotonic()
        deadline = start + self.budget
        error: Exception | None = None
        attempts = 0
        out_of_time = False
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(max(0.0, min(self.backoff * attempt, self.max_backoff, deadline - time.monotonic())))
            left = deadline - time.monotonic()
            if left <= 0:
                out_of_time = True
                break
            attempts += 1
            try:
                return self._read_reply(self._request(client, request, min(self.timeout, left)), json_mode)
            except Exception as err:
                error = err
                if not _retryable(err):
                    break
        what = f"gave up after {attempts} attempt(s) in {time.monotonic() - start:.1f} s ({_describe(error)})"
        if out_of_time or _endpoint_failed(error):
            self._gave_up = what
            self._warn(
                f"{self.base_url or 'the OpenAI API'} {what}",
                "using the raw prompt now and, without asking the endpoint again, for every later prompt of this "
                "enhancer",
            )
        else:
            self._warn(what)
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
                endpoint = self._endpoint
                try:
                    # Retries are ours (bounded by the budget, with one warning), so the SDK makes a single attempt.
                    self._client = openai.OpenAI(
                        api_key=self._api_key,
                        base_url=endpoint.url if endpoint else None,
                        default_query=endpoint.query if endpoint else None,
                        timeout=self.timeout,
                        max_retries=0,
                    )
                except Exception as err:
                    self._unavailable = f"cannot set up the client ({type(err).__name__}: {err})"
        if self._unavailable is not None:
            self._warn(self._unavailable)
        return self._client

    @staticmethod
    def _request(client: Any, request: dict[str, Any], seconds: float) -> Any:
        """One chat-completions request that returns or raises within `seconds`, whatever the server does."""
        _guard_loggers()  # the HTTP stack creates some of its loggers on first use
        outcome: list[Any] = []
        done = threading.Event()

        def call() -> None:
            try:
                outcome.append(client.chat.completions.create(**request, timeout=seconds))
            except BaseException as err:  # handed to the caller, never printed by the thread
                outcome.append(err)
            finally:
                done.set()

        # The HTTP client's timeout bounds each read, so a server that sends a byte now and then would hold a request
        # for ever: the wait on a thread bounds the whole request. A request given up on is left to end in its daemon
        # thread (at its own timeout, or when the server stops) and its answer is dropped.
        threading.Thread(target=call, name="prompt-enhancer-request", daemon=True).start()
        if not done.wait(seconds):
            raise _NoReply(f"no reply within {seconds:.3g} s")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

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

    @staticmethod
    def _warn(reason: str, outcome: str = "using the raw prompt") -> None:
        # An endpoint may echo credentials or terminal escapes in an error body: neither reaches the log.
        logger.warning("prompt enhancer: %s; %s.", printable(mask_secrets(reason)), outcome)


# ---------------------------------------------------------------------------------------------------- settings


def _setting(value: Any, name: str, env: str, default: Any, check: Callable[[Any, str], Any]) -> Any:
    """The argument if given, else the environment variable if set, else the default; checked, naming its source."""
    if value is not None:
        return check(value, name)
    if os.environ.get(env, "").strip():
        return check(os.environ[env], env)
    return default


def _number(value: Any, kind: type) -> Any:
    """`value` (a number or its text) as an int or a float; None if it is not one."""
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            return None
    if isinstance(value, bool):
        return None
    if kind is int:
        return int(value) if isinstance(value, numbers.Integral) else None
    return float(value) if isinstance(value, numbers.Real) else None


def _seconds(value: Any, name: str) -> float:
    seconds = _number(value, float)
    if seconds is None or not 0 < seconds <= PE_MAX_TIMEOUT:  # NaN fails every comparison
        raise ValueError(f"`{name}`={value!r} must be a number of seconds in (0, {PE_MAX_TIMEOUT:g}].")
    return seconds


def _count(value: Any, name: str) -> int:
    count = _number(value, int)
    if count is None or not 0 <= count <= PE_MAX_RETRIES:
        raise ValueError(f"`{name}`={value!r} must be a whole number from 0 to {PE_MAX_RETRIES}.")
    return count


def _first_env(names: Sequence[str]) -> tuple[str | None, str | None]:
    """The first of the environment variables that is set, and its value."""
    for name in names:
        if os.environ.get(name):
            return name, os.environ[name]
    return None, None


# ---------------------------------------------------------------------------------------------------- secrets


@dataclass(frozen=True)
class _Endpoint:
    """A base URL split for the client and for display."""

    url: str  # what the client gets: scheme, credentials, host and path
    query: dict[str, str] | None  # the URL's query, sent with every request (the SDK would append paths after it)
    shown: str  # the URL with its credentials and query values masked

    @classmethod
    def parse(cls, url: str, name: str) -> _Endpoint:
        try:
            parts = urlsplit(url.strip())
        except ValueError as err:  # its text may hold the URL
            raise ValueError(f"`{name}` is not a valid URL ({type(err).__name__}).") from None
        userinfo, at, host = parts.netloc.rpartition("@")
        pieces = [piece for piece in parts.query.split("&") if piece]
        shown_query = "&".join(p.partition("=")[0] + "=***" if "=" in p else "***" for p in pieces)
        shown = urlunsplit((parts.scheme, f"***@{host}" if at else host, parts.path, shown_query, ""))
        if parts.scheme.lower() not in ("http", "https") or not host:
            if "@" in url and not at:  # no scheme ('user:pw@host'): urlsplit took the credentials for a scheme or path
                tail = url.strip().rpartition("@")[2]
                shown = "***@" + tail.partition("?")[0] + ("?***" if "?" in tail else "")
            raise ValueError(f"`{name}`={shown!r} must be an http(s) URL, e.g. http://127.0.0.1:8000/v1.")
        user, colon, password = userinfo.partition(":")
        # With a password the user name is an account; alone it is a token (https://TOKEN@host).
        secrets = _secret_forms(password if colon else user)
        if at:
            basic = f"{unquote(user)}:{unquote(password)}".encode()
            encoded = base64.b64encode(basic).decode("ascii")
            secrets |= {encoded, encoded.rstrip("=")}  # as an echoed `Basic ...` header, padded or not
        query = parse_qsl(parts.query, keep_blank_values=True)
        for piece in pieces:
            secrets |= _secret_forms(piece.partition("=")[2] or piece)
        _SECRETS.update(secrets)
        client_url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        return cls(url=client_url, query=dict(query) or None, shown=shown)


# The masking lives in `redaction` (used by every front end); these names are kept for the enhancer and its users.
_SECRETS = redaction._SECRETS
_MIN_SECRET = redaction._MIN_SECRET
_USERINFO = redaction._USERINFO
_AUTH_HEADER = redaction._AUTH_HEADER
_SECRET_PARAM = redaction._SECRET_PARAM
_secret_forms = redaction.secret_forms
_MaskSecrets = redaction.MaskSecrets
_MASK = redaction.MASK
# The loggers that may see a request: a filter acts only on records of the logger it is attached to.
_HTTP_LOGGERS = ("openai", "httpx", "httpx2", "httpcore", "httpcore2")
# Those that log request URLs, named before the SDK is imported; the others are found once they exist.
_URL_LOGGERS = ("openai._base_client", "httpx", "httpx2")


def _guard_loggers() -> None:
    """Attach the masking filter to this module's logger and to every logger of the HTTP stack that exists."""
    names = [__name__, *_HTTP_LOGGERS, *_URL_LOGGERS]
    names += [name for name in list(logging.root.manager.loggerDict) if name.split(".")[0] in _HTTP_LOGGERS]
    for name in names:
        target = logging.getLogger(name)
        if _MASK not in target.filters:
            target.addFilter(_MASK)


# ---------------------------------------------------------------------------------------------------- failures

# Status codes that refuse every prompt of this enhancer alike: its credentials, its permissions, its model's name.
ENDPOINT_STATUS = frozenset({401, 403, 404})


def _retryable(error: Exception) -> bool:
    if isinstance(error, (_MalformedReply, _NoReply, json.JSONDecodeError)):
        return True  # a sampled reply may be well-formed next time; a stalled connection may not stall again
    import openai

    if isinstance(error, openai.APIStatusError):
        return error.status_code in RETRYABLE_STATUS
    # Timeouts, refused connections and bodies that are not JSON at all.
    return isinstance(error, (openai.APIConnectionError, openai.APIResponseValidationError))


def _endpoint_failed(error: Exception | None) -> bool:
    """Whether `error`, the last of a prompt's tries, says the endpoint fails whatever the prompt."""
    if isinstance(error, _NoReply):
        return True
    if error is None or isinstance(error, (_MalformedReply, json.JSONDecodeError)):
        return False  # it answered: the next prompt may get a usable reply
    import openai

    if isinstance(error, openai.APIStatusError):
        return error.status_code in RETRYABLE_STATUS | ENDPOINT_STATUS
    return isinstance(error, openai.APIConnectionError)


def _describe(error: Exception | None) -> str:
    if isinstance(error, _MalformedReply):
        return str(error)
    if isinstance(error, _NoReply):
        return f"Timeout: {error}"
    if isinstance(error, json.JSONDecodeError):
        return f"the response body is not JSON ({error})"
    status = getattr(error, "status_code", None)
    detail = f"HTTP {status}" if status is not None else type(error).__name__
    message = str(error).strip()
    return f"{detail}: {message}" if message else detail
