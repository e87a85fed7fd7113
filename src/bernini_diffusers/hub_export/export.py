"""Export original Bernini-R checkpoints as one self-contained diffusers folder, and upload a folder to the Hub.

`export_pipeline` refuses an `out` it must never write or replace before it reads anything (`check_export_target`),
plans and verifies everything (the base's components, both checkpoints' key sets, shapes and dtypes against the base's
transformer configs), then writes into a temporary folder beside `out` and renames it into place only when every shard
has been read back and checked. An error, SIGTERM or SIGINT at any point leaves neither `out` nor the temporary folder
behind; the temporary folder's name carries its process id and host, so a later export into the same folder removes
what a killed one (SIGKILL) left. An export marks its folder (`MARKER`, which lists the files it wrote), and `force`
replaces only a marked folder, and only when it holds nothing but those files unless `delete_extra` is set too. A
failed export removes its own partial folder and then only the parent folders it created, and only when empty.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.utils import logging
from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.serialization._base import parse_size_to_int
from huggingface_hub.utils import validate_repo_id

from .. import __version__
from ..cases import process_alive
from ..constants import WAN22_BASE
from ..loading import (
    CHECKPOINT_ARGUMENTS,
    HUB_KWARGS,
    Layout,
    component_files,
    fetch_components,
    is_repo_id,
    pipeline_settings,
    plan_checkpoint,
    resolve_layout,
)
from ..pipeline_bernini import BerniniPipeline
from ..scheduling import default_scheduler
from ..tasks import TASKS
from ..transformer_bernini import BerniniTransformer3DModel
from .convert import (
    DEFAULT_MAX_SHARD_SIZE,
    EXPERT_NAMES,
    EXPERTS,
    verify_written,
    write_expert_shards,
)
from .remote_code import PIPELINE_MODULE, add_remote_code

DEFAULT_BASE = WAN22_BASE  # the official `wan22_base`
COPIED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")
LICENSE = "apache-2.0"
PIPELINE_TAG = "image-text-to-video"  # the tag of the official model card
PACKAGE = "bernini_diffusers"
# Written into every export: `force` replaces a folder only when it holds this file (naming this package) beside its
# model_index.json. It is local bookkeeping, so `push_folder` leaves it out of an upload.
MARKER = ".bernini_export.json"
# `.<out name>.<pid>@<host>.<random>.partial` (being written) and `.old` (an earlier export set aside during the swap).
_OWNED = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.[0-9a-f]+\.(?P<kind>partial|old)$")
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# What an export writes at its top level, for a marker written before markers listed their files (or made by hand).
_EXPORT_TOP = ("model_index.json", "README.md", f"{PIPELINE_MODULE}.py", *EXPERTS, *COPIED_COMPONENTS)
# How many files a refusal of `force` names.
_LISTED = 10

logger = logging.get_logger(__name__)


def _argument(name: str, flags: bool) -> str:
    return f"`--{name}`" if flags else f"`{name}`"


def is_export(folder: str | os.PathLike) -> bool:
    """Whether `folder` is an export of this package: its `MARKER` names the package, beside a `model_index.json`."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("package") == PACKAGE and (folder / "model_index.json").is_file()


