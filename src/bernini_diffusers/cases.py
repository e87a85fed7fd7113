"""Case files and batch files of `bernini generate`, in the official format.

A **case file** (`--case FILE`) is one JSON object describing one run: `task_type`, `guidance_mode`, `prompt`
(required), `video`, `image`, `images`, `output`. Its values override the command line's; generation settings
(`--seed`, `--num_frames`, `--omega_*`, ...) stay on the command line. A **batch file** (`--inputs FILE`) is a JSON
list (`.json`) or JSON lines (`.jsonl`) of such objects, each one case; a case without `output` gets a derived name.
Paths inside either file are relative to the working directory, as upstream.

Only the standard library and the task table are imported: files are read and checked before any model loads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tasks import TASKS, parse_guidance_mode, parse_task_type

CASE_KEYS = ("task_type", "guidance_mode", "prompt", "video", "image", "images", "output")
BATCH_SUFFIXES = (".json", ".jsonl")
# Frame counts are 4k+1 (the video VAE compresses time by 4): fewer than 4 requested frames give one frame.
_TEMPORAL_FACTOR = 4


@dataclass
class Case:
    """One run of a batch (or the single run of a command).

    Args:
        number (`int`):
            1-based position in the batch; used in progress lines, the summary and derived output names.
        inputs (`dict`):
            The per-case `BerniniPipeline.__call__` arguments: `prompt`, `task_type`, `video`, `image`, `images`,
            `guidance_mode`.
        output (`Path`, *optional*):
            Where the result lands; the suffix already follows the frame count (`.png` for one frame, else `.mp4`).
            `None` for a batch entry too broken to name one.
        problem (`str`, *optional*):
            Why the case cannot run; such a case is reported as failed and the others go on.
    """

    number: int
    inputs: dict[str, Any]
    output: Path | None
    problem: str | None = None


def _load_json(path: str | os.PathLike, argument: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`{argument}`: no such file: '{path}'")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        entries = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"`{argument}`: '{path}' line {line_number} is not JSON ({err.msg}).") from None
        return entries
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"`{argument}`: '{path}' is not JSON ({err.msg} at line {err.lineno}).") from None


def _paths(value: Any, key: str, where: str, allow_single: bool = True) -> list[str]:
    if isinstance(value, str) and allow_single:
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}: `{key}`={value!r} must be a path or a non-empty list of paths.")
    return value


def check_entry(entry: Any, where: str) -> dict[str, Any]:
    """Check one case object (keys, types, task type, guidance mode); returns its values, `images` as a list.

    Raises `ValueError` naming `where` (the file, and the case for batches), the key and what is allowed.
    """
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(entry).__name__}.")
    unknown = sorted(set(entry) - set(CASE_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; allowed keys: {', '.join(CASE_KEYS)}.")
    values = dict(entry)
    prompt = values.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where} must set `prompt` to a non-empty string, got {prompt!r}.")
    for key in ("task_type", "guidance_mode", "image", "output"):
        value = values.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{where}: `{key}`={value!r} must be a non-empty string.")
    try:
        if values.get("task_type") is not None:
            values["task_type"] = parse_task_type(values["task_type"]).value
        if values.get("guidance_mode") is not None:
            values["guidance_mode"] = parse_guidance_mode(values["guidance_mode"]).value
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if values.get("video") is not None:
        video = _paths(values["video"], "video", where)
        values["video"] = video[0] if len(video) == 1 else video
    if values.get("images") is not None:
        values["images"] = _paths(values["images"], "images", where)
    return values


def read_case_file(path: str | os.PathLike) -> dict[str, Any]:
    """The checked values of a `--case` file: one JSON object with keys from `CASE_KEYS`, `prompt` required."""
    return check_entry(_load_json(path, "case"), f"case file '{path}'")


def read_batch_file(path: str | os.PathLike) -> list[Any]:
    """The raw entries of a `--inputs` file: a JSON list (`.json`) or one JSON object per line (`.jsonl`).

    Entries are returned unchecked, so that one bad case can be reported while the others run (`check_entry`).
    """
    suffix = Path(path).suffix.lower()
    if suffix not in BATCH_SUFFIXES:
        raise ValueError(
            f"`inputs`='{path}' must be a JSON list ({BATCH_SUFFIXES[0]}) or JSON lines ({BATCH_SUFFIXES[1]}) file."
        )
    entries = _load_json(path, "inputs")
    if not isinstance(entries, list):
        raise ValueError(
            f"`inputs`: '{path}' must hold a JSON list of case objects, got a {type(entries).__name__} "
            "(for one case, use --case)."
        )
    if not entries:
        raise ValueError(f"`inputs`: '{path}' holds no cases.")
    return entries


def is_single_frame(task_type: str, num_frames: int) -> bool:
    """Whether a run yields one frame (written as PNG): image tasks always, video tasks below 4 frames (4k+1 rule)."""
    return TASKS[parse_task_type(task_type)].is_image or num_frames < _TEMPORAL_FACTOR


def output_path(path: str | os.PathLike, single_frame: bool) -> Path:
    """The file a result lands in: `media.write_output` switches the suffix to `.png` for one frame, `.mp4` else."""
    path = Path(path)
    suffix = ".png" if single_frame else ".mp4"
    return path if path.suffix.lower() == suffix else path.with_suffix(suffix)


def derived_output(directory: str | os.PathLike, number: int, total: int, task_type: str, single_frame: bool) -> Path:
    """The name of a batch case without `output`: `<directory>/<number>_<task>.png|mp4`, numbers zero-padded."""
    width = max(4, len(str(total)))
    return output_path(Path(directory) / f"{number:0{width}d}_{task_type}", single_frame)
