"""Media input and output of the Bernini-R renderer.

Loading, resizing and frame sampling reproduce the official renderer's preprocessing exactly
(bicubic PIL resize to a stride-16 size, values in [-1, 1], `smart_video_nframes` sampling),
so that conditioning media reach the model bit-identical to the reference implementation.
The writer turns decoded frames into a PNG (one frame) or an H.264 MP4 (several frames),
atomically and verified: the output path either holds a complete, readable file or nothing.
The probes check input media cheaply (the container and the first frame) so that a bad file
fails before any model work.
"""

from __future__ import annotations

import errno
import glob
import math
import numbers
import os
import re
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence, Union

import imageio
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .constants import MAX_FPS, MIN_FPS, TEMPORAL_FACTOR

FFMPEG_INSTALL = "pip install imageio-ffmpeg"


def _ffmpeg():
    """The `imageio_ffmpeg` module (it ships the ffmpeg binary every video read and write runs), imported where a video
    is read or written: the package, its images and its models work without it."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise ImportError(
            f"reading or writing a video needs imageio-ffmpeg, which ships ffmpeg; install it with `{FFMPEG_INSTALL}`."
        ) from None
    return imageio_ffmpeg

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "existing_path",
    "make_divisible",
    "target_size",
    "to_model_tensor",
    "load_image",
    "sample_frame_indices",
    "read_video",
    "load_video",
    "check_video_length",
    "write_output",
    "temporaries",
    "split_videos",
    "OutputWriteError",
    "VideoProbe",
    "probe_video",
    "probe_image",
    "is_complete_output",
    "check_fps",
    "MIN_FPS",
    "MAX_FPS",
]

# (what the system or ffmpeg prints, its errno, the cause in words)
_SYSTEM_CAUSES = (
    ("No space left on device", errno.ENOSPC, "no space left on device"),
    ("File too large", errno.EFBIG, "file too large: a file-size limit (such as `ulimit -f`) was reached"),
    ("Disk quota exceeded", errno.EDQUOT, "disk quota exceeded"),
)

_MIN_FRAMES = 5


def make_divisible(value: float, stride: int = 16) -> int:
    """Nearest multiple of `stride` (built-in round, so ties go to even), at least `stride`."""
    return max(stride, round(value / stride) * stride)


def target_size(width: int, height: int, max_image_size: int, stride: int = 16) -> tuple[int, int]:
    """Model-side (width, height): longest side near `max_image_size`, never upscaled, aspect kept."""
    scale = min(max_image_size / max(width, height), 1.0)
    new_w = make_divisible(round(width * scale), stride)
    new_h = make_divisible(round(height * scale), stride)
    # Rounding to the stride can overshoot the limit; the official code rescales exactly once.
    if max(new_w, new_h) > max_image_size:
        scale = max_image_size / max(new_w, new_h)
        new_w = make_divisible(round(new_w * scale), stride)
        new_h = make_divisible(round(new_h * scale), stride)
    return new_w, new_h


def _model_frame(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """One frame as the model takes it: RGB, bicubic-resized to `size` (width, height) when it differs; HxWx3 uint8."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    if image.size != size:
        image = image.resize(size, Image.BICUBIC)
    return np.asarray(image)


def _to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """Map float32 values in [0, 255] to [-1, 1] in place.

    Same operations in the same order as the reference (/255 then *2-1, each rounded in float32), so the values
    match it bit for bit, without the float32 copies that out-of-place arithmetic makes.
    """
    return pixels.div_(255.0).mul_(2.0).sub_(1.0)


class _FrameSampler:
    """Builds the `[3, T, H, W]` model tensor one source frame at a time, keeping only the sampled frames.

    Frames are offered in source order with their source index; the ones at `indices` (ascending, repeats allowed)
    are converted and resized as they arrive (the size comes from the first one, as in `to_model_tensor`) and copied
    as uint8 values into the float32 result, so no source frame is held beyond the one being offered.
    """

    def __init__(self, indices: Sequence[int], max_image_size: int):
        self.indices = list(indices)
        self.max_image_size = max_image_size
        self.size: tuple[int, int] | None = None
        self.pixels: torch.Tensor | None = None
        self.filled = 0  # how many of `indices` have their frame

    def wants(self, index: int) -> bool:
        return self.filled < len(self.indices) and self.indices[self.filled] == index

    @property
    def done(self) -> bool:
        return self.filled == len(self.indices)

    def offer(self, index: int, image: Image.Image) -> None:
        if not self.wants(index):
            return
        if self.size is None:
            self.size = target_size(*image.size, self.max_image_size)
            width, height = self.size
            self.pixels = torch.empty((3, len(self.indices), height, width), dtype=torch.float32)
        frame = _model_frame(image, self.size).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        values = self.pixels.numpy()  # a view: numpy writes the uint8 values into it, exactly, as float32
        while self.wants(index):  # a frame sampled several times (fps resampling upwards) fills several slots
            values[:, self.filled] = frame
            self.filled += 1

    def result(self) -> torch.Tensor:
        if not self.done:
            raise RuntimeError(f"frame {self.indices[self.filled]} was never offered")
        return _to_unit_range(self.pixels)