def _written_files(folder: Path) -> set[str] | None:
    """The files an export wrote into `folder` as its `MARKER` lists them (relative POSIX paths), `None` if it lists
    none (an export made before markers listed their files, or a marker made by hand)."""
    try:
        files = json.loads((folder / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files)


def extra_files(folder: str | os.PathLike) -> list[str]:
    """Files (and links) under the earlier export `folder` that no export wrote: those its `MARKER` does not list, or
    without such a list those outside an export's layout. Symbolic links are listed, never followed."""
    folder = Path(folder)
    written = _written_files(folder)
    extra = []
    for root, dirs, names in os.walk(folder):  # os.walk follows no symlinked folder by default
        base = Path(root)
        for name in names + [d for d in dirs if (base / d).is_symlink()]:
            relative = (base / name).relative_to(folder).as_posix()
            if relative == MARKER:
                continue
            if written is None:
                if relative.split("/", 1)[0] not in _EXPORT_TOP or (base / name).is_symlink():
                    extra.append(relative)
            elif relative not in written:
                extra.append(relative)
    return sorted(extra)


def _check_existing(out: Path, force: bool, flags: bool, delete_extra: bool = False) -> None:
    """Refuse an existing `out` unless `force` is set and it is an earlier export holding only the files an export
    wrote (or `delete_extra` is set too); checked again before the swap."""
    name, force_name = _argument("out", flags), "`--force`" if flags else "`force=True`"
    if not os.path.lexists(out):
        return
    if out.is_symlink():
        raise ValueError(
            f"{name}={str(out)!r} is a symbolic link (to {os.readlink(out)!r}); name the folder itself or a new one."
        )
    if not out.is_dir():
        raise ValueError(f"{name}={str(out)!r} exists and is not a folder.")
    if not is_export(out):
        raise ValueError(
            f"{name}={str(out)!r} already exists and is not an earlier export (no {MARKER} of {PACKAGE} beside a "
            f"model_index.json), so it is left alone: {force_name} replaces only an earlier export. Name a new folder."
        )
    if not force:
        raise ValueError(f"{name}={str(out)!r} already exists; pass {force_name} to replace this earlier export.")
    if delete_extra:
        return
    extra = extra_files(out)
    if extra:
        shown = ", ".join(repr(f) for f in extra[:_LISTED])
        more = f" and {len(extra) - _LISTED} more" if len(extra) > _LISTED else ""
        extra_name = "`--delete_extra`" if flags else "`delete_extra=True`"
        raise ValueError(
            f"{name}={str(out)!r} is an earlier export that holds {len(extra)} file(s) no export wrote: {shown}{more}. "
            f"{force_name} would delete them; move them out, or add {extra_name} to delete them too."
        )


def check_export_target(
    out: str | os.PathLike | None,
    *,
    force: bool = False,
    base: str | os.PathLike | None = None,
    high_noise_ckpt: str | os.PathLike | None = None,
    low_noise_ckpt: str | os.PathLike | None = None,
    flags: bool = False,
    delete_extra: bool = False,
) -> Path:
    r"""
    Refuse an `out` that an export must never write or replace; it reads nothing but `out` itself.

    Refused: an empty name; the root of the file system; the home folder or a folder holding it; the working
    directory or a folder holding it; a folder that is, holds, or lies inside `base`, `high_noise_ckpt` or
    `low_noise_ckpt` (those that are local paths), all compared as resolved real paths (symlinks followed); a file or
    a symbolic link; and an existing folder unless `force` is set and it is an earlier export (`is_export`) holding
    only files an export wrote (`extra_files`), or `delete_extra` is set too.

    Args:
        out (`str` or `os.PathLike`):
            The folder the export writes.
        force (`bool`, defaults to `False`):
            Whether an earlier export at `out` may be replaced.
        base, high_noise_ckpt, low_noise_ckpt (`str` or `os.PathLike`, *optional*):
            The export's sources; a repo id or Hub path (not an existing local path) is not compared.
        flags (`bool`, defaults to `False`):
            Name the command-line flags (`--out`, `--force`) in messages instead of the Python arguments.
        delete_extra (`bool`, defaults to `False`):
            With `force`, also delete files in the earlier export that no export wrote (refused otherwise).

    Returns:
        `Path`: `out`, made absolute (symlinks in it are kept as given).
    """
    name = _argument("out", flags)
    if out is None or not os.fspath(out).strip():
        raise ValueError(f"{name}={'' if out is None else os.fspath(out)!r} is empty; name the folder to write.")
    path = Path(os.fspath(out)).expanduser().absolute()
    real = path.resolve()
    shown = f"{name}={os.fspath(out)!r}" + ("" if str(real) == os.fspath(out) else f" ({str(real)!r})")
    anew = "an export writes a folder of its own: name a new one inside it"
    if real == Path(real.anchor):
        raise ValueError(f"{shown} is the root of the file system; {anew}.")
    try:
        home = Path.home().resolve()
    except (KeyError, RuntimeError):  # no HOME and no user entry: nothing to protect under that name
        home = None
    if home is not None and real == home:
        raise ValueError(f"{shown} is the home folder; {anew}.")
    if home is not None and real in home.parents:
        raise ValueError(f"{shown} holds the home folder {str(home)!r}; {anew}.")
    cwd = Path.cwd().resolve()
    if real == cwd:
        raise ValueError(f"{shown} is the working directory; {anew}.")
    if real in cwd.parents:
        raise ValueError(f"{shown} holds the working directory {str(cwd)!r}; {anew}.")
    sources = {"base": base, "high_noise_ckpt": high_noise_ckpt, "low_noise_ckpt": low_noise_ckpt}
    for source, spec in sources.items():
        if spec is None or not os.fspath(spec) or not Path(os.fspath(spec)).expanduser().exists():
            continue  # a repo id or Hub path: its files live in the Hub cache, not here
        source_path = Path(os.fspath(spec)).expanduser().resolve()
        what = f"{_argument(source, flags)}={os.fspath(spec)!r}"
        if real == source_path:
            raise ValueError(f"{shown} is {what}; the export would overwrite its own source. Name a new folder.")
        if real in source_path.parents:
            raise ValueError(f"{shown} holds {what}; the export would overwrite its own source. Name a new folder.")
        if source_path in real.parents:
            raise ValueError(f"{shown} lies inside {what}; write the export outside its sources.")
    _check_existing(path, force, flags, delete_extra)
    _check_writable_parent(path, shown)
    return path


def _check_writable_parent(path: Path, shown: str) -> None:
    """Refuse an `out` whose folder cannot be made or written (a file on the way, a read-only or missing file system),
    by making and removing a folder where the export will make its temporary one: before the sources are read, not
    after."""
    folder = path.parent
    while not os.path.lexists(folder):
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{shown} cannot be written: {str(folder)!r} is a file, not a folder.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".bernini-export-check-", dir=folder))
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise ValueError(f"{shown} cannot be written in {str(folder)!r}: {reason}.") from None


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"


