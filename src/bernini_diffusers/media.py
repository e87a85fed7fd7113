"""Media input and output of the Bernini-R renderer.

Loading, resizing and frame sampling reproduce the official renderer's preprocessing exactly
(bicubic PIL resize to a stride-16 size, values in [-1, 1], `smart_video_nframes` sampling),
so that conditioning media reach the model bit-identical to the reference implementation.
The writer turns decoded frames into a PNG (one frame) or an H.264 MP4 (several frames),
atomically: the output path either holds a complete file or nothing.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Sequence, Union

import imageio
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .constants import TEMPORAL_FACTOR

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
    "write_output",
]

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


def to_model_tensor(frames: list[Image.Image], max_image_size: int) -> torch.Tensor:
    """Resize frames to the size derived from the first one and map them to a `[3, T, H, W]` tensor in [-1, 1]."""
    if not frames:
        raise ValueError("to_model_tensor: got no frames")
    width, height = target_size(*frames[0].size, max_image_size)
    arrays = []
    for frame in frames:
        frame = frame if frame.mode == "RGB" else frame.convert("RGB")
        if frame.size != (width, height):
            frame = frame.resize((width, height), Image.BICUBIC)
        arrays.append(np.asarray(frame, dtype=np.float32))
    # Same operation order as the reference (/255 then *2-1) so float32 results match bit for bit.
    pixels = torch.from_numpy(np.stack(arrays)) / 255.0
    pixels = pixels * 2.0 - 1.0
    return pixels.permute(3, 0, 1, 2).contiguous()


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


def sample_frame_indices(total_frames: int, video_fps: float, fps: float, num_frames: int) -> list[int]:
    """Indices of the source frames to use: resampled to `fps`, 4k+1 of them, at most `num_frames`.

    A long video is cut, not squeezed: the result is its first frames at the target fps.
    """
    if num_frames < 1:
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
    n_cap = min(math.floor(num_frames / TEMPORAL_FACTOR) * TEMPORAL_FACTOR + 1, n)
    return np.clip(indices[:n_cap], 0, total_frames - 1).tolist()


def read_video(path: PathLike, *, argument: str = "video") -> tuple[list[Image.Image], float]:
    """Decode every frame of a video file with ffmpeg; returns the RGB frames and the file's fps."""
    path = existing_path(path, argument)
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


def _decoded_frames(video: object, argument: str) -> list[Image.Image]:
    """Frames given in memory: a list of PIL images or HxWx3 uint8 arrays, or a `[T, H, W, 3]` uint8 array."""
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ValueError(f"`{argument}`: a frame array must be [T, H, W, 3], got shape {video.shape}")
        video = list(video)
    if not isinstance(video, (list, tuple)) or not video:
        raise ValueError(
            f"`{argument}`: expected a path, a non-empty list of PIL images or HxWx3 uint8 arrays, "
            f"or a [T, H, W, 3] uint8 array, got {type(video).__name__}"
        )
    frames = []
    for i, frame in enumerate(video):
        if isinstance(frame, Image.Image):
            frames.append(frame.convert("RGB"))
        elif isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3:
            frames.append(Image.fromarray(frame, "RGB"))
        else:
            detail = f"array {frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ValueError(f"`{argument}`: frame {i} must be a PIL image or an HxWx3 uint8 array, got {detail}")
    return frames


def load_video(
    video: PathLike | Sequence[Image.Image] | Sequence[np.ndarray] | np.ndarray,
    max_image_size: int,
    fps: float,
    num_frames: int,
    *,
    argument: str = "video",
) -> torch.Tensor:
    """Load a video file or in-memory frames as a `[3, T, H, W]` float32 tensor in [-1, 1]."""
    if isinstance(video, (str, os.PathLike)):
        frames, video_fps = read_video(video, argument=argument)
    else:
        # In-memory frames carry no frame rate; they are taken to be at the target rate already.
        frames, video_fps = _decoded_frames(video, argument), fps
    indices = sample_frame_indices(len(frames), video_fps, fps, num_frames)
    return to_model_tensor([frames[i] for i in indices], max_image_size)


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


def write_output(frames: np.ndarray | Sequence[Image.Image], path: PathLike, fps: float) -> Path:
    """Write one frame as PNG or several as H.264 MP4, atomically; returns the path actually written.

    The suffix follows the content: one frame always lands in `.png`, several always in `.mp4`.
    """
    pixels = _to_uint8(frames)
    path = Path(path)
    suffix = ".png" if len(pixels) == 1 else ".mp4"
    if path.suffix.lower() != suffix:
        path = path.with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file shares the directory (so os.replace is atomic) and the suffix (so the encoder picks it).
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; the output gets the usual permissions
    try:
        if len(pixels) == 1:
            Image.fromarray(pixels[0], "RGB").save(tmp, format="PNG")
        else:
            imageio.mimwrite(
                tmp,
                list(pixels),
                fps=fps,
                codec="libx264",
                quality=10,
                macro_block_size=1,
                pixelformat="yuv420p",  # upstream also passes -pix_fmt yuv420p in output_params: the same encoding
                output_params=["-crf", "8"],
            )
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