def to_model_tensor(frames: list[Image.Image], max_image_size: int) -> torch.Tensor:
    """Resize frames to the size derived from the first one and map them to a `[3, T, H, W]` tensor in [-1, 1]."""
    if not frames:
        raise ValueError("to_model_tensor: got no frames")
    sampler = _FrameSampler(range(len(frames)), max_image_size)
    for i, frame in enumerate(frames):
        sampler.offer(i, frame)
    return sampler.result()


def existing_path(value: PathLike, argument: str) -> Path:
    path = Path(value)
    if not path.exists():
        raise FileNotFoundError(f"`{argument}`: no such file: '{path}'")
    return path


def load_image(image: PathLike | Image.Image, max_image_size: int, *, argument: str = "image") -> torch.Tensor:
    """Load a path or PIL image as a `[3, 1, H, W]` float32 tensor in [-1, 1] (alpha dropped, not composited)."""
    if isinstance(image, Image.Image):
        rgb = image.convert("RGB")
    elif isinstance(image, (str, os.PathLike)):
        path = existing_path(image, argument)
        try:
            with Image.open(path) as opened:
                rgb = opened.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"`{argument}`: not a readable image: '{path}' ({err})") from err
    else:
        raise ValueError(
            f"`{argument}`: expected a path (str or os.PathLike) or a PIL.Image.Image, got {type(image).__name__}"
        )
    return to_model_tensor([rgb], max_image_size)


def sample_frame_indices(total_frames: int, video_fps: float, fps: float, num_frames: int | None) -> list[int]:
    """Indices of the source frames to use: resampled to `fps`, 4k+1 of them, at most `num_frames` (None: all).

    A long video is cut, not squeezed: the result is its first frames at the target fps.
    """
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"`num_frames` must be at least 1, got {num_frames}")
    if total_frames < 1:
        raise ValueError(f"`total_frames` must be at least 1, got {total_frames}")
    if video_fps <= 0 or fps <= 0:
        raise ValueError(f"frame rates must be positive, got video_fps={video_fps}, fps={fps}")
    n = total_frames / video_fps * fps
    n = max(math.floor(n / TEMPORAL_FACTOR) * TEMPORAL_FACTOR + 1, _MIN_FRAMES)
    # The reference rounds the span up to 4k+1 when no resampling happens; the clamp below absorbs the overrun.
    total = math.floor(total_frames / TEMPORAL_FACTOR) * TEMPORAL_FACTOR + 1 if video_fps == fps else total_frames
    indices = np.linspace(0, total - 1, n).round().astype(int)
    n_cap = n if num_frames is None else min(math.floor(num_frames / TEMPORAL_FACTOR) * TEMPORAL_FACTOR + 1, n)
    return np.clip(indices[:n_cap], 0, total_frames - 1).tolist()


def read_video(path: PathLike, *, argument: str = "video") -> tuple[list[Image.Image], float]:
    """Decode every frame of a video file with ffmpeg; returns the RGB frames and the file's fps."""
    path = existing_path(path, argument)
    _ffmpeg()  # imageio's ffmpeg plugin runs on it: its absence is not a bad file
    try:
        reader = imageio.get_reader(path, "ffmpeg")
        try:
            fps = float(reader.get_meta_data().get("fps") or 0.0)
            frames = [Image.fromarray(np.asarray(frame)).convert("RGB") for frame in reader]
        finally:
            reader.close()
    except Exception as err:  # ffmpeg reports bad input through many exception types
        raise ValueError(f"`{argument}`: cannot decode video: '{path}' ({err})") from err
    if not frames:
        raise ValueError(f"`{argument}`: video has no frames: '{path}'")
    if fps <= 0:
        raise ValueError(f"`{argument}`: video has no usable frame rate: '{path}'")
    return frames, fps


def _decoded_frames(video: object, argument: str) -> list[Image.Image | np.ndarray]:
    """Frames given in memory: a list of PIL images or HxWx3 uint8 arrays, or a `[T, H, W, 3]` uint8 array.

    Every frame is checked here; none is converted (only the sampled ones are, by `_frame_image`).
    """
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ValueError(f"`{argument}`: a frame array must be [T, H, W, 3], got shape {video.shape}")
        video = list(video)
    if not isinstance(video, (list, tuple)) or not video:
        raise ValueError(
            f"`{argument}`: expected a path, a non-empty list of PIL images or HxWx3 uint8 arrays, "
            f"or a [T, H, W, 3] uint8 array, got {type(video).__name__}"
        )
    for i, frame in enumerate(video):
        if isinstance(frame, Image.Image):
            continue
        if not (isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3):
            detail = f"array {frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ValueError(f"`{argument}`: frame {i} must be a PIL image or an HxWx3 uint8 array, got {detail}")
    return list(video)