def _owned_folder(out: Path, kind: str) -> Path:
    """A new folder beside `out` named for this process and host (created with the umask's permissions, as mkdir)."""
    while True:
        folder = out.parent / f".{out.name}.{os.getpid()}@{_host()}.{secrets.token_hex(4)}.{kind}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder


def remove_stale_partials(parent: str | os.PathLike) -> list[Path]:
    """Remove what exports killed on this host left in `parent` (their process is gone); returns the removed folders.

    A `.partial` folder is deleted. An `.old` folder (an earlier export set aside while its replacement was renamed
    in) is deleted when its export is back in place, and renamed back into place when it is not. Folders of live
    processes and of other hosts are left alone.
    """
    parent, host, removed = Path(parent), _host(), []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = _OWNED.match(entry.name)
        if match is None or match["host"] != host or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or process_alive(pid):
            continue
        target = parent / match["name"]
        if match["kind"] == "old" and not os.path.lexists(target) and is_export(entry):
            entry.rename(target)
            logger.warning(f"Restored {str(target)!r}, set aside by export process {pid} that did not finish.")
            continue
        shutil.rmtree(entry, ignore_errors=True)
        logger.warning(f"Removed {str(entry)!r}, left by export process {pid} that did not finish.")
        removed.append(entry)
    return removed


class _Interrupted(BaseException):
    """SIGTERM or SIGINT during an export (a BaseException, as KeyboardInterrupt, so no `except Exception` eats it)."""

    def __init__(self, signum: int):
        super().__init__(f"export interrupted by {signal.Signals(signum).name}; its partial folder was removed")
        self.signum = signum


class _SignalGuard:
    """For the duration of an export, SIGTERM and SIGINT raise `_Interrupted` (so the partial folder is removed), or
    inside `deferred()` wait for the guard's exit. On exit the previous handlers come back and the signal is raised
    again for them: by default SIGTERM then ends the process and SIGINT raises KeyboardInterrupt. Signals ignored
    before stay ignored, and outside the main thread (where Python cannot install handlers) nothing changes."""

    def __init__(self):
        self.previous: dict[int, Any] = {}
        self.received: int | None = None
        self.deferring = False

    def _handle(self, signum, frame):
        if self.received is not None:
            return  # the cleanup of the first one is under way
        self.received = signum
        if not self.deferring:
            raise _Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold a signal until the guard exits: the swap of two folders and the cleanup must not stop half-way."""
        deferring, self.deferring = self.deferring, True
        try:
            yield
        finally:
            self.deferring = deferring

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type, exc, tb):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.received is not None and self.received in self.previous:
            signal.raise_signal(self.received)  # the previous handler's turn; if it returns, `_Interrupted` goes on
        return False


def _parse_size(max_shard_size: int | str) -> int:
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool):
        size = max_shard_size
    elif str(max_shard_size).strip().isdigit():
        size = int(max_shard_size)
    else:
        try:
            size = parse_size_to_int(str(max_shard_size))
        except ValueError:
            size = 0
    if size <= 0:
        raise ValueError(
            f"`max_shard_size`={max_shard_size!r} is not a size; pass bytes, or digits with a unit such as '10GB' "
            "or '500MB'."
        )
    return size


def _settings(layout: Layout) -> dict[str, Any]:
    """The pipeline settings the exported `model_index.json` records (the base's, with the pipeline's defaults)."""
    defaults = pipeline_settings(BerniniPipeline)
    return {**defaults, **{k: v for k, v in layout.settings.items() if k in defaults}}


def _model_card(repo_id: str, base_model: str, checkpoints: Mapping[str, str]) -> str:
    """README.md with the Hub's YAML front matter (huggingface_hub's ModelCard) and a usage snippet."""
    data = ModelCardData(
        license=LICENSE,
        library_name="diffusers",
        pipeline_tag=PIPELINE_TAG,
        base_model=base_model,
        tags=["bernini", "bernini-r", "video-editing", "text-to-video", "image-editing", *[t.value for t in TASKS]],
    )
    tasks = "\n".join(
        f"| `{spec.task.value}` | {spec.description} | `{spec.default_guidance_mode.value}` |"
        for spec in TASKS.values()
    )
    sources = "\n".join(f"- {EXPERT_NAMES[e]} expert (`{e}`): `{checkpoints[e]}`" for e in EXPERTS)
    body = f"""# Bernini-R (diffusers)

