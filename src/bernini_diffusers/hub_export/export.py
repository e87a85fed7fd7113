"""Export original Bernini-R checkpoints as one self-contained diffusers folder, and upload a folder to the Hub.

`export_pipeline` plans and verifies everything first (the base's components, both checkpoints' key sets, shapes and
dtypes against the base's transformer configs), then writes into a temporary folder beside `out` and renames it into
place only when every shard has been read back and checked. An error at any point leaves neither `out` nor the
temporary folder behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

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
from ..transformer_bernini import BerniniTransformer3DModel
from .convert import DEFAULT_MAX_SHARD_SIZE, EXPERT_NAMES, EXPERTS, verify_written, write_expert_shards
from .remote_code import add_remote_code

DEFAULT_BASE = WAN22_BASE  # the official `wan22_base`
COPIED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")
LICENSE = "apache-2.0"
PIPELINE_TAG = "image-text-to-video"  # the tag of the official model card


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"`out`={str(out)!r} exists and is not a folder.")
    if out.exists() and not force:
        raise ValueError(f"`out`={str(out)!r} already exists; pass `force=True` (`--force`) to replace it.")


def _parse_size(max_shard_size: int | str) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int

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
    from ..pipeline_bernini import BerniniPipeline

    defaults = pipeline_settings(BerniniPipeline)
    return {**defaults, **{k: v for k, v in layout.settings.items() if k in defaults}}


def _model_card(repo_id: str, base_model: str, checkpoints: Mapping[str, str]) -> str:
    """README.md with the Hub's YAML front matter (huggingface_hub's ModelCard) and a usage snippet."""
    from huggingface_hub import ModelCard, ModelCardData

    from ..tasks import TASKS

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

pipe = BerniniPipeline.from_pretrained("{repo_id}", torch_dtype=torch.bfloat16)
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
    "{repo_id}", trust_remote_code=True, torch_dtype={{"default": torch.bfloat16, "vae": torch.float32}}
)
```
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    return str(card)


def _copy_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)  # follows the cache's symlinks: the export holds the bytes


def _first_missing_ancestor(path: Path) -> Path | None:
    missing = None
    for parent in [path, *path.parents]:
        if parent.exists():
            return missing
        missing = parent
    return missing


def export_pipeline(
    high_noise_ckpt: str | os.PathLike,
    low_noise_ckpt: str | os.PathLike,
    out: str | os.PathLike,
    base: str | os.PathLike = DEFAULT_BASE,
    *,
    force: bool = False,
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
            The folder to write. It must not exist unless `force=True`.
        base (`str` or `os.PathLike`, defaults to `"Wan-AI/Wan2.2-T2V-A14B-Diffusers"`):
            The diffusers base (folder or repo id, or an official config folder naming it in `wan22_base`): its
            transformer configs define the experts, its VAE, text encoder, tokenizer and scheduler are copied.
        force (`bool`, defaults to `False`):
            Replace an existing `out` (only once the new folder is complete).
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
    """
    unknown = set(hub_kwargs) - set(HUB_KWARGS)
    if unknown:
        raise ValueError(
            f"export_pipeline got unexpected arguments {sorted(unknown)}; Hub arguments: {list(HUB_KWARGS)}."
        )
    out = Path(out).absolute()
    _check_out(out, force)
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
    created = _first_missing_ancestor(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        for expert, (plan, skeleton) in experts.items():
            skeleton.save_config(tmp / expert)
            write_expert_shards(plan, tmp / expert, max_shard_size, dtype)
        for component in COPIED_COMPONENTS:
            for file in files.get(component, ()):
                _copy_file(layout.components[component].root / file, tmp / file)
        if "scheduler" not in files:
            from ..pipeline_bernini import default_scheduler

            default_scheduler().save_config(tmp / "scheduler")
        _write_model_index(tmp, layout)
        add_remote_code(tmp)
        if base_model is None:
            base_model = str(base) if _is_repo_id(base) else (layout.base if _is_repo_id(layout.base) else DEFAULT_BASE)
        sources = {e: str(checkpoints[e]) for e in EXPERTS}
        (tmp / "README.md").write_text(_model_card(repo_id or out.name, base_model, sources))
        for expert, (plan, _) in experts.items():
            verify_written(plan, tmp / expert, dtype)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return out


def _is_repo_id(name: Any) -> bool:
    """Whether `name` names a repo for the model card: an owner/name id that is not a local path."""
    return isinstance(name, str) and not Path(name).exists() and name.count("/") == 1 and is_repo_id(name)


def _write_model_index(folder: Path, layout: Layout) -> None:
    import diffusers

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


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`; an existing `out` (`force`) is moved aside first and removed after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
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
    """Every file under `folder` with its size in bytes, as it would be uploaded."""
    folder = Path(folder)
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


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
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

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
    )