def _frame_image(frame: Image.Image | np.ndarray) -> Image.Image:
    """An in-memory frame checked by `_decoded_frames` as a PIL image (its mode is made RGB by `_model_frame`)."""
    return frame if isinstance(frame, Image.Image) else Image.fromarray(frame, "RGB")


def _clip_indices(
    total_frames: int, video_fps: float, fps: float, num_frames: int | None, max_frames: int | None, argument: str
) -> list[int]:
    """`sample_frame_indices`, refused when the resampled clip has more than `max_frames` frames."""
    indices = sample_frame_indices(total_frames, video_fps, fps, num_frames)
    _refuse_long_clip(len(indices), fps, max_frames, argument)
    return indices


def _open_video(path: Path, argument: str) -> tuple[Any, float, float]:
    """imageio's ffmpeg reader of `path` (the one `read_video` uses, so the frames are the same), its fps and the
    duration its header declares (0 when none)."""
    _ffmpeg()  # imageio's ffmpeg plugin runs on it: its absence is not a bad file
    try:
        reader = imageio.get_reader(path, "ffmpeg")
    except Exception as err:  # ffmpeg reports bad input through many exception types
        raise ValueError(f"`{argument}`: cannot decode video: '{path}' ({err})") from err
    try:
        meta = reader.get_meta_data()
        fps, duration = float(meta.get("fps") or 0.0), float(meta.get("duration") or 0.0)
    except Exception as err:
        reader.close()
        raise ValueError(f"`{argument}`: cannot decode video: '{path}' ({err})") from err
    if not math.isfinite(fps) or fps <= 0:
        reader.close()
        raise ValueError(f"`{argument}`: video has no usable frame rate: '{path}'")
    return reader, fps, duration if math.isfinite(duration) and duration > 0 else 0.0


def _decode_pass(reader: Any, sampler: _FrameSampler | None, path: Path, argument: str) -> int:
    """Decode every frame of `reader` once, offering the wanted ones to `sampler` (None: only count); closes the
    reader and returns how many frames it yielded."""
    decoded = 0
    try:
        for frame in reader:
            if sampler is not None and sampler.wants(decoded):
                sampler.offer(decoded, Image.fromarray(np.asarray(frame)))
            decoded += 1
            del frame  # the decoded frame is dropped before the next one is read
    except Exception as err:  # ffmpeg reports bad input through many exception types
        raise ValueError(f"`{argument}`: cannot decode video: '{path}' ({err})") from err
    finally:
        reader.close()
    return decoded


def _count_video_frames(path: Path) -> int | None:
    """The frame count of `path` from `imageio_ffmpeg.count_frames_and_secs`, or None when it gives none."""
    try:
        counted = _count_frames(path)
    except Exception:  # a RuntimeError holding ffmpeg's log, or no count in it: the decode will count
        return None
    return counted if isinstance(counted, int) and counted >= 1 else None


def _count_agrees(counted: int, video_fps: float, duration: float) -> bool:
    """Whether a frame count matches the duration the header declares (0: none), so a clip may be refused as too
    long on the count alone. ffmpeg states the duration to 1/100 s: at high frame rates that alone is more than a
    frame."""
    return duration > 0 and abs(counted - video_fps * duration) <= 1 + video_fps / 100


# Passes over a file before its frame count is taken as unstable (two suffice when ffmpeg is deterministic).
_MAX_DECODE_PASSES = 3


def _frame_times(path: Path) -> list[float] | None:
    """The presentation times of `path`'s first video stream in seconds from its first frame, ascending, one per
    frame, read from the packets without decoding (ffmpeg's `framecrc` of a stream copy); None when ffmpeg gives no
    complete set of timestamps."""
    command = [_ffmpeg().get_ffmpeg_exe(), "-hide_banner", "-v", "error", "-i", os.path.abspath(path),
               "-map", "0:v:0", "-c", "copy", "-f", "framecrc", "-"]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    base, stamps = None, []
    for line in done.stdout.splitlines():
        if line.startswith("#tb 0:"):
            base = Fraction(line.split(":", 1)[1].strip())
        elif line and not line.startswith("#"):
            fields = [field.strip() for field in line.split(",")]
            if len(fields) < 3 or not fields[2].lstrip("-").isdigit():
                return None  # a packet without a timestamp: the file cannot be timed
            stamps.append(int(fields[2]))
    if done.returncode != 0 or base is None or not stamps:
        return None
    stamps.sort()
    return [float((stamp - stamps[0]) * base) for stamp in stamps]


