"""Case files and batch files of `bernini generate`, in the official format.

A **case file** (`--case FILE`) is one JSON object describing one run: `task_type`, `guidance_mode`, `prompt`
(required), `video`, `image`, `images`, the context windows of a long clip (`context_frames`, `context_overlap`),
`output`. Its values override the command line's; the other generation settings (`--seed`, `--num_frames`,
`--omega_*`, ...) stay on the command line. A **batch file** (`--inputs FILE`) is a JSON
list (`.json`) or JSON lines (`.jsonl`) of such objects, each one case; a case without `output` gets a derived name.
Paths inside either file are relative to the working directory, as upstream.

A case whose file is being written is claimed with a `CaseLock`, a lock file beside its output, so that several
runs of one batch on one folder split the cases between them instead of each running all of them.

Only the standard library and the task table are imported: files are read and checked before any model loads.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tasks import TASKS, Need, TaskType, parse_guidance_mode, parse_task_type

CASE_KEYS = (
    "task_type", "guidance_mode", "prompt", "video", "image", "images", "context_frames", "context_overlap", "output"
)
# The keys that set a call argument other than the case's inputs: each case may edit a clip of its own length, so
# its context windows are chosen with it. Their values are checked with the call (`BerniniPipeline.validate_call`).
CASE_SETTINGS = ("context_frames", "context_overlap")
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
            `guidance_mode`, and the `CASE_SETTINGS` the case sets.
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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:  # a binary file given by mistake (an image, a video)
        raise ValueError(f"`{argument}`: '{path}' is not UTF-8 JSON text (byte {err.start}: {err.reason}).") from None
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
    for key in (key for key in CASE_SETTINGS if key in values):
        value, nullable = values[key], key == "context_frames"  # null: no windows, as the call's None
        # JSON has one number type: 17.0 or true would reach the call as a float or a bool.
        if not (value is None and nullable) and (not isinstance(value, int) or isinstance(value, bool)):
            allowed = "a whole number of frames" + (" or null (off)" if nullable else "")
            raise ValueError(f"{where}: `{key}`={value!r} must be {allowed}.")
    output = values.get("output")
    if output is not None and output.endswith(("/", os.sep)):  # Path() would drop the slash: 'out/' -> out.mp4
        raise ValueError(f"{where}: `output`={output!r} names a folder (it ends with '/'); give a file path.")
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


def default_task_type(inputs: dict[str, Any]) -> str:
    """The task of a case that names none, from the media it gives.

    No media at all means `t2v` (a first run with only a prompt makes a video); one video keeps the official command
    line's default, `v2v`. Other media go to the one task that takes exactly them (`--image`: i2i, `--images`: r2v,
    a video and images: rv2v, two videos: ads2v); where several fit, `ValueError` names them.
    """
    video = inputs.get("video")
    given = {
        "video": bool(video),
        "image": inputs.get("image") is not None,
        "images": bool(inputs.get("images")),
    }
    if not any(given.values()):
        return TaskType.T2V.value
    num_videos = 0 if not video else len(video) if isinstance(video, (list, tuple)) else 1
    fits = [
        spec.task.value for spec in TASKS.values()
        if all((getattr(spec, key) is not Need.NO) if on else (getattr(spec, key) is not Need.REQUIRED)
               for key, on in given.items())
        and (not num_videos or spec.num_videos[0] <= num_videos <= spec.num_videos[1])
    ]  # fmt: skip
    if given == {"video": True, "image": False, "images": False} and TaskType.V2V.value in fits:
        return TaskType.V2V.value
    if len(fits) == 1:
        return fits[0]
    flags = " ".join(f"--{key}" for key, on in given.items() if on)
    choice = f"one of {', '.join(fits)}" if fits else "a task that takes them (see the task table in --help)"
    raise ValueError(f"`task_type` is not set and no single task takes {flags}: pick {choice}.")


def check_writable(output: str | os.PathLike, argument: str = "output") -> None:
    """Refuse, before any model work, an output path the result could not be written to.

    The check does what the writer will do: it creates (and removes) a temporary file in the output's folder, or in
    its nearest existing ancestor when the folder is still to be made. Raises `ValueError` naming `argument`, the path
    and why: an empty name, an existing directory or device (`/dev/null`), a parent that is a file, a folder that is
    read-only or on a full disk.
    """
    text = os.fspath(output)
    if not text.strip():
        raise ValueError(f"`{argument}`={text!r} is empty; give a file path such as outputs/result.mp4.")
    path = Path(text)
    if text.endswith(("/", os.sep)) and not path.exists():
        # Path() drops the slash: the result would land in a file beside the folder the user named ('out/' -> out.mp4).
        raise ValueError(
            f"`{argument}`='{text}' names a folder (it ends with '/'); give a file path such as {text}result.mp4."
        )
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise ValueError(f"`{argument}`='{text}' is {kind}; give a file path (the result is a .mp4 or .png file).")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"`{argument}`='{text}' cannot be written: '{folder}' is a file, not a folder.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".bernini-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason = f"the folder is not writable ({reason})"
        raise ValueError(f"`{argument}`='{text}' cannot be written in '{folder}': {reason}.") from None


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (another user's process counts): a dead owner's lock or temporary
    folder may be taken over."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


# The most a lock file's content is read: `pid host` fits many times over; a lock that is a link to /dev/zero or to
# a large file of the user's is never read further.
LOCK_READ_LIMIT = 256
_HOLDER = re.compile(r"^(\d{1,10}) ([A-Za-z0-9][A-Za-z0-9._-]{0,252})$")


def _kind(mode: int) -> str:
    """What a file that is not a regular one is, for a message."""
    for test, name in (
        (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
    ):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


class _NotALock(Exception):
    """The lock path holds something that is not a regular file (its kind is the message)."""


class CaseLock:
    r"""
    An exclusive claim on one output file, shared by every run that writes into the same folder.

    The lock is a file `.<output name>.lock` in the real path of the output's folder, created atomically
    (`O_CREAT | O_EXCL`) and holding `pid host`. A lock left by a process that died on this host is taken over; one
    held by a live process, or by any process on another host, is left alone. The holder removes it after the write,
    or when the case fails.

    A lock is read without following a symbolic link (`O_NOFOLLOW`), without blocking (a FIFO), and at most
    `LOCK_READ_LIMIT` bytes; only a parsed `pid host` is ever shown. Anything at the lock's path that is not a regular
    file (a folder, a symbolic link, dangling or not, a FIFO, a device) counts as held by someone else and is left
    alone: `blocked()` says so, naming the path. A stale lock that cannot be removed (no permission) is reported the
    same way instead of failing the run.

    Args:
        output (`str` or `os.PathLike`):
            The output file the lock guards.
    """

    def __init__(self, output: str | os.PathLike):
        # Beside the output's name in the real path of its folder: where `media.write_output` replaces the name (an
        # output that is a symlink is replaced, not followed, so its target's folder is neither used nor created).
        self.output = Path(output)
        folder = Path(os.path.realpath(self.output.parent))
        self.path = folder / f".{self.output.name}.lock"
        self.owner = f"{os.getpid()} {socket.gethostname()}"
        self.held = False
        self.took_over: str | None = None  # the dead holder's `pid host`, when this lock replaced a stale one
        self.problem: str | None = None  # why `acquire` failed, when not because a live run holds the lock

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(self.owner + "\n")
        return True

    @staticmethod
    def _read(path: Path) -> str | None:
        """The parsed `pid host` of the lock file at `path`; None without a file there, "" for a lock still being
        written or whose content is not `pid host`. Raises `_NotALock` for anything but a regular file."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(mode):
            raise _NotALock(_kind(mode))
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            return None
        except OSError as err:  # replaced by a link meanwhile (ELOOP), or unreadable
            if err.errno == errno.ELOOP:
                raise _NotALock("a symbolic link") from None
            raise _NotALock(f"unreadable ({os.strerror(err.errno) if err.errno else err})") from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):  # swapped for something else between lstat and open
                raise _NotALock(_kind(mode))
            data = os.read(fd, LOCK_READ_LIMIT)
        finally:
            os.close(fd)
        match = _HOLDER.match(data.decode("ascii", "replace").strip())
        return f"{match[1]} {match[2]}" if match else ""

    def holder(self) -> str | None:
        """The `pid host` written in the lock file, None without one ("" for a lock still being written, or one whose
        content is not `pid host`, or that is not a regular file)."""
        try:
            return self._read(self.path)
        except _NotALock:
            return ""

    def _stale(self, holder: str) -> bool:
        pid, _, host = holder.partition(" ")
        return pid.isdigit() and host == socket.gethostname() and not process_alive(int(pid))

    def blocked(self) -> str | None:
        """Why this run may not write the output now, without claiming it (a check before the model loads): None when
        there is no lock or only a stale one this run may take over."""
        try:
            holder = self._read(self.path)
        except _NotALock as err:
            return self._foreign(str(err))
        if holder is None or (holder and self._stale(holder)):
            return None
        return self._held_by(holder)

    def _foreign(self, kind: str) -> str:
        return (
            f"{self.output} is locked: its lock {str(self.path)!r} is {kind}, not a lock file, so it is taken as held "
            "by someone else and left alone (remove it if no run uses it)"
        )

    def _held_by(self, holder: str) -> str:
        pid, _, host = holder.partition(" ")
        who = f"pid {pid} on {host}" if host else "a process"
        return f"{self.output} is being written by another run ({who}; lock {self.path})"

    def acquire(self) -> bool:
        """Claim the output; False if another live process holds it, or if the lock path is not a lock file or cannot
        be replaced (then `problem` says why)."""
        self.problem = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._acquire()
        except _NotALock as err:
            self.problem = self._foreign(str(err))
        except PermissionError as err:
            reason = os.strerror(err.errno) if err.errno else str(err)
            self.problem = (
                f"{self.output} cannot be claimed: its lock {str(self.path)!r} cannot be created or removed "
                f"({reason}); remove it by hand if no run uses it, or choose another output"
            )
        self.held = False
        return False

    def _acquire(self) -> bool:
        if self._create():
            self.held = True
            return True
        holder = self._read(self.path)
        if holder is None:  # released between the two calls
            self.held = self._create()
            return self.held
        if not self._stale(holder):
            return False
        # Move the stale lock aside under a name of our own, then check it was still the stale one: two runs taking
        # over at once cannot both remove each other's fresh lock this way.
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = self._read(aside)
        except _NotALock:
            moved = None
        if moved != holder:  # someone else took it over first: give theirs back
            try:
                os.link(aside, self.path, follow_symlinks=False)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        self.held = self._create()
        if self.held:
            self.took_over = holder
        return self.held

    def release(self) -> None:
        """Remove the lock if this process holds it (never another's); a lock that cannot be removed is reported as
        a warning on stderr, not raised (the output is written by then)."""
        if self.held and self.holder() == self.owner:
            try:
                self.path.unlink(missing_ok=True)
            except OSError as err:
                reason = os.strerror(err.errno) if err.errno else str(err)
                print(f"warning: could not remove the lock {str(self.path)!r} ({reason}); remove it by hand",
                      file=sys.stderr)  # fmt: skip
        self.held = False

    def __repr__(self) -> str:
        return f"CaseLock({str(self.path)!r}, held={self.held})"
