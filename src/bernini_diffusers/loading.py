"""`BerniniPipeline.from_pretrained`: find a Bernini-R model's files, locally or on the Hub, and hand them to diffusers.

Three published layouts load (docs/design.md, the loading layouts):

- **diffusers folders**: a `model_index.json` (ours, the exported one, or Wan2.2's `WanPipeline`), or the same
  component folders under a root `config.json` of `model_type: bernini_renderer` (`ByteDance/Bernini-R-Diffusers`,
  `ByteDance/Bernini-R-1.3B-Diffusers`);
- **official config folders** (`configs/bernini_renderer_wan22`): a root `config.json` that names its base in
  `wan22_base` (a repo id or a path) and holds no component folders; the base supplies them;
- **separate checkpoints** (`ByteDance/Bernini-R`: `bernini_renderer_high/`, `bernini_renderer_low/`), given as
  `high_noise_ckpt` / `low_noise_ckpt` on top of a base; see `resolve_checkpoint` for the accepted forms.

This module only resolves files: a Hub repo is fetched as diffusers does (the root files first, then only the files
the layout needs: no weights of an expert that a checkpoint replaces, one variant of each weight file, never a
pickle), and `pipeline_index` reads the folder's root files as a `BerniniPipeline` model index. Every component is
then loaded by `DiffusionPipeline.from_pretrained` itself, so its dtype dicts, `quantization_config`, `device_map`,
variants and per-component logs apply. Only safetensors are loaded.
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

import huggingface_hub
import torch
from diffusers import ModelMixin  # noqa: F401  (looked up here by diffusers' loader, see EXPERT_ENTRY)
from diffusers.utils import logging
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from huggingface_hub import get_cached_repo_tree
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .constants import TINY_MODEL, written_as_path
from .formats import FilePlan, detect_format, load_transformer, plan_file
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
from .transformer_bernini import BerniniTransformer3DModel

logger = logging.get_logger(__name__)

MODEL_FOLDERS = ("transformer", "transformer_2", "vae", "text_encoder")
COMPONENTS = (*MODEL_FOLDERS, "tokenizer", "scheduler")
ROOT_FILES = ("model_index.json", "config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_PATTERNS = [f"*{suffix}" for suffix in PICKLE_SUFFIXES]
HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download")
# Every keyword `DiffusionPipeline.from_pretrained` (diffusers 0.42) reads; they pass through to it.
DIFFUSERS_KWARGS = (
    *HUB_KWARGS,
    "proxies", "dtype", "torch_dtype", "custom_pipeline", "custom_revision", "provider", "sess_options",
    "provider_options", "device_map", "max_memory", "offload_folder", "offload_state_dict", "low_cpu_mem_usage",
    "variant", "use_safetensors", "use_onnx", "load_connected_pipeline", "quantization_config", "use_flashpack",
    "disable_mmap", "trust_remote_code",
)  # fmt: skip
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
DEFAULT_TOKENIZER = "T5Tokenizer"
# diffusers loads a model index entry `[library, class]` as `getattr(library, class)` and picks the loading method from
# the base classes that the same module exposes (`getattr(library, "ModelMixin")`). This module exposes both, so an
# expert entry naming it loads through diffusers' own `ModelMixin.from_pretrained`, whatever class name the folder
# records (`WanTransformer3DModel` in Wan2.2's index, the remote-code module in an export).
EXPERT_ENTRY = [__name__, BerniniTransformer3DModel.__name__]
EXPERT_CLASSES = ("WanTransformer3DModel", BerniniTransformer3DModel.__name__)
# With one dtype for the whole pipeline, the Wan VAE still loads in float32, as upstream; a per-component dict is
# diffusers' own and taken as given (its "default" covers the VAE too, and unnamed components without a default load
# in float32).
DEFAULT_COMPONENT_DTYPES = {"vae": torch.float32}
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


def is_repo_id(name: str | os.PathLike) -> bool:
    """Whether `name` names a Hub repo: not an existing local path, not written as one (`written_as_path`), and a
    valid repo id by huggingface_hub's rules. It says nothing of whether the repo exists."""
    name = str(name)
    if Path(name).exists() or written_as_path(name):
        return False
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
        if not is_repo_id(name):
            raise FileNotFoundError(f"`{argument}`={name!r} is neither a model folder nor a Hub repo id (owner/name).")
        try:
            snapshot = huggingface_hub.snapshot_download(
                name, allow_patterns=list(patterns), ignore_patterns=PICKLE_PATTERNS, **hub
            )
        except (LocalEntryNotFoundError, HfHubHTTPError) as err:
            raise FileNotFoundError(
                f"`{argument}`={name!r} is not a local folder, and the Hub repo could not be read "
                f"({type(err).__name__}: {err})."
            ) from err
        root = Path(snapshot)
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
        hub = {k: v for k, v in self.hub.items() if k != "revision"}
        try:
            huggingface_hub.snapshot_download(self.repo_id, revision=self.commit, allow_patterns=paths, **hub)
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
    if weights:
        return [], None  # safetensors of other variants only: diffusers' loader names the variants it has not found
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