def _is_variable_rate(times: Sequence[float], video_fps: float) -> bool:
    """Whether frames at `times` are not one every 1/`video_fps` s (to a quarter of a frame): a variable-frame-rate
    file, whose header rate is an average or a guess."""
    return any(abs((later - earlier) * video_fps - 1) > 0.25 for earlier, later in zip(times, times[1:]))


def _timed_indices(times: Sequence[float], fps: float, num_frames: int | None) -> list[int]:
    """`sample_frame_indices` by presentation time for a variable-frame-rate clip: the clip lasts until its last
    frame ends (that frame shown as long as the one before it), is resampled to `fps` (4k+1 frames, at most
    `num_frames`), and each sample takes the frame on screen at its time."""
    last = times[-1] - times[-2] if len(times) > 1 else 1 / fps
    duration = times[-1] + last
    n = max(math.floor(duration * fps / TEMPORAL_FACTOR) * TEMPORAL_FACTOR + 1, _MIN_FRAMES)
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"`num_frames` must be at least 1, got {num_frames}")
    # as the constant-rate rule: n times from the first frame's start to the last one's, the first `n_cap` of them
    n_cap = n if num_frames is None else min(math.floor(num_frames / TEMPORAL_FACTOR) * TEMPORAL_FACTOR + 1, n)
    targets = np.linspace(0.0, times[-1], n)[:n_cap]
    # the frame on screen at t: the last one that starts at or before t (1 us of slack for the rounding of times)
    return (np.searchsorted(np.asarray(times), targets + 1e-6, side="right") - 1).clip(0).tolist()


def _load_timed_video(
    path: Path, times: list[float], max_image_size: int, fps: float, num_frames: int | None, argument: str,
    max_frames: int | None,
) -> torch.Tensor:
    """`load_video` for a variable-frame-rate file: frames sampled by their presentation times, decoded once with
    ffmpeg passing every frame through as it is (no constant-rate duplication or dropping)."""
    indices = _timed_indices(times, fps, num_frames)
    _refuse_long_clip(len(indices), fps, max_frames, argument)
    sampler = _FrameSampler(indices, max_image_size)
    try:
        reader = imageio.get_reader(path, "ffmpeg", output_params=["-fps_mode", "passthrough"])
    except Exception as err:  # ffmpeg reports bad input through many exception types
        raise ValueError(f"`{argument}`: cannot decode video: '{path}' ({err})") from err
    decoded = _decode_pass(reader, sampler, path, argument)
    if decoded != len(times) or not sampler.done:
        raise ValueError(
            f"`{argument}`: '{path}' has a variable frame rate, and its {len(times)} timed frames decode as "
            f"{decoded}: the frames cannot be timed. Re-encode it at a constant rate first (ffmpeg -i IN -fps_mode "
            "cfr -r 16 OUT.mp4)."
        )
    return sampler.result()


def _refuse_long_clip(length: int, fps: float, max_frames: int | None, argument: str) -> None:
    if max_frames is not None and length > max_frames:
        # A clip of n frames spans (n - 1) / fps seconds: 961 frames at 16 fps are a 60 s source.
        raise ValueError(
            f"`{argument}`: the clip is {length} frames at {fps:g} fps ({(length - 1) / fps:.1f} s), "
            f"longer than the limit of {max_frames} frames ({(max_frames - 1) / fps:.1f} s at {fps:g} fps); trim the "
            "clip or give a lower `fps`"
        )


def _variable_rate_times(path: Path, argument: str) -> list[float] | None:
    """The frame times of `path` when it has a variable frame rate, else None (a constant-rate file keeps the
    index sampling of the official preprocessing, bit for bit)."""
    times = _frame_times(path)
    if times is None or len(times) < 2:
        return None
    reader, video_fps, _ = _open_video(path, argument)
    reader.close()
    return times if _is_variable_rate(times, video_fps) else None


def _load_video_file(
    video: PathLike, max_image_size: int, fps: float, num_frames: int | None, argument: str, max_frames: int | None
) -> torch.Tensor:
    """`load_video` for a file: count, sample, check the length, then decode once keeping only the sampled frames.

    The count (ffmpeg decoding into its null output: no RGB conversion, nothing piped or kept) can differ from the
    frames the reader yields: the reader's pipe output is constant-rate, so a variable-frame-rate file gains or
    loses frames there. So every pass counts the frames it decodes, and when that differs from the count the
    indices came from (and the indices change), the clip is sampled again with the true count. A clip is refused
    as too long before any decode only when the count agrees with the header's duration; otherwise a decode that
    keeps nothing counts the frames first.
    """
    path = existing_path(video, argument)
    times = _variable_rate_times(path, argument)
    if times is not None:
        return _load_timed_video(path, times, max_image_size, fps, num_frames, argument, max_frames)
    counted = _count_video_frames(path)
    confirmed = False  # whether `counted` is what the reader yields (a pass counted it)
    for _ in range(_MAX_DECODE_PASSES):
        reader, video_fps, duration = _open_video(path, argument)
        sampler = None
        if counted is not None:
            try:
                sampler = _FrameSampler(
                    _clip_indices(counted, video_fps, fps, num_frames, max_frames, argument), max_image_size
                )
            except ValueError:
                if confirmed or _count_agrees(counted, video_fps, duration):
                    reader.close()
                    raise
        # Without a count to trust, this pass only counts; the next one samples.
        decoded = _decode_pass(reader, sampler, path, argument)
        if decoded == 0:
            raise ValueError(f"`{argument}`: video has no frames: '{path}'")
        if sampler is not None and (decoded == counted or (
            sampler.done and sample_frame_indices(decoded, video_fps, fps, num_frames) == sampler.indices
        )):
            return sampler.result()
        counted, confirmed = decoded, True
    raise ValueError(f"`{argument}`: the frame count of '{path}' changes from one read to the next")


