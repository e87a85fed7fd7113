"""`BerniniPipeline.from_pretrained`: find a Bernini-R model's files, locally or on the Hub, and build the pipeline.

Three published layouts load (SPEC section 9.2):

- **diffusers folders**: a `model_index.json` (ours, the exported one, or Wan2.2's `WanPipeline`), or the same
  component folders under a root `config.json` of `model_type: bernini_renderer` (`ByteDance/Bernini-R-Diffusers`,
  `ByteDance/Bernini-R-1.3B-Diffusers`);
- **official config folders** (`configs/bernini_renderer_wan22`): a root `config.json` that names its base in
  `wan22_base` (a repo id or a path) and holds no component folders; the base supplies them;
- **separate checkpoints** (`ByteDance/Bernini-R`: `bernini_renderer_high/`, `bernini_renderer_low/`), given as
  `high_noise_ckpt` / `low_noise_ckpt` on top of a base; see `resolve_checkpoint` for the accepted forms.

A Hub repo is fetched as diffusers does: the root files first, then only the files the layout needs (no weights of
an expert that a checkpoint replaces, one variant of each weight file, never a pickle). Only safetensors are loaded.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging

from .hub_export.convert import (
    EXPERTS,
    ConversionPlan,
    expected_tensors,
    expert_skeleton,
    index_shards,
    load_expert_weights,
    plan_conversion,
    read_checkpoint,
    read_index,
    sample_names,
)

logger = logging.get_logger(__name__)

MODEL_FOLDERS = ("transformer", "transformer_2", "vae", "text_encoder")
COMPONENTS = (*MODEL_FOLDERS, "tokenizer", "scheduler")
ROOT_FILES = ("model_index.json", "config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_PATTERNS = [f"*{suffix}" for suffix in PICKLE_SUFFIXES]
HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download")
# Official root `config.json` keys -> `BerniniPipeline` config names.
ROOT_CONFIG_KEYS = {
    "switch_dit_boundary": "boundary_ratio",
    "max_trained_src_id": "max_trained_src_id",
    "interpolate_src_id": "interpolate_src_id",
    "use_unipc": "use_unipc",
    "use_src_id_rotary_emb": "use_src_id_rotary_emb",
}
# The folder of each expert inside the original checkpoint repo (`ByteDance/Bernini-R`).
CHECKPOINT_FOLDERS = {"transformer": "bernini_renderer_high", "transformer_2": "bernini_renderer_low"}
CHECKPOINT_ARGUMENTS = {"transformer": "high_noise_ckpt", "transformer_2": "low_noise_ckpt"}
DEFAULT_TEXT_ENCODER = "UMT5EncoderModel"
# diffusers / transformers weight names: `<stem>.safetensors`, `<stem>-00001-of-00002.safetensors` and with a variant
# `<stem>.<variant>.safetensors`, `<stem>.<variant>-00001-of-00002.safetensors`; indexes
# `<stem>.safetensors.index[.<variant>].json`.
_WEIGHT_RE = re.compile(r"^(?P<stem>[^.]+)(\.(?P<variant>[^.-]+))?(-\d{5}-of-\d{5})?\.safetensors$")
_INDEX_RE = re.compile(r"^(?P<stem>[^.]+)\.safetensors\.index(\.(?P<variant>[^.]+))?\.json$")


def _is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES) or ".bin.index" in name


def pickle_error(files: Iterable[str], where: str) -> ValueError:
    return ValueError(
        f"{where} holds only pickle weights ({sample_names(files)}); bernini_diffusers loads safetensors only, because "
        "unpickling runs code. Convert them to safetensors first."
    )


# ------------------------------------------------------------------------------------------------ files


def _walk(root: Path, depth: int = 2) -> set[str]:
    """Files under `root`, at most `depth` levels deep (a model's root files and its component folders)."""
    found = set()
    for path in root.iterdir() if root.is_dir() else ():
        if path.is_file():
            found.add(path.name)
        elif path.is_dir() and depth > 1:
            found.update(f"{path.name}/{name}" for name in _walk(path, depth - 1))
    return found


def is_repo_id(name: str) -> bool:
    """Whether `name` is a valid Hub repo id (huggingface_hub's rules); it says nothing of whether the repo exists."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


@dataclass
class ModelFiles:
    """A local folder, or a Hub repo pinned to one commit: where its files are and which files it has.

    A repo is read from the cache that `snapshot_download` fills; `fetch` downloads the files a load needs.
    """

    name: str
    root: Path
    files: set[str]
    repo_id: str | None = None
    commit: str | None = None
    hub: dict = field(default_factory=dict)

    @classmethod
    def open(
        cls, name: str | os.PathLike, hub: Mapping[str, Any], argument: str, patterns: Iterable[str] = ROOT_FILES
    ) -> ModelFiles:
        """Open `name` (a folder, or a repo id whose files matching `patterns` are fetched first)."""
        path = Path(name)
        if path.is_dir():
            return cls(str(name), path, _walk(path))
        name = str(name)
        if path.exists() or not is_repo_id(name):
            raise FileNotFoundError(f"`{argument}`={name!r} is neither a model folder nor a Hub repo id (owner/name).")
        from huggingface_hub import get_cached_repo_tree, snapshot_download
        from huggingface_hub.errors import CachedRepoTreeNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

        try:
            root = Path(snapshot_download(name, allow_patterns=list(patterns), ignore_patterns=PICKLE_PATTERNS, **hub))
        except (LocalEntryNotFoundError, HfHubHTTPError) as err:
            raise FileNotFoundError(
                f"`{argument}`={name!r} is not a local folder, and the Hub repo could not be read "
                f"({type(err).__name__}: {err})."
            ) from err
        commit = root.name  # snapshots are named by commit: every later fetch reads the same one
        try:
            files = {
                entry.path for entry in get_cached_repo_tree(name, revision=commit, cache_dir=hub.get("cache_dir"))
            }
        except CachedRepoTreeNotFoundError:
            files = _walk(root, depth=3)  # offline without a cached listing: what the snapshot holds is what there is
        return cls(name, root, files, repo_id=name, commit=commit, hub=dict(hub))

    def folder(self, folder: str) -> list[str]:
        """The names of the files directly inside `folder` ("" for the root)."""
        prefix = f"{folder}/" if folder else ""
        return sorted(f[len(prefix) :] for f in self.files if f.startswith(prefix) and "/" not in f[len(prefix) :])

    def has_folder(self, folder: str) -> bool:
        return bool(self.folder(folder))

    def fetch(self, paths: Iterable[str]) -> None:
        """Download `paths` (file paths in the repo) into the cache; a local folder has them already."""
        paths = sorted(set(paths))
        if self.repo_id is None or not paths:
            return
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        hub = {k: v for k, v in self.hub.items() if k != "revision"}
        try:
            snapshot_download(self.repo_id, revision=self.commit, allow_patterns=paths, **hub)
        except (LocalEntryNotFoundError, HfHubHTTPError) as err:
            missing = [p for p in paths if not (self.root / p).is_file()] or paths
            raise FileNotFoundError(
                f"Could not fetch {len(missing)} file(s) of {self}: {sample_names(missing)} "
                f"({type(err).__name__}: {err})"
            ) from err

    def __str__(self) -> str:
        return self.name if self.repo_id is None else f"{self.repo_id}@{self.commit[:10]}"


def select_weights(names: list[str], variant: str | None, where: str) -> tuple[list[str], str | None]:
    """The safetensors weights (and index) of one component folder, as diffusers picks them: the `variant` files
    when the folder has them, else the plain ones. Returns the names and the variant they are. Pickle files are
    never chosen; a folder with only pickles is an error naming them."""
    weights = {n: m for n in names if (m := _WEIGHT_RE.match(n))}
    indexes = {n: m for n in names if (m := _INDEX_RE.match(n))}
    for wanted in ([variant] if variant else []) + [None]:
        chosen = [n for n, m in weights.items() if m["variant"] == wanted]
        if chosen:
            chosen += [n for n, m in indexes.items() if m["variant"] == wanted]
            return sorted(chosen), wanted
    pickles = [n for n in names if _is_pickle(n)]
    if pickles:
        raise pickle_error(pickles, where)
    raise FileNotFoundError(f"{where} has no safetensors weights (files: {sample_names(names) or 'none'}).")


# ------------------------------------------------------------------------------------------------ layouts


@dataclass
class Layout:
    """Where each component of a model lives and the pipeline settings its root files give."""

    components: dict[str, ModelFiles]  # component -> the model that holds its folder
    settings: dict[str, Any]  # BerniniPipeline config values
    text_encoder_class: str = DEFAULT_TEXT_ENCODER
    tokenizer_class: str | None = None
    shift: float | None = None
    base: str | None = None  # what `wan22_base` named, if the model has one


def _read_json(model: ModelFiles, name: str) -> dict:
    path = model.root / name
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} of {model} is not readable JSON: {err}") from None


def _component_present(model: ModelFiles, component: str) -> bool:
    names = model.folder(component)
    if component == "tokenizer":
        return bool(names)
    return ("scheduler_config.json" if component == "scheduler" else "config.json") in names


def resolve_layout(
    name: str | os.PathLike, hub: Mapping[str, Any], argument: str = "pretrained_model_name_or_path", _depth: int = 0
) -> Layout:
    """Read the root files of `name` and work out its layout, following `wan22_base` to the base it names."""
    model = ModelFiles.open(name, hub, argument)
    if "model_index.json" in model.files:
        index = _read_json(model, "model_index.json")
        listed = [c for c in COMPONENTS if isinstance(index.get(c), list) and index[c][0] is not None]
        return Layout(
            components={c: model for c in listed if _component_present(model, c)},
            settings={k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)},
            text_encoder_class=(index.get("text_encoder") or [None, DEFAULT_TEXT_ENCODER])[1],
            tokenizer_class=(index.get("tokenizer") or [None, None])[1],
        )
    if "config.json" not in model.files:
        raise ValueError(
            f"{str(model)!r} is not a diffusers model folder: it has neither model_index.json nor a config.json of "
            "model_type 'bernini_renderer'."
        )
    config = _read_json(model, "config.json")
    if config.get("model_type") != "bernini_renderer":
        raise ValueError(
            f"{str(model)!r} has a config.json with model_type={config.get('model_type')!r}; expected "
            "'bernini_renderer' (or a model_index.json). The full Bernini planner ('bernini') is not supported."
        )
    settings = {ROOT_CONFIG_KEYS[k]: v for k, v in config.items() if k in ROOT_CONFIG_KEYS}
    if "boundary_ratio" in settings:
        settings["boundary_ratio"] = settings["boundary_ratio"] or None  # 0 means one expert, no switch
    components = {c: model for c in COMPONENTS if _component_present(model, c)}
    layout = Layout(components=components, settings=settings, shift=config.get("shift"))
    base = config.get("wan22_base")
    if base:
        if _depth > 2:
            raise ValueError(f"`wan22_base` of {str(model)!r} leads through more than three configs; is it circular?")
        local = model.root / base if model.repo_id is None and (model.root / base).is_dir() else base
        base_hub = {k: v for k, v in hub.items() if k != "revision"}  # the revision named the config, not its base
        base_layout = resolve_layout(local, base_hub, argument=f"wan22_base of {model}", _depth=_depth + 1)
        # Folders of the config's own win over the base's, as the official loader prefers local ones.
        layout.components = {**base_layout.components, **components}
        layout.settings = {**base_layout.settings, **settings}
        layout.text_encoder_class = base_layout.text_encoder_class
        layout.tokenizer_class = base_layout.tokenizer_class
        layout.shift = config.get("shift", base_layout.shift)
        layout.base = str(base)
    if config.get("skip_transformer_2"):
        layout.components.pop("transformer_2", None)
    return layout


# ------------------------------------------------------------------------------------------------ checkpoints


@dataclass
class CheckpointFiles:
    """The safetensors files of one original expert checkpoint, and the index that lists them (if any)."""

    name: str
    files: list[Path]
    weight_map: dict[str, str] | None = None


def _checkpoint_in(
    repo: ModelFiles, folder: str, where: str, expert: str, descend: bool = True
) -> tuple[str, str, list[str]]:
    """Pick the checkpoint files of `folder` in `repo`: its index, else its safetensors files, else (with `descend`)
    those of the expert's own subfolder, as in a download of `ByteDance/Bernini-R`.

    Returns `(folder, "index", [name])` or `(folder, "files", names)`, the names relative to the folder returned.
    """
    names = repo.folder(folder)
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(indexes) > 1:
        raise ValueError(f"{where} holds several indexes ({sample_names(indexes)}); pass the one to load.")
    if indexes:
        return folder, "index", indexes
    tensors = [n for n in names if n.endswith(".safetensors")]
    if tensors:
        return folder, "files", sorted(tensors)
    subfolder = f"{folder}/{CHECKPOINT_FOLDERS[expert]}".strip("/")
    if descend and repo.has_folder(subfolder):
        return _checkpoint_in(repo, subfolder, f"{where}, folder {subfolder!r}", expert, descend=False)
    pickles = [n for n in names if _is_pickle(n)]
    if pickles:
        raise pickle_error(pickles, where)
    raise FileNotFoundError(f"{where} holds no safetensors checkpoint (files: {sample_names(names) or 'none'}).")


def _checkpoint_file(path: Path, where: str) -> CheckpointFiles:
    """A checkpoint given as one local file: an index (its shards beside it) or a single safetensors file."""
    if _is_pickle(path.name):
        raise pickle_error([path.name], where)
    if path.name.endswith(".json"):
        return CheckpointFiles(str(path), *index_shards(path))
    if path.name.endswith(".safetensors"):
        return CheckpointFiles(str(path), [path])
    raise ValueError(
        f"{where} is not a checkpoint: pass a folder, a .safetensors file or a .safetensors.index.json file."
    )


def parse_checkpoint_spec(spec: str) -> tuple[str, str | None, str]:
    """`[hf://]owner/name[@revision][/path/in/repo]` -> (repo id, revision, path); the path may be empty."""
    spec = spec.removeprefix("hf://").strip("/")
    owner, _, rest = spec.partition("/")
    repo_name, _, path = rest.partition("/")
    repo_name, _, revision = repo_name.partition("@")
    return f"{owner}/{repo_name}", revision or None, path


def resolve_checkpoint(
    spec: str | os.PathLike, expert: str, hub: Mapping[str, Any] | None = None, argument: str | None = None
) -> CheckpointFiles:
    """Find the files of an original expert checkpoint.

    `spec` is one of:

    - a local folder holding a `*.safetensors.index.json` with its shards, or `.safetensors` files (a folder that
      holds `bernini_renderer_high/` / `bernini_renderer_low/` instead, such as a download of `ByteDance/Bernini-R`,
      uses the expert's own);
    - a `.safetensors.index.json` file, or a single `.safetensors` file;
    - a Hub path `[hf://]owner/name[@revision][/folder or file]`, as huggingface_hub's file system writes it, e.g.
      `ByteDance/Bernini-R/bernini_renderer_high` or just `ByteDance/Bernini-R`.

    `hub` passes `cache_dir`, `token`, `local_files_only`, `force_download` on; the revision comes from `@revision`.
    """
    argument = argument or CHECKPOINT_ARGUMENTS[expert]
    spec = str(spec)
    where = f"`{argument}`={spec!r}"
    path = Path(spec)
    if path.is_file():
        return _checkpoint_file(path, where)
    if path.is_dir():
        repo, inner = ModelFiles.open(path, {}, argument), ""
    else:
        if path.is_absolute() or spec.startswith(("./", "../")):  # a path, never a Hub id: no request for a typo
            raise FileNotFoundError(f"{where} does not exist.")
        repo_id, revision, inner = parse_checkpoint_spec(spec)
        if not is_repo_id(repo_id):
            raise FileNotFoundError(
                f"{where} is neither a local file or folder nor a Hub path (owner/name[@revision][/folder])."
            )
        hub = {k: v for k, v in (hub or {}).items() if k != "revision"}
        if revision:
            hub["revision"] = revision
        if _is_pickle(inner):
            raise pickle_error([inner], where)
        # The first download takes only indexes (the one named, or those of the folder and the expert's subfolder).
        patterns = [inner]
        if not inner.endswith(".json"):
            folders = [inner, f"{inner}/{CHECKPOINT_FOLDERS[expert]}".strip("/")]
            patterns = [f"{folder}/*.safetensors.index.json".lstrip("/") for folder in folders]
        repo = ModelFiles.open(repo_id, hub, argument, patterns=patterns)
    if inner.endswith((".json", ".safetensors")):
        if inner not in repo.files:
            raise FileNotFoundError(f"{where}: the repo {repo} has no file {inner!r}.")
        folder, _, name = inner.rpartition("/")
        kind, picked = ("index" if inner.endswith(".json") else "files"), [name]
    else:
        if inner and not repo.has_folder(inner):
            raise FileNotFoundError(f"{where}: the repo {repo} has no folder {inner!r}.")
        folder, kind, picked = _checkpoint_in(repo, inner, where, expert)
    prefix = f"{folder}/" if folder else ""
    if kind == "index":
        index = repo.root / (prefix + picked[0])
        repo.fetch([prefix + picked[0]])
        weight_map = read_index(index)
        repo.fetch(prefix + name for name in weight_map.values())  # the shards the index names, nothing else
        return CheckpointFiles(spec, *index_shards(index, weight_map))
    repo.fetch(prefix + name for name in picked)
    return CheckpointFiles(spec, [repo.root / (prefix + name) for name in picked])


def plan_checkpoint(
    spec: str | os.PathLike, expert: str, config: Mapping[str, Any], hub: Mapping[str, Any] | None = None
) -> tuple[ConversionPlan, torch.nn.Module]:
    """Find an original expert checkpoint and plan its conversion onto the expert of `config` (the base's
    `transformer*/config.json`): its key set, every shape and every dtype are verified before any weight is read.

    Returns the plan and the expert built on the meta device (no weight memory), whose float32 modules the plan keeps.
    """
    checkpoint = resolve_checkpoint(spec, expert, hub)
    source = read_checkpoint(checkpoint.files, checkpoint.weight_map)
    model = expert_skeleton(config)
    plan = plan_conversion(
        source,
        expert,
        expected_tensors(model),
        checkpoint=f"{CHECKPOINT_ARGUMENTS[expert]}={checkpoint.name!r}",
        keep_in_fp32=model._keep_in_fp32_modules or (),
    )
    logger.info(plan.describe())
    return plan, model


def load_checkpoint_expert(
    spec: str | os.PathLike,
    expert: str,
    config: Mapping[str, Any],
    torch_dtype: torch.dtype | None = None,
    hub: Mapping[str, Any] | None = None,
):
    """A `BerniniTransformer3DModel` of `config` holding the weights of an original checkpoint.

    The checkpoint's keys are converted (EMA copies preferred) and verified by `plan_checkpoint`, then its tensors are
    assigned to the expert; the base's own transformer weights are never read.
    """
    plan, model = plan_checkpoint(spec, expert, config, hub)
    model = load_expert_weights(plan, model, torch_dtype)
    model.register_to_config(_name_or_path=str(spec))
    return model


# ------------------------------------------------------------------------------------------------ pipeline


def _pop_dtype(kwargs: dict) -> torch.dtype | None:
    torch_dtype, dtype = kwargs.pop("torch_dtype", None), kwargs.pop("dtype", None)
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ValueError(f"`torch_dtype`={torch_dtype} and `dtype`={dtype} disagree; pass one of them.")
    dtype = torch_dtype or dtype
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"`torch_dtype`={dtype!r} is not a torch.dtype (e.g. torch.bfloat16).")
    return dtype


def component_files(
    model: ModelFiles, component: str, variant: str | None, weights: bool
) -> tuple[list[str], str | None]:
    """The files of `component` a load reads (paths in `model`) and the weight variant chosen."""
    names = model.folder(component)
    if component in ("tokenizer", "scheduler"):
        return [f"{component}/{n}" for n in names if not _is_pickle(n)], None
    picked, used = [], None
    if weights:
        picked, used = select_weights(names, variant, f"{model}/{component}")
    configs = [n for n in names if n.endswith(".json") and not _INDEX_RE.match(n)]
    return [f"{component}/{n}" for n in configs + picked], used


def fetch_components(layout: Layout, files: Mapping[str, list[str]]) -> None:
    """Download the `files` of each component (see `component_files`), one download per repo that holds some."""
    per_repo: dict[int, tuple[ModelFiles, list[str]]] = {}
    for component, paths in files.items():
        model = layout.components[component]
        per_repo.setdefault(id(model), (model, []))[1].extend(paths)
    for model, paths in per_repo.values():
        model.fetch(paths)


def pipeline_settings(cls) -> dict[str, Any]:
    """The settings of pipeline class `cls` (the `__init__` arguments with defaults that are not components) and
    their defaults, as diffusers tells them apart."""
    parameters = inspect.signature(cls.__init__).parameters
    return {name: parameters[name].default for name in cls._get_signature_keys(cls)[1]}


def load_pipeline(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
    """The body of `BerniniPipeline.from_pretrained`; see its docstring."""
    import transformers
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

    from .transformer_bernini import BerniniTransformer3DModel

    dtype = _pop_dtype(kwargs)
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    variant = kwargs.pop("variant", None)
    model_kwargs = {k: kwargs.pop(k) for k in ("low_cpu_mem_usage",) if k in kwargs}
    if kwargs.pop("use_safetensors", True) is False:
        raise ValueError("`use_safetensors`=False is not supported: bernini_diffusers loads safetensors only.")
    checkpoints = {expert: kwargs.pop(argument, None) for expert, argument in CHECKPOINT_ARGUMENTS.items()}
    if (checkpoints["transformer"] is None) != (checkpoints["transformer_2"] is None):
        given = "transformer" if checkpoints["transformer"] is not None else "transformer_2"
        missing = "transformer_2" if given == "transformer" else "transformer"
        raise ValueError(
            f"`{CHECKPOINT_ARGUMENTS[given]}`={checkpoints[given]!r} was given without "
            f"`{CHECKPOINT_ARGUMENTS[missing]}`; the two original expert checkpoints go together."
        )
    from_checkpoints = checkpoints["transformer"] is not None
    passed = {c: kwargs.pop(c) for c in COMPONENTS if c in kwargs}
    config_names = sorted(pipeline_settings(cls))
    overrides = {k: kwargs.pop(k) for k in config_names if k in kwargs}
    if kwargs:
        raise ValueError(
            f"BerniniPipeline.from_pretrained got unexpected arguments: {sorted(kwargs)}. It accepts the components "
            f"{list(COMPONENTS)}, the settings {config_names}, `torch_dtype`, `variant`, `high_noise_ckpt`, "
            f"`low_noise_ckpt` and the Hub arguments {list(HUB_KWARGS)}."
        )

    layout = resolve_layout(pretrained_model_name_or_path, hub)
    if from_checkpoints and "transformer_2" not in layout.components:
        raise ValueError(
            f"`high_noise_ckpt`/`low_noise_ckpt` need a two-expert base, but {str(pretrained_model_name_or_path)!r} "
            "has no `transformer_2`."
        )
    missing = [
        c for c in ("transformer", "vae", "text_encoder", "tokenizer") if c not in {**layout.components, **passed}
    ]
    if missing:
        folders = ", ".join(f"`{c}/`" for c in missing)
        raise ValueError(
            f"{str(pretrained_model_name_or_path)!r} has no {folders} folder; pass the component or a base."
        )

    # 1. Fetch what the load reads, one download per repo: configs, one variant of each weight file, small folders.
    picked = {
        component: component_files(model, component, variant, weights=not (from_checkpoints and component in EXPERTS))
        for component, model in layout.components.items()
        if component not in passed
    }
    variants = {component: used for component, (_, used) in picked.items()}
    if variant is not None and variant not in variants.values():
        raise ValueError(
            f"`variant`={variant!r}: no component of {str(pretrained_model_name_or_path)!r} has weights of this "
            "variant."
        )
    fetch_components(layout, {component: files for component, (files, _) in picked.items()})

    def folder(component: str) -> Path:
        return layout.components[component].root / component

    def load_kwargs(component: str) -> dict:
        return {"variant": variants[component], "use_safetensors": True, **model_kwargs}

    # 2. The experts: from the layout's folders, or built from their configs and filled from the checkpoints.
    experts = {}
    for expert in EXPERTS:
        if expert in passed:
            experts[expert] = passed[expert]
        elif expert not in layout.components:
            experts[expert] = None
        elif from_checkpoints:
            config = BerniniTransformer3DModel.load_config(folder(expert))
            experts[expert] = load_checkpoint_expert(checkpoints[expert], expert, config, dtype, hub)
        else:
            experts[expert] = BerniniTransformer3DModel.from_pretrained(
                folder(expert), torch_dtype=dtype, **load_kwargs(expert)
            )

    # 3. The rest; the VAE always in float32, as upstream.
    vae = passed.get("vae") or AutoencoderKLWan.from_pretrained(
        folder("vae"), torch_dtype=torch.float32, **load_kwargs("vae")
    )
    tokenizer = passed.get("tokenizer") or transformers.AutoTokenizer.from_pretrained(folder("tokenizer"))
    text_encoder = passed.get("text_encoder")
    if text_encoder is None:
        encoder_class = getattr(transformers, layout.text_encoder_class, None)
        if encoder_class is None:
            raise ValueError(
                f"transformers has no text encoder class {layout.text_encoder_class!r} (model_index.json)."
            )
        text_encoder = encoder_class.from_pretrained(
            folder("text_encoder"), dtype=dtype, use_safetensors=True, variant=variants["text_encoder"]
        )
    scheduler = passed.get("scheduler")
    if scheduler is None and "scheduler" in layout.components:
        scheduler = UniPCMultistepScheduler.from_pretrained(folder("scheduler"))
    if scheduler is None:
        from .pipeline_bernini import default_scheduler

        scheduler = default_scheduler()
    if layout.shift is not None and "flow_shift" in scheduler.config:
        # Recorded for reference; each call's `flow_shift` (default 5.0, the official CLI's) is what sampling uses.
        scheduler.register_to_config(flow_shift=layout.shift)

    settings = {k: v for k, v in layout.settings.items() if k in config_names}
    ignored = sorted(set(layout.settings) - set(config_names) - {"expand_timesteps"})
    if ignored:
        logger.info(f"Settings of {pretrained_model_name_or_path} that BerniniPipeline does not take: {ignored}")
    settings.update(overrides)
    if experts["transformer_2"] is None:
        settings["boundary_ratio"] = None
    return cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae,
        scheduler=scheduler,
        transformer=experts["transformer"],
        transformer_2=experts["transformer_2"],
        **settings,
    )


def save_pipeline(pipe, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
    """The body of `BerniniPipeline.save_pretrained`: diffusers' save, the remote-code modules, then the upload."""
    from diffusers import DiffusionPipeline

    from .hub_export.remote_code import add_remote_code

    if kwargs.pop("safe_serialization", True) is False:
        raise ValueError(
            "`safe_serialization`=False is not supported: bernini_diffusers writes and reads safetensors only."
        )
    upload = {k: kwargs.pop(k) for k in ("repo_id", "private", "commit_message", "token", "create_pr") if k in kwargs}
    DiffusionPipeline.save_pretrained(pipe, save_directory, safe_serialization=True, push_to_hub=False, **kwargs)
    add_remote_code(save_directory)
    if push_to_hub:
        from .hub_export.export import push_folder

        # diffusers' default: the folder's name, in the token's namespace
        push_folder(save_directory, upload.pop("repo_id", None) or Path(save_directory).name, **upload)