def _read_json(path: Path) -> dict:
    """A JSON file's content; `{}` when there is no such file."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not readable JSON: {err}") from None


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
        index = _read_json(model.root / "model_index.json")
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
    config = _read_json(model.root / "config.json")
    if config.get("model_type") != "bernini_renderer":
        raise ValueError(
            f"{str(model)!r} has a config.json with model_type={config.get('model_type')!r}; expected "
            "'bernini_renderer' (or a model_index.json). The full Bernini planner ('bernini') is not supported."
        )
    settings = root_settings(config)
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
    if path.name.endswith((".safetensors", ".gguf")):
        return CheckpointFiles(str(path), [path])
    raise ValueError(
        f"{where} is not a checkpoint: pass a folder, a .safetensors or .gguf file, or a .safetensors.index.json file."
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
        if written_as_path(spec):  # a path, never a Hub id: no request for a typo
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
        if not inner.endswith((".json", ".gguf")):
            folders = [inner, f"{inner}/{CHECKPOINT_FOLDERS[expert]}".strip("/")]
            patterns = [f"{folder}/*.safetensors.index.json".lstrip("/") for folder in folders]
        repo = ModelFiles.open(repo_id, hub, argument, patterns=patterns)
    if inner.endswith((".json", ".safetensors", ".gguf")):
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
    return _plan_resolved(resolve_checkpoint(spec, expert, hub), expert, config)


def _plan_resolved(
    checkpoint: CheckpointFiles, expert: str, config: Mapping[str, Any]
) -> tuple[ConversionPlan, torch.nn.Module]:
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


def _single_file(checkpoint: CheckpointFiles) -> Path | None:
    """The file of a checkpoint that is one file (any format of `formats`), else None (official shards)."""
    return checkpoint.files[0] if len(checkpoint.files) == 1 and checkpoint.weight_map is None else None


def plan_checkpoint_expert(
    spec: str | os.PathLike, expert: str, config: Mapping[str, Any], hub: Mapping[str, Any] | None = None
) -> tuple[ConversionPlan | FilePlan, torch.nn.Module]:
    """The plan of the checkpoint `load_checkpoint_expert` would read, and the expert on the meta device: a file
    through `formats.plan_file` (any single-file format), official shards through `plan_checkpoint`. Keys and
    shapes are checked against `config` (the base's `transformer*/config.json`) before any weight is read."""
    checkpoint = resolve_checkpoint(spec, expert, hub)
    file = _single_file(checkpoint)
    if file is None:
        return _plan_resolved(checkpoint, expert, config)
    argument = CHECKPOINT_ARGUMENTS[expert]
    plan, model = plan_file(detect_format(file, argument), config, expert, argument)
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
    assigned to the expert; the base's own transformer weights are never read. A checkpoint that is one file is read
    by `formats.load_transformer`, whatever its format (official, Wan, ComfyUI, float8, scaled float8, GGUF).
    """
    checkpoint = resolve_checkpoint(spec, expert, hub)
    if _single_file(checkpoint) is not None:
        return load_transformer(
            _single_file(checkpoint), config, expert=expert, dtype=torch_dtype, argument=CHECKPOINT_ARGUMENTS[expert]
        )
    plan, model = plan_checkpoint(spec, expert, config, hub)
    model = load_expert_weights(plan, model, torch_dtype)
    model.register_to_config(_name_or_path=str(spec))
    return model


# ------------------------------------------------------------------------------------------------ pipeline


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


def _folder_entry(folder: Path, component: str) -> list:
    """The model index entry `[library, class]` of a component folder, from the config it holds."""
    if component in EXPERTS:
        return list(EXPERT_ENTRY)
    if component == "tokenizer":
        config = _read_json(folder / component / "tokenizer_config.json")
        return ["transformers", config.get("tokenizer_class") or DEFAULT_TOKENIZER]
    if component == "text_encoder":
        architectures = _read_json(folder / component / "config.json").get("architectures") or []
        return ["transformers", architectures[0] if architectures else DEFAULT_TEXT_ENCODER]
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return ["diffusers", _read_json(folder / component / name).get("_class_name")]


def root_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The `BerniniPipeline` settings an official root `config.json` gives."""
    settings = {ROOT_CONFIG_KEYS[k]: v for k, v in config.items() if k in ROOT_CONFIG_KEYS}
    if "boundary_ratio" in settings:
        settings["boundary_ratio"] = settings["boundary_ratio"] or None  # 0 means one expert, no switch
    if config.get("skip_transformer_2"):
        settings["boundary_ratio"] = None
    return settings


def pipeline_index(folder: str | os.PathLike, pipeline_class) -> dict[str, Any] | None:
    """The model index that `pipeline_class.from_pretrained` hands to diffusers for a local model folder.

    It is the folder's `model_index.json`, or, for a folder with a root `config.json` of `model_type:
    bernini_renderer` instead, one made from its component folders and settings. Either way the pipeline class is
    `pipeline_class` (never the repo's remote code), the experts load as `BerniniTransformer3DModel` through
    `EXPERT_ENTRY` (a Wan2.2 index names `WanTransformer3DModel`, an export its remote-code module), and settings
    the pipeline does not take are dropped. Returns `None` for anything else.
    """
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        index = _read_json(folder / "model_index.json")
    elif (folder / "config.json").is_file():
        config = _read_json(folder / "config.json")
        if config.get("model_type") != "bernini_renderer":
            return None
        markers = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}
        present = [c for c in COMPONENTS if (folder / c / markers.get(c, "config.json")).is_file()]
        index = {c: _folder_entry(folder, c) for c in present}
        if config.get("skip_transformer_2"):
            index["transformer_2"] = [None, None]
        index.update(root_settings(config))
    else:
        return None
    index["_class_name"] = pipeline_class.__name__
    for expert in EXPERTS:
        entry = index.get(expert)
        if isinstance(entry, list) and entry[0] is not None and entry[1] in EXPERT_CLASSES:
            index[expert] = list(EXPERT_ENTRY)
    settings = pipeline_settings(pipeline_class)
    ignored = [k for k, v in index.items() if not k.startswith("_") and not isinstance(v, list) and k not in settings]
    if ignored:
        logger.info(f"Settings of {folder} that {pipeline_class.__name__} does not take: {sorted(ignored)}")
    return {k: v for k, v in index.items() if k not in ignored}