def check_video_length(
    video: PathLike | Sequence[Image.Image] | Sequence[np.ndarray] | np.ndarray,
    fps: float,
    num_frames: int | None,
    max_frames: int,
    *,
    argument: str = "video",
) -> None:
    """Refuse a video whose resampled clip `load_video` would refuse for `max_frames`, without decoding its frames
    to RGB: a file is counted (ffmpeg into its null output) and refused only when the count agrees with the
    duration its header declares, as `load_video` does; a doubtful count is left to `load_video`."""
    if not isinstance(video, (str, os.PathLike)):
        _clip_indices(len(_decoded_frames(video, argument)), fps, fps, num_frames, max_frames, argument)
        return
    path = existing_path(video, argument)
    times = _variable_rate_times(path, argument)
    if times is not None:  # timed as load_video times it
        _refuse_long_clip(len(_timed_indices(times, fps, num_frames)), fps, max_frames, argument)
        return
    counted = _count_video_frames(path)
    if counted is None:
        return
    reader, video_fps, duration = _open_video(path, argument)
    reader.close()
    if _count_agrees(counted, video_fps, duration):
        _clip_indices(counted, video_fps, fps, num_frames, max_frames, argument)


def load_video(
    video: PathLike | Sequence[Image.Image] | Sequence[np.ndarray] | np.ndarray,
    max_image_size: int,
    fps: float,
    num_frames: int | None,
    *,
    argument: str = "video",
    max_frames: int | None = None,
) -> torch.Tensor:
    r"""
    Load a video file or in-memory frames as a `[3, T, H, W]` float32 tensor in [-1, 1].

    The frames are those of `sample_frame_indices` (resampled to `fps`, 4k+1 of them, at most `num_frames`) and the
    values are bit-identical to `to_model_tensor` over them. A file is counted first, then decoded once; only the
    sampled frames are kept, each resized as it is decoded, so memory follows the model-size clip, not the source.

    Args:
        video (`str`, `os.PathLike`, list of `PIL.Image.Image` or HxWx3 uint8 `np.ndarray`, or `np.ndarray`):
            A video file, or its frames (a list, or a `[T, H, W, 3]` uint8 array) taken to be at `fps` already.
        max_image_size (`int`):
            The longest side of the model-side frames (see `target_size`).
        fps (`float`):
            The frame rate the clip is resampled to.
        num_frames (`int`, *optional*):
            The most frames to keep (rounded down to 4k+1); `None` keeps the whole resampled source.
        argument (`str`, defaults to `"video"`):
            The argument's name in error messages.
        max_frames (`int`, *optional*):
            The most frames the resampled clip may have; a longer clip is a `ValueError` naming `argument`, the
            clip's length and the limit, raised before a file's frames are decoded.
    """
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"`max_frames` must be a positive number of frames or None, got {max_frames!r}")
    if isinstance(video, (str, os.PathLike)):
        return _load_video_file(video, max_image_size, fps, num_frames, argument, max_frames)
    # In-memory frames carry no frame rate; they are taken to be at the target rate already.
    frames = _decoded_frames(video, argument)
    indices = _clip_indices(len(frames), fps, fps, num_frames, max_frames, argument)
    sampler = _FrameSampler(indices, max_image_size)
    for i in dict.fromkeys(indices):  # each sampled frame converted once, in order
        sampler.offer(i, _frame_image(frames[i]))
    return sampler.result()