Bernini-R, ByteDance's video renderer, in the diffusers layout: `transformer` is the high-noise expert and
`transformer_2` the low-noise expert (both `BerniniTransformer3DModel`), with the VAE, UMT5 text encoder, tokenizer and
UniPC scheduler of its base, `{base_model}`. Converted from the original checkpoints (EMA weights):

{sources}

## Tasks

| task_type | task | default guidance mode |
|---|---|---|
{tasks}

## Usage

```bash
pip install bernini_diffusers
```

```python
import torch
from bernini_diffusers import BerniniPipeline

pipe = BerniniPipeline.from_pretrained("{repo_id}", dtype=torch.bfloat16)
pipe.enable_model_cpu_offload()
out = pipe(prompt="Add a realistic snowman next to the bench.", task_type="v2v", video="park.mp4")
out.save("park_snowman.mp4")
```

`DiffusionPipeline` loads it too, through the small modules in this repository that import the installed
`bernini_diffusers` (so it must be installed); diffusers asks for `trust_remote_code=True` before running them.
Keep the VAE in float32 as the pipeline above does:

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(
    "{repo_id}", trust_remote_code=True, dtype={{"default": torch.bfloat16, "vae": torch.float32}}
)
```
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    return str(card)


def _copy_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)  # follows the cache's symlinks: the export holds the bytes


def _missing_ancestors(path: Path) -> list[Path]:
    """`path` and its parents that do not exist yet, deepest first: the folders an export creates and may remove."""
    missing = []
    for parent in [path, *path.parents]:
        if os.path.lexists(parent):
            break
        missing.append(parent)
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders this export created, deepest first, each only if empty (`os.rmdir`): whatever another
    process wrote there meanwhile (another export beside this one, a user's file) stays, with its folders."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return  # not empty (or gone): its parents are not empty either


def _local_name(source: Any) -> str:
    """How the model card names a source: a local path by its base name (never the machine's folders), a repo id or
    Hub path as given."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_absolute() or text.startswith(("~", ".")) or path.exists():
        return path.resolve().name if path.name in ("", ".", "..") else path.name
    return text


def export_pipeline(
    high_noise_ckpt: str | os.PathLike,
    low_noise_ckpt: str | os.PathLike,
    out: str | os.PathLike,
    base: str | os.PathLike = DEFAULT_BASE,
    *,
    force: bool = False,
    delete_extra: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
    base_model: str | None = None,
    repo_id: str | None = None,
    **hub_kwargs,
) -> Path:
    r"""
    Convert the original Bernini-R checkpoints into a self-contained diffusers folder.

    Args:
        high_noise_ckpt (`str` or `os.PathLike`):
            The high-noise expert's original checkpoint: a folder, an index or `.safetensors` file, or a Hub path
            `owner/name[@revision][/folder]` (see [`~loading.resolve_checkpoint`]).
        low_noise_ckpt (`str` or `os.PathLike`):
            The low-noise expert's original checkpoint, in the same forms.
        out (`str` or `os.PathLike`):
            The folder to write. It must not exist unless `force=True`, and must not be the working directory, the
            home folder, `/`, or a folder that is, holds or lies inside a source (see [`check_export_target`]).
        base (`str` or `os.PathLike`, defaults to `"Wan-AI/Wan2.2-T2V-A14B-Diffusers"`):
            The diffusers base (folder or repo id, or an official config folder naming it in `wan22_base`): its
            transformer configs define the experts, its VAE, text encoder, tokenizer and scheduler are copied.
        force (`bool`, defaults to `False`):
            Replace an existing `out` that is an earlier export of this package (it holds `MARKER` beside its
            `model_index.json`; anything else is refused), only once the new folder is complete. It is refused too
            when that export holds files no export wrote (see [`extra_files`]), unless `delete_extra` is set.
        delete_extra (`bool`, defaults to `False`):
            With `force`, also delete the files in the earlier export that no export wrote.
        max_shard_size (`int` or `str`, defaults to `"10GB"`):
            The largest weight file written, as in diffusers' `save_pretrained`.
        dtype (`torch.dtype`, *optional*):
            Cast floating tensors of the experts to it; by default they keep the checkpoint's dtype.
        base_model (`str`, *optional*):
            The model card's `base_model`; defaults to `base` when it is a repo id, else to the `wan22_base` of an
            official config folder when that is one, else to the official base.
        repo_id (`str`, *optional*):
            The repo the model card's usage snippet names; defaults to the folder name of `out`.
        hub_kwargs:
            `revision` (of `base`), `cache_dir`, `token`, `local_files_only`, `force_download`.

    Returns:
        `Path`: `out`.

    SIGTERM and SIGINT during the export remove the temporary folder before the previous handlers see them, and the
    export first removes what exports killed on this host left beside `out` (see [`remove_stale_partials`]).
    """
    unknown = set(hub_kwargs) - set(HUB_KWARGS)
    if unknown:
        raise ValueError(
            f"export_pipeline got unexpected arguments {sorted(unknown)}; Hub arguments: {list(HUB_KWARGS)}."
        )
    out = check_export_target(
        out,
        force=force,
        base=base,
        high_noise_ckpt=high_noise_ckpt,
        low_noise_ckpt=low_noise_ckpt,
        delete_extra=delete_extra,
    )
    max_shard_size = _parse_size(max_shard_size)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"`dtype`={dtype!r} is not a floating torch.dtype (e.g. torch.bfloat16).")
    checkpoints = {"transformer": high_noise_ckpt, "transformer_2": low_noise_ckpt}
    for expert, spec in checkpoints.items():
        if spec is None:
            raise ValueError(f"`{CHECKPOINT_ARGUMENTS[expert]}` is required.")

    # 1. Plan: the base's files, both checkpoints read and verified. Nothing is written before this succeeds.
    layout = resolve_layout(base, hub_kwargs, argument="base")
    missing = [c for c in (*EXPERTS, "vae", "text_encoder", "tokenizer") if c not in layout.components]
    if missing:
        raise ValueError(
            f"`base`={str(base)!r} lacks {missing}; export needs a two-expert diffusers base such as {DEFAULT_BASE}."
        )
    # The experts' configs (their weights come from the checkpoints) and everything of the components copied.
    files = {
        component: component_files(model, component, None, weights=component not in EXPERTS)[0]
        for component, model in layout.components.items()
    }
    fetch_components(layout, files)
    # expert -> (its conversion plan, the expert on the meta device: only its config is saved)
    experts = {
        expert: plan_checkpoint(
            checkpoints[expert],
            expert,
            BerniniTransformer3DModel.load_config(layout.components[expert].root / expert),
            hub_kwargs,
        )
        for expert in EXPERTS
    }

    # 2. Write beside `out`, so the final rename stays on one file system.
    created = _missing_ancestors(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out.parent)
    with _SignalGuard() as guard:
        tmp = None
        try:
            tmp = _owned_folder(out, "partial")
            _write_marker(tmp)
            for expert, (plan, skeleton) in experts.items():
                skeleton.save_config(tmp / expert)
                write_expert_shards(plan, tmp / expert, max_shard_size, dtype)
            for component in COPIED_COMPONENTS:
                for file in files.get(component, ()):
                    _copy_file(layout.components[component].root / file, tmp / file)
            if "scheduler" not in files:
                default_scheduler().save_config(tmp / "scheduler")
            _write_model_index(tmp, layout)
            add_remote_code(tmp)
            if base_model is None:
                base_model = (
                    str(base) if _is_repo_id(base) else (layout.base if _is_repo_id(layout.base) else DEFAULT_BASE)
                )
            sources = {e: _local_name(checkpoints[e]) for e in EXPERTS}
            (tmp / "README.md").write_text(_model_card(repo_id or out.name, base_model, sources))
            _write_marker(tmp, written=True)  # now listing the files, so a later `force` can tell what is not its
            for expert, (plan, _) in experts.items():
                verify_written(plan, tmp / expert, dtype)
            with guard.deferred():
                _replace(tmp, out, force, delete_extra)
        except BaseException:
            with guard.deferred():
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)  # this export's own folder, named for this process
                _remove_if_empty(created)  # never a tree: others may have written beside this export
            raise
    return out


def _is_repo_id(name: Any) -> bool:
    """Whether `name` names a repo for the model card's `base_model`: an owner/name id that is not a local path."""
    return isinstance(name, str) and "/" in name and is_repo_id(name)


def _write_model_index(folder: Path, layout: Layout) -> None:
    index = {
        "_class_name": "BerniniPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", layout.text_encoder_class],
        "tokenizer": ["transformers", layout.tokenizer_class or "T5Tokenizer"],
        "transformer": ["bernini_diffusers.transformer_bernini", "BerniniTransformer3DModel"],
        "transformer_2": ["bernini_diffusers.transformer_bernini", "BerniniTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        **_settings(layout),
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_marker(folder: Path, written: bool = False) -> None:
    marker: dict[str, Any] = {"package": PACKAGE, "version": __version__}
    if written:  # every file of the finished folder, so `force` later deletes only these without asking
        marker["files"] = sorted(
            p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p != folder / MARKER
        )
    (folder / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def _replace(tmp: Path, out: Path, force: bool, delete_extra: bool = False) -> None:
    """Move the finished `tmp` to `out`; an existing `out` (an earlier export, `force`) is moved aside first and removed
    after, and moved back if the rename fails."""
    _check_existing(out, force, False, delete_extra)  # again: the folder may have changed while the export was written
    old = None
    if os.path.lexists(out):
        old = _owned_folder(out, "old")
        old.rmdir()
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ upload


def folder_files(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """Every file under `folder` with its size in bytes, as it would be uploaded (all but the export's `MARKER`)."""
    folder = Path(folder)
    return sorted(
        (p.relative_to(folder).as_posix(), p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file() and p != folder / MARKER
    )


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    raise AssertionError


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
):
    r"""
    Create `repo_id` (if needed) and upload `folder` to it with huggingface_hub (`create_repo`, `upload_folder`).

    Args:
        folder (`str` or `os.PathLike`):
            An exported (or `save_pretrained`) Bernini-R folder; it must hold `model_index.json`.
        repo_id (`str`):
            The model repo, `owner/name`.
        private (`bool`, *optional*):
            Create the repo private; `None` leaves the Hub's default (and an existing repo's visibility) alone.
        commit_message (`str`, *optional*):
            The commit message; defaults to "Upload Bernini-R diffusers folder".
        token (`str`, *optional*):
            The Hub token; defaults to the logged-in one (`hf auth login` or `HF_TOKEN`).
        create_pr (`bool`, defaults to `False`):
            Open a pull request instead of committing to the main branch.
        dry_run (`bool`, defaults to `False`):
            Print what would be uploaded, with sizes, and upload nothing.
        echo (`Callable[[str], None]`, defaults to `print`):
            Where the dry-run listing goes.

    Returns:
        The `CommitInfo` of the upload, or for a dry run the list of `(path, size)` that would be uploaded.
    """
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"`folder`={str(folder)!r} holds no model_index.json; export or save the pipeline first."
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"`repo_id`={repo_id!r} (`--push_to_hub`) is not a repo id (owner/name): {err}") from None
    files = folder_files(folder)
    if dry_run:
        visibility = {None: "", True: " (private)", False: " (public)"}[private]
        echo(f"Would upload {len(files)} files, {_human(sum(s for _, s in files))}, to {repo_id}{visibility}:")
        for path, size in files:
            echo(f"  {_human(size):>10}  {path}")
        return files
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=folder,
        repo_type="model",
        commit_message=commit_message or "Upload Bernini-R diffusers folder",
        create_pr=create_pr,
        ignore_patterns=[MARKER],  # local bookkeeping for `force`, not part of the model
    )