def component_dtypes(dtype: Any, argument: str = "dtype") -> dict[str, torch.dtype | None]:
    """`dtype` as diffusers' per-component dict (`{"default": ..., "<component>": ...}`): one dtype (or None) becomes
    `{"default": dtype}` with `DEFAULT_COMPONENT_DTYPES` (the float32 VAE); a dict is diffusers' and taken as given."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return {**DEFAULT_COMPONENT_DTYPES, "default": dtype}
    if not isinstance(dtype, Mapping) or not all(isinstance(v, torch.dtype) for v in dtype.values()):
        raise ValueError(
            f"`{argument}`={dtype!r} is neither a torch.dtype nor a dict of them per component; pass e.g. "
            "torch.bfloat16 or {'default': torch.bfloat16, 'vae': torch.float32}."
        )
    return dict(dtype)


def _quantizes(quantization_config: Any, component: str) -> bool:
    """Whether diffusers' `PipelineQuantizationConfig` quantizes `component` (its own rule: a `quant_mapping` names
    the components; otherwise `components_to_quantize`, all of them when empty)."""
    mapping = getattr(quantization_config, "quant_mapping", None)
    if mapping is not None:
        return component in mapping
    wanted = getattr(quantization_config, "components_to_quantize", None)
    return not wanted or component in wanted


@dataclass
class PreparedLoad:
    """What `BerniniPipeline.from_pretrained` hands to `DiffusionPipeline.from_pretrained`."""

    folder: Path  # a local diffusers folder (a Hub repo's snapshot): `pipeline_index` reads it
    kwargs: dict[str, Any]  # diffusers' keywords, with the ready-made experts of checkpoints and the layout's settings
    shift: float | None  # the root config's `shift`, recorded on the scheduler
    has_scheduler: bool  # False: the folder has no scheduler and none was passed
    # `build_experts=False` (low_ram): the checkpoints left unread, expert -> (spec, config, dtype), and the Hub options
    checkpoints: dict[str, tuple[Any, Mapping[str, Any], torch.dtype]] = field(default_factory=dict)
    hub: dict[str, Any] = field(default_factory=dict)


def prepare_load(
    pipeline_class, pretrained_model_name_or_path: str | os.PathLike, kwargs: dict, build_experts: bool = True
) -> PreparedLoad:
    """Resolve the layout of `pretrained_model_name_or_path`, fetch the files it needs, and build the experts of
    original checkpoints; see `BerniniPipeline.from_pretrained`. With `build_experts=False` no checkpoint is read:
    they are returned in `PreparedLoad.checkpoints` for the caller to load (the `low_ram` profile)."""
    kwargs = dict(kwargs)
    name = pretrained_model_name_or_path
    signature = [p for p in inspect.signature(pipeline_class.__init__).parameters if p != "self"]
    accepted = {*DIFFUSERS_KWARGS, *signature, *CHECKPOINT_ARGUMENTS.values()}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"{pipeline_class.__name__}.from_pretrained got unexpected arguments: {unknown}. It accepts the "
            f"components and settings {signature}, `high_noise_ckpt`, `low_noise_ckpt` and the keywords of "
            "`DiffusionPipeline.from_pretrained`."
        )
    if kwargs.get("use_safetensors", True) is False:
        raise ValueError("`use_safetensors`=False is not supported: bernini_diffusers loads safetensors only.")
    kwargs["use_safetensors"] = True
    if "dtype" in kwargs and "torch_dtype" in kwargs:
        raise ValueError("`dtype` and `torch_dtype` were both given; pass `dtype` (diffusers deprecates the other).")
    dtype_argument = "torch_dtype" if "torch_dtype" in kwargs else "dtype"
    dtypes = kwargs[dtype_argument] = component_dtypes(kwargs.get(dtype_argument), dtype_argument)
    checkpoints = {expert: kwargs.pop(argument, None) for expert, argument in CHECKPOINT_ARGUMENTS.items()}
    if checkpoints["transformer"] is None and checkpoints["transformer_2"] is not None:
        raise ValueError(
            f"`low_noise_ckpt`={checkpoints['transformer_2']!r} was given without `high_noise_ckpt`; the two expert "
            "checkpoints go together (a one-expert model such as the 1.3B takes `high_noise_ckpt` alone)."
        )
    from_checkpoints = checkpoints["transformer"] is not None
    _check_device_map(kwargs.get("device_map"))
    if from_checkpoints:
        _check_checkpoint_options(kwargs)
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}  # they resolve the files; diffusers gets a folder
    if str(name) == TINY_MODEL and not Path(name).exists():
        raise FileNotFoundError(
            f"`pretrained_model_name_or_path`={TINY_MODEL!r} is the tiny random model, which is built in code, not "
            "loaded: use `bernini_diffusers.tiny.tiny_pipeline()` in Python or `bernini generate --model tiny`."
        )

    layout = resolve_layout(name, hub)
    roots = {id(model): model for model in layout.components.values()}
    if len(roots) > 1:
        raise ValueError(
            f"{str(name)!r} holds component folders of its own and names a base in `wan22_base`; keep the components "
            "in one folder (the base, or a diffusers folder without `wan22_base`)."
        )
    two_experts = "transformer_2" in layout.components
    if from_checkpoints and two_experts and checkpoints["transformer_2"] is None:
        raise ValueError(
            f"`high_noise_ckpt` and `low_noise_ckpt` must be given together for {str(name)!r}, which has two "
            f"experts; got only `high_noise_ckpt`={checkpoints['transformer']!r}."
        )
    if from_checkpoints and not two_experts and checkpoints["transformer_2"] is not None:
        raise ValueError(
            f"`low_noise_ckpt`={checkpoints['transformer_2']!r}: {str(name)!r} has one expert (no `transformer_2`); "
            "pass its checkpoint as `high_noise_ckpt` alone."
        )
    present = (*layout.components, *kwargs)
    # One expert may be absent: a saved `transformer=None` pipeline (the low-noise expert for every step) has only
    # `transformer_2/`, as in diffusers' Wan 2.2.
    experts = () if "transformer" in present or "transformer_2" in present else ("transformer",)
    missing = [c for c in (*experts, "vae", "text_encoder", "tokenizer") if c not in present]
    if missing:
        folders = ", ".join(f"`{c}/`" for c in missing)
        raise ValueError(f"{str(name)!r} has no {folders} folder; pass the component or a base.")

    # Fetch what diffusers will read, one download per repo: configs, one variant of each weight file, small folders
    # (and check that no weights are pickles only). No expert weights of the base when checkpoints replace them.
    variant = kwargs.get("variant")
    picked = {
        component: component_files(model, component, variant, not (from_checkpoints and component in EXPERTS))[0]
        for component, model in layout.components.items()
        if component not in kwargs
    }
    fetch_components(layout, picked)
    if not roots:
        raise ValueError(f"{str(name)!r} has no component folders for diffusers to read; pass a diffusers folder.")
    (model,) = roots.values()
    unread = {}
    for expert in [e for e in EXPERTS if checkpoints[e] is not None]:
        expert_dtype = dtypes.get(expert, dtypes.get("default", torch.float32))  # diffusers' rule
        config = BerniniTransformer3DModel.load_config(model.root / expert)
        if not build_experts:
            unread[expert] = (checkpoints[expert], config, expert_dtype)
            continue
        kwargs[expert] = load_checkpoint_expert(checkpoints[expert], expert, config, expert_dtype, hub)
        if kwargs.get("device_map") is not None:
            kwargs[expert].to(kwargs["device_map"])

    if layout.base is not None:  # an official config folder: its settings win over its base's index
        settings = pipeline_settings(pipeline_class)
        for key, value in layout.settings.items():
            if key in settings:
                kwargs.setdefault(key, value)
    if "transformer_2" not in layout.components:
        kwargs.setdefault("transformer_2", None)  # e.g. `skip_transformer_2` over a two-expert base
    if kwargs.get("transformer_2", False) is None:
        kwargs["boundary_ratio"] = None  # one expert: no switch
    return PreparedLoad(
        folder=model.root,
        kwargs=kwargs,
        shift=layout.shift,
        has_scheduler="scheduler" in layout.components or "scheduler" in kwargs,
        checkpoints=unread,
        hub=hub,
    )


def _check_device_map(device_map: Any) -> None:
    """Refuse a one-device `device_map` naming a device this machine lacks, before any weight is read (torch's own
    error comes after a checkpoint has been read, as an AssertionError)."""
    if not isinstance(device_map, (str, int, torch.device)) or device_map in ("balanced", "auto"):
        return  # a dict, or a strategy that diffusers resolves with the devices present
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"`device_map`={device_map!r} is neither a device (cpu, cuda, cuda:N) nor 'balanced'."
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ValueError(
                f"`device_map`={device_map!r}: this machine has {count} CUDA device(s); use device_map='cpu' or "
                "leave it unset."
            )
    elif device.type not in ("cpu", "meta"):
        module = getattr(torch, device.type, None)
        if module is None or not getattr(module, "is_available", lambda: False)():
            raise ValueError(f"`device_map`={device_map!r}: no {device.type} device is available here.")


def _check_checkpoint_options(kwargs: Mapping[str, Any]) -> None:
    """Refuse the options that diffusers applies while it reads weights, for experts read from original checkpoints."""
    quantization_config = kwargs.get("quantization_config")
    if quantization_config is not None and any(_quantizes(quantization_config, e) for e in EXPERTS):
        raise ValueError(
            "`quantization_config` quantizes the experts while diffusers reads their weights, but "
            "`high_noise_ckpt`/`low_noise_ckpt` are read by bernini_diffusers: export them first (`bernini export`) "
            "and load the export with `quantization_config`."
        )
    if kwargs.get("device_map") == "balanced":
        raise ValueError(
            "`device_map`='balanced' places components while diffusers reads their weights; with "
            "`high_noise_ckpt`/`low_noise_ckpt` pass one device (e.g. 'cuda'), or load an export (`bernini export`)."
        )


def finish_load(pipe, prepared: PreparedLoad, pretrained_model_name_or_path: str | os.PathLike) -> None:
    """What diffusers does not know about a Bernini layout: the name it was loaded by and the root config's shift."""
    pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
    if prepared.shift is not None and "flow_shift" in pipe.scheduler.config:
        # Recorded for reference; each call's `flow_shift` (default 5.0, the official CLI's) is what sampling uses.
        pipe.scheduler.register_to_config(flow_shift=prepared.shift)


# ------------------------------------------------------------------------------------------------ saving


def upload_saved(
    pipe,
    folder: str | os.PathLike,
    repo_id: str | None = None,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
):
    """Upload a folder that `pipe.save_pretrained` has written, the way diffusers' `save_pretrained(push_to_hub=True)`
    does (it uploads before the remote-code modules could be added, so the steps run here, after them): create the
    repo (default: the folder's name in the token's namespace), write diffusers' model card, upload the folder."""
    repo = huggingface_hub.create_repo(repo_id or Path(folder).name, exist_ok=True, private=private, token=token)
    repo_id = repo.repo_id
    card = populate_model_card(load_or_create_model_card(repo_id, token=token, is_pipeline=True))
    card.save(str(Path(folder) / "README.md"))
    return pipe._upload_folder(str(folder), repo_id, token=token, commit_message=commit_message, create_pr=create_pr)