def _to_uint8(frames: np.ndarray | Sequence[Image.Image]) -> np.ndarray:
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("write_output: got no frames")
        if all(isinstance(f, Image.Image) for f in frames):
            return np.stack([np.asarray(f.convert("RGB")) for f in frames])
        frames = np.stack([np.asarray(f) for f in frames])
    frames = np.asarray(frames)
    if frames.ndim == 3:  # a single HxWx3 frame
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"write_output: frames must be [T, H, W, 3], got shape {frames.shape}")
    if frames.dtype == np.uint8:
        return frames
    # Truncation, not rounding: this is what the reference writer does.
    return (np.clip(frames.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------------ probes


@dataclass(frozen=True)
class VideoProbe:
    r"""
    What a cheap look at a video file found: its container header and one decoded frame.

    Args:
        fps (`float`):
            The frame rate the container declares.
        size (`tuple[int, int]`):
            The frame size, `(width, height)`.
        duration (`float`):
            The duration the container declares, in seconds (0 when it declares none).
        num_frames (`int`):
            The frame count the header implies (`fps * duration`, at least 1); an estimate, not a count.
    """

    fps: float
    size: tuple[int, int]
    duration: float
    num_frames: int


# Lines of ffmpeg's log that describe the run rather than a problem.
_FFMPEG_CHATTER = re.compile(
    r"^(ffmpeg version|built with|configuration:|lib\w+\s+\d|Input #|Output #|Metadata:|Duration:|Stream #|"
    r"Could not load meta information|=== stderr ===|FFMPEG|Press \[q\])"
)
_FFMPEG_PREFIX = re.compile(r"^(\[[^\]]*\]\s*)+")


def _ffmpeg_problem(log: str) -> str:
    """The first line of an ffmpeg log that says what went wrong, without its `[component @ 0x...]` prefix."""
    problems = []
    for line in log.splitlines():
        if line[:1].isspace() or not line.strip() or _FFMPEG_CHATTER.match(line):
            continue  # indented lines are the banner, metadata and stream details
        line = _FFMPEG_PREFIX.sub("", line.strip())
        if line and "misdetection possible" not in line:
            problems.append(line)
    for words, _, _ in _SYSTEM_CAUSES:  # a system error is the cause, whatever ffmpeg said first
        for line in problems:
            if words in line:
                return line
    return problems[0] if problems else "ffmpeg gave no reason"


def _video_problem(path: Path) -> VideoProbe | str:
    """Open `path` with ffmpeg and decode its first frame: a `VideoProbe`, or what is wrong in words."""
    if path.is_dir():
        return "it is a folder"
    if path.stat().st_size == 0:
        return "the file is empty: 0 bytes"
    # An absolute path: ffmpeg would take a relative name such as 'a:b.mp4' for a protocol.
    reader = _ffmpeg().read_frames(os.path.abspath(path))
    try:
        try:
            meta = next(reader)
        except Exception as err:  # imageio-ffmpeg reports every open failure as one error holding ffmpeg's log
            log = str(err)
            if "does not contain any stream" in log:  # ffmpeg found nothing to decode in the container
                if re.search(r"Stream #.*: Audio:", log) and not re.search(r"Stream #.*: Video:", log):
                    return "it has no video stream, only audio"
                return "it has no video stream: 0 frames"
            problem = _ffmpeg_problem(log)
            if "moov atom not found" in problem:  # an MP4 whose index, written last, is missing
                return f"it is truncated or not a video; ffmpeg: {problem}"
            return f"ffmpeg: {problem}"
        try:
            next(reader)
        except StopIteration:
            return "it has no frames"
        except Exception as err:  # a short or undecodable first frame
            return f"its first frame does not decode ({_ffmpeg_problem(str(err))})"
    finally:
        reader.close()
    fps = float(meta.get("fps") or 0.0)
    if not math.isfinite(fps) or fps <= 0:
        return "it declares no usable frame rate"
    duration = float(meta.get("duration") or 0.0)
    duration = duration if math.isfinite(duration) and duration > 0 else 0.0
    size = tuple(int(v) for v in meta["size"])
    return VideoProbe(fps=fps, size=size, duration=duration, num_frames=max(1, round(fps * duration)))


def probe_video(path: PathLike, argument: str = "video") -> VideoProbe:
    """Check cheaply that `path` is a readable video: the container opens, has a video stream and a frame rate, and
    its first frame decodes (nothing else is decoded).

    Raises `FileNotFoundError` for a missing file and `ValueError` naming `argument` and the file for an empty,
    truncated, corrupt, frameless or audio-only one.
    """
    path = existing_path(path, argument)
    found = _video_problem(path)
    if isinstance(found, str):
        raise ValueError(f"`{argument}`: not a readable video: '{path}' ({found})")
    # `read_video` opens the file through imageio's ffmpeg plugin, which refuses some names ffmpeg itself reads (an
    # image such as a .png): open it the same way here, so such a file fails now rather than after the model loads.
    try:
        imageio.get_reader(path, "ffmpeg").close()
    except Exception as err:  # imageio reports a refused file through several exception types
        raise ValueError(
            f"`{argument}`: not a readable video: '{path}' (the video reader refuses it: {err}); give a video file "
            "such as an .mp4"
        ) from None
    return found


def _image_problem(path: Path) -> tuple[int, int] | str:
    """Open, verify and load the image at `path`: its `(width, height)`, or what is wrong in words."""
    if path.is_dir():
        return "it is a folder"
    if path.stat().st_size == 0:
        return "the file is empty: 0 bytes"
    try:
        with Image.open(path) as image:
            image.verify()  # checksums and structure, where the format has them (PNG)
        with Image.open(path) as image:  # verify() leaves the image unusable: reopen to decode it
            image.load()  # a truncated file fails only here
            return image.size
    except Exception as err:  # Pillow reports broken files through many exception types
        return str(err) or type(err).__name__


def probe_image(path: PathLike, argument: str = "image") -> tuple[int, int]:
    """Check that `path` is a readable image (opened, verified and decoded); returns its `(width, height)`.

    Raises `FileNotFoundError` for a missing file and `ValueError` naming `argument` and the file for an empty,
    truncated or unreadable one.
    """
    path = existing_path(path, argument)
    found = _image_problem(path)
    if isinstance(found, str):
        raise ValueError(f"`{argument}`: not a readable image: '{path}' ({found})")
    return found


def _count_frames(path: Path) -> int:
    """The number of video frames in `path`'s first video stream, as ffmpeg decodes them into its null output (every
    frame is decoded, none is converted to RGB or piped out)."""
    return _ffmpeg().count_frames_and_secs(os.path.abspath(path))[0]


def is_complete_output(path: PathLike) -> bool:
    """Whether `path` holds a complete output of `write_output`: a PNG that decodes, or a video whose first frame
    decodes and whose counted frames agree with its header (a file cut short or left empty by a failed run does
    not)."""
    path = Path(path)
    try:
        if not path.is_file():
            return False
        if path.suffix.lower() == ".png":
            return not isinstance(_image_problem(path), str)
        probe = _video_problem(path)
        if isinstance(probe, str):
            return False
        counted = _count_frames(path)
    except Exception:  # whatever fails to read is not a complete output
        return False
    # ffmpeg states the duration to 1/100 s: at high frame rates that alone is more than a frame.
    return counted >= 1 and abs(counted - probe.fps * probe.duration) <= 1 + probe.fps / 100


# ------------------------------------------------------------------------------------------------ writing


class OutputWriteError(OSError):
    """Writing an output failed (no space left, a file-size limit, an encoder error, or a file that does not read
    back as written); nothing was left at the output path. An environment failure, not bad input: `errno` is set
    when the system gave the reason (`ENOSPC`, `EFBIG`, `EDQUOT`), `EIO` otherwise."""

    def __str__(self) -> str:
        return str(self.strerror)


def _write_error(path: Path, detail: str, code: int | None = None) -> OutputWriteError:
    """The error of a failed write of `path`, its cause in words first when `detail` or `code` names one."""
    for words, number, cause in _SYSTEM_CAUSES:
        if code == number or words in detail:
            return OutputWriteError(number, f"cannot write '{path}': {cause} ({detail}); nothing was written")
    return OutputWriteError(code or errno.EIO, f"cannot write '{path}': {detail}; nothing was written")


def check_fps(fps, argument: str = "fps") -> float:
    """`fps` as a float if it is a number of frames per second in [`MIN_FPS`, `MAX_FPS`]; else a `ValueError`."""
    if (
        isinstance(fps, bool)
        or not isinstance(fps, numbers.Real)
        or not math.isfinite(float(fps))
        or not MIN_FPS <= float(fps) <= MAX_FPS
    ):
        raise ValueError(f"`{argument}`={fps!r} must be a number of frames per second from {MIN_FPS:g} to {MAX_FPS:g}.")
    return float(fps)


def _encode_mp4(pixels: np.ndarray, path: Path, fps: float) -> subprocess.CompletedProcess:
    """Encode `[T, H, W, 3]` uint8 frames as H.264 into `path` with ffmpeg; returns the finished process.

    The command is the one imageio's ffmpeg writer builds for the official renderer's settings (libx264, crf 8,
    yuv420p, no resize), run here so that ffmpeg's exit status and log are seen: imageio reports neither, and a
    failed encode used to pass for a finished one.
    """
    _, height, width, _ = pixels.shape
    rate = Fraction(float(fps)).limit_denominator()  # as imageio passes it: a rational, so 24000/1001 stays exact
    command = [
        _ffmpeg().get_ffmpeg_exe(), "-y",
        "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}", "-pix_fmt", "rgb24", "-r", str(rate),
        "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", "8",
        "-v", "error", os.path.abspath(path),
    ]  # fmt: skip
    data = memoryview(np.ascontiguousarray(pixels)).cast("B")  # the frames' bytes, not a copy
    # communicate() feeds stdin while it drains stderr, so a chatty failing ffmpeg cannot block on a full pipe.
    return subprocess.run(command, input=data, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)


def _write_mp4(path: Path, tmp: Path, pixels: np.ndarray, fps: float) -> None:
    """Encode `pixels` into `tmp` and check the result; raises `OutputWriteError` naming `path` on any failure."""
    done = _encode_mp4(pixels, tmp, fps)
    log = done.stderr.decode("utf-8", "replace")
    if done.returncode != 0:
        if done.returncode == -getattr(signal, "SIGXFSZ", -1):  # killed for exceeding the file-size limit
            raise _write_error(path, "ffmpeg was stopped by SIGXFSZ", errno.EFBIG)
        status = f"signal {-done.returncode}" if done.returncode < 0 else f"exit status {done.returncode}"
        raise _write_error(path, f"ffmpeg failed with {status}: {_ffmpeg_problem(log)}")
    # ffmpeg can exit 0 and still leave less than it was given (a write error it only logged): read the file back.
    found = _video_problem(tmp)
    if isinstance(found, str):
        raise _write_error(path, f"the encoded file does not read back: {found}; ffmpeg said: {_ffmpeg_problem(log)}")
    frames, height, width, _ = pixels.shape
    if found.size != (width, height):
        raise _write_error(path, f"the encoded file is {found.size[0]}x{found.size[1]}, expected {width}x{height}")
    try:
        counted = _count_frames(tmp)
    except Exception as err:  # count_frames_and_secs raises RuntimeError with ffmpeg's log
        raise _write_error(path, f"the encoded file does not read back: {_ffmpeg_problem(str(err))}") from err
    if counted != frames:
        raise _write_error(path, f"the encoded file holds {counted} frame(s), expected {frames}")


def _write_png(path: Path, tmp: Path, pixels: np.ndarray) -> None:
    """Save one frame as PNG into `tmp` and read it back; raises `OutputWriteError` naming `path` on any failure."""
    try:
        Image.fromarray(pixels[0], "RGB").save(tmp, format="PNG")
    except OSError as err:
        raise _write_error(path, err.strerror or str(err), err.errno) from err
    found = _image_problem(tmp)
    height, width = pixels.shape[1:3]
    if isinstance(found, str):
        raise _write_error(path, f"the saved file does not read back: {found}")
    if found != (width, height):
        raise _write_error(path, f"the saved file is {found[0]}x{found[1]}, expected {width}x{height}")


# `write_output` writes `.<stem>.tmp-<random><suffix>` beside the output, then renames it.
_TEMPORARY = ".tmp-"


def temporaries(path: PathLike) -> list[Path]:
    """The temporary files `write_output` has beside `path` (a killed run may leave one; it is never the output)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.stem)}{_TEMPORARY}*{path.suffix}"))


def write_output(frames: np.ndarray | Sequence[Image.Image], path: PathLike, fps: float) -> Path:
    """Write one frame as PNG or several as H.264 MP4, atomically and verified; returns the path actually written.

    The suffix follows the content: one frame always lands in `.png`, several always in `.mp4`. The file is written
    to a temporary next to `path`, read back (the PNG decoded; the video's first frame decoded, its frames counted
    and its size checked) and only then renamed to `path`. On failure the temporary is removed, an existing file at
    `path` is left as it was, and an `OutputWriteError` (an `OSError`) names `path` and the cause (no space left,
    file too large, ffmpeg's error); a video `fps` outside [`MIN_FPS`, `MAX_FPS`] is a `ValueError`.
    """
    pixels = _to_uint8(frames)
    if len(pixels) > 1:
        fps = check_fps(fps)
        _ffmpeg()  # before any folder or file is made
    path = Path(path)
    suffix = ".png" if len(pixels) == 1 else ".mp4"
    if path.suffix.lower() != suffix:
        path = path.with_suffix(suffix)
    # The folders made for this output are removed again if the write fails: a failure leaves nothing behind.
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        # The temporary shares the directory (so os.replace is atomic) and the suffix (so the encoder picks it).
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}{_TEMPORARY}", suffix=suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; the output gets the usual permissions
        if len(pixels) == 1:
            _write_png(path, tmp, pixels)
        else:
            _write_mp4(path, tmp, pixels, fps)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        for folder in made:  # innermost first; a folder something else wrote into stays
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return path


def split_videos(video: Any) -> list[Any]:
    """`video` as a list of videos: a path, decoded frames, or a list of either."""
    if video is None:
        return []
    if isinstance(video, (str, os.PathLike)) or isinstance(video, (np.ndarray, torch.Tensor)):
        return [video]
    if isinstance(video, (list, tuple)) and video:
        first = video[0]
        if isinstance(first, Image.Image) or (isinstance(first, np.ndarray) and first.ndim == 3):
            return [list(video)]  # the frames of one video
        return list(video)
    raise ValueError(
        f"`video` of type {type(video).__name__} is not supported; pass a path, a list of paths, or decoded frames "
        "(a list of PIL images or a uint8 array [T, H, W, 3])."
    )
