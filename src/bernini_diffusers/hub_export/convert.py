"""Original Bernini-R expert checkpoints -> diffusers expert weights.

The original renderer checkpoints (`ByteDance/Bernini-R`: `bernini_renderer_high/`, `bernini_renderer_low/`) are
sharded safetensors whose keys carry the training wrapper's prefix: `ema.diff_dec.transformer.*` (the EMA copy, the
weights to use) next to `diff_dec.transformer.*` (the raw twin). Stripped of the prefix they are exactly the keys of
`WanTransformer3DModel`. The conversion is the table `KEY_PREFIXES`; everything else here reads headers, checks the
key set and the shapes against the expert's config, and moves tensors one at a time:

- `read_checkpoint` lists the tensors of a set of files (headers only);
- `plan_conversion` maps them onto the expert's keys and verifies names, shapes and dtypes;
- `load_expert_weights` builds the expert on the meta device and assigns the converted tensors;
- `write_expert_shards` streams the converted tensors into diffusers' sharded layout, one tensor in memory at a time.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub import split_state_dict_into_shards_factory
from huggingface_hub.utils import tqdm
from safetensors import SafetensorError, safe_open

from ..transformer_bernini import BerniniTransformer3DModel

EXPERTS = ("transformer", "transformer_2")
EXPERT_NAMES = {"transformer": "high-noise", "transformer_2": "low-noise"}

# Source key prefixes of each expert, best first. A key takes the first prefix it starts with; when several source
# keys become the same model key, the earliest prefix wins, so the EMA copy beats its raw twin, which beats a plain
# `transformer.` key. The empty prefix takes bare (already diffusers) keys.
KEY_PREFIXES: dict[str, tuple[str, ...]] = {
    "transformer": ("ema.diff_dec.transformer.", "diff_dec.transformer.", "transformer.", ""),
    "transformer_2": ("ema.diff_dec.transformer_2.", "diff_dec.transformer_2.", "transformer_2.", "transformer.", ""),
}

# safetensors' dtype names <-> torch dtypes (the float and integer types a transformer checkpoint can hold).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_SAFETENSORS = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"  # diffusers' shard names
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "10GB"  # diffusers' `ModelMixin.save_pretrained` default


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a checkpoint file, as its header describes it."""

    file: Path
    key: str
    dtype: str  # safetensors' name, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]


@dataclass
class ConversionPlan:
    """The source tensor of every key of one expert, in reading order (file by file), with what was left out."""

    expert: str
    checkpoint: str
    tensors: dict[str, SourceTensor]
    keep_in_fp32: tuple[str, ...] = ()  # module names a `dtype` cast leaves alone (the model's _keep_in_fp32_modules)
    used_prefixes: Counter = field(default_factory=Counter)
    superseded: Counter = field(default_factory=Counter)  # prefix -> twins dropped for a better copy

    def describe(self) -> str:
        used = ", ".join(f"{n} from {p or 'bare keys'!r}" for p, n in self.used_prefixes.most_common())
        dropped = ", ".join(f"{n} from {p!r}" for p, n in self.superseded.most_common())
        return f"{self.expert}: {len(self.tensors)} tensors ({used})" + (
            f"; skipped twins: {dropped}" if dropped else ""
        )


def sample_names(names: Iterable[str], count: int = 4) -> str:
    """The first `count` of `names` in sorted order, and how many more there are: for error messages."""
    names = sorted(names)
    shown = ", ".join(names[:count])
    return shown + (f", ... ({len(names) - count} more)" if len(names) > count else "")


def convert_key(key: str, expert: str) -> tuple[str, int]:
    """The model key of a source key and the rank of the prefix it matched (0 is the preferred EMA copy)."""
    for rank, prefix in enumerate(KEY_PREFIXES[expert]):
        if key.startswith(prefix):
            return key[len(prefix) :], rank
    raise AssertionError("the empty prefix matches every key")


def original_key(model_key: str, expert: str, ema: bool = True) -> str:
    """The key the original checkpoint stores `model_key` under: the EMA copy, or its raw twin with `ema=False`."""
    return KEY_PREFIXES[expert][0 if ema else 1] + model_key


# ------------------------------------------------------------------------------------------------ reading


def _open_error(file: Path, err: Exception) -> ValueError:
    return ValueError(f"{str(file)!r} is not a readable safetensors file ({err}); it may be truncated or corrupt.")


def read_header(file: Path) -> dict[str, SourceTensor]:
    """The tensors of one safetensors file, from its header (`safe_open` checks the data covers every tensor)."""
    if not file.is_file():
        raise FileNotFoundError(f"Checkpoint shard {str(file)!r} does not exist.")
    try:
        with safe_open(str(file), framework="pt") as handle:
            out = {}
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                out[key] = SourceTensor(file, key, tensor_slice.get_dtype(), tuple(tensor_slice.get_shape()))
            return out
    except SafetensorError as err:
        raise _open_error(file, err) from None


def read_index(index_file: Path) -> dict[str, str]:
    """The key -> shard file map of an `*.safetensors.index.json`."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"`weight_map` is a {type(weight_map).__name__}")
        return weight_map
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"{str(index_file)!r} is not a safetensors index (a JSON object with `weight_map`): {err}"
        ) from None


def index_shards(index_file: Path, weight_map: dict[str, str] | None = None) -> tuple[list[Path], dict[str, str]]:
    """The shard files an `*.safetensors.index.json` names (each must exist) and its key -> file map (`weight_map`,
    when the caller has read it already)."""
    weight_map = read_index(index_file) if weight_map is None else weight_map
    shards = [index_file.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} shard(s) named by {str(index_file)!r} are missing: {sample_names(missing)}."
        )
    return shards, weight_map


def read_checkpoint(files: list[Path], weight_map: Mapping[str, str] | None = None) -> dict[str, SourceTensor]:
    """Every tensor of a checkpoint split over `files`, in file order; `weight_map` (from an index) must agree."""
    tensors: dict[str, SourceTensor] = {}
    for file in files:
        for key, info in read_header(file).items():
            if key in tensors:
                raise ValueError(f"Tensor {key!r} is stored twice: in {str(tensors[key].file)!r} and {str(file)!r}.")
            tensors[key] = info
    if weight_map is not None:
        misplaced = [k for k, f in weight_map.items() if k not in tensors or tensors[k].file.name != f]
        unlisted = set(tensors) - set(weight_map)
        parts = []
        if misplaced:
            parts.append(f"{len(misplaced)} key(s) not in the shard it names ({sample_names(misplaced)})")
        if unlisted:
            parts.append(f"{len(unlisted)} key(s) not in the index ({sample_names(unlisted)})")
        if parts:
            raise ValueError(f"The index of {str(files[0].parent)!r} disagrees with its shards: {'; '.join(parts)}.")
    return tensors


# ------------------------------------------------------------------------------------------------ planning


def expert_skeleton(config: Mapping):
    """The expert of `config` with its parameters on the meta device (no weight memory); buffers are real."""
    with init_empty_weights():  # parameters only: RoPE tables are non-persistent buffers the checkpoint lacks
        model = BerniniTransformer3DModel.from_config(dict(config))
    return model


def expected_tensors(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}


def plan_conversion(
    source: Mapping[str, SourceTensor],
    expert: str,
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    checkpoint: str,
    keep_in_fp32: Iterable[str] = (),
) -> ConversionPlan:
    """Map a checkpoint's tensors onto the keys of `expert` and verify the key set, every shape and every dtype.

    Raises a `ValueError` naming the checkpoint and a few offending keys when the key sets differ (missing or
    unexpected keys), a shape differs from the config's, or a tensor is not floating point where the model's is.
    """
    chosen: dict[str, tuple[int, SourceTensor]] = {}
    superseded: Counter = Counter()
    prefixes = KEY_PREFIXES[expert]
    for key, info in source.items():
        model_key, rank = convert_key(key, expert)
        best = chosen.get(model_key)
        if best is None or rank < best[0]:
            if best is not None:
                superseded[prefixes[best[0]]] += 1
            chosen[model_key] = (rank, info)
        elif rank == best[0]:
            raise ValueError(
                f"`{checkpoint}`: {key!r} and {best[1].key!r} both give {expert} key {model_key!r}; keep one of them."
            )
        else:
            superseded[prefixes[rank]] += 1

    missing = set(expected) - set(chosen)
    unexpected = {chosen[k][1].key for k in set(chosen) - set(expected)}
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {sample_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {sample_names(unexpected)}")
        other = [e for e in EXPERTS if e != expert][0]
        hint = ""
        if any(k.startswith(KEY_PREFIXES[other][:2]) for k in unexpected):  # its EMA copies or their raw twins
            hint = (
                f" The unexpected keys belong to the {EXPERT_NAMES[other]} expert (`{other}`): were the high- and "
                "low-noise checkpoints swapped?"
            )
        raise ValueError(
            f"`{checkpoint}` does not match the {EXPERT_NAMES[expert]} expert (`{expert}`) of the base config: "
            + "; ".join(parts)
            + "."
            + hint
        )

    wrong = []
    for model_key, (shape, model_dtype) in expected.items():
        info = chosen[model_key][1]
        if info.dtype not in SAFETENSORS_DTYPES:
            wrong.append(f"{info.key}: dtype {info.dtype} is not supported")
        elif info.shape != shape:
            wrong.append(f"{info.key}: shape {list(info.shape)}, the config expects {list(shape)}")
        elif info.torch_dtype.is_floating_point != model_dtype.is_floating_point:
            wrong.append(f"{info.key}: dtype {info.dtype}, the model holds {model_dtype}")
    if wrong:
        raise ValueError(
            f"`{checkpoint}` has {len(wrong)} tensor(s) that do not fit the {expert} config: {'; '.join(wrong[:4])}"
            + (f"; ... ({len(wrong) - 4} more)" if len(wrong) > 4 else "")
            + "."
        )

    order = {file: i for i, file in enumerate(dict.fromkeys(info.file for _, info in chosen.values()))}
    ordered = sorted(chosen.items(), key=lambda item: (order[item[1][1].file], item[0]))
    return ConversionPlan(
        expert=expert,
        checkpoint=checkpoint,
        tensors={k: info for k, (_, info) in ordered},
        keep_in_fp32=tuple(keep_in_fp32),
        used_prefixes=Counter(prefixes[rank] for rank, _ in chosen.values()),
        superseded=superseded,
    )


# ------------------------------------------------------------------------------------------------ loading


def _kept_in_fp32(name: str, keep_in_fp32: Iterable[str]) -> bool:
    """Whether tensor `name` belongs to one of the `_keep_in_fp32_modules` (matched on whole name parts, as diffusers
    matches them)."""
    return not set(keep_in_fp32).isdisjoint(name.split("."))


def load_dtype(name: str, tensor_dtype: torch.dtype, torch_dtype: torch.dtype | None, keep_in_fp32: Iterable[str]):
    """The dtype `ModelMixin.from_pretrained(torch_dtype=...)` gives a tensor: float32 without `torch_dtype` (the
    model's own), float32 for `_keep_in_fp32_modules`, else `torch_dtype`; integer tensors keep theirs."""
    if not tensor_dtype.is_floating_point:
        return tensor_dtype
    if torch_dtype is None or _kept_in_fp32(name, keep_in_fp32):
        return torch.float32
    return torch_dtype


def _by_file(items: Iterable[tuple]):
    """Consecutive runs of items (`(name, SourceTensor, ...)`) whose tensors are in the same file: each run is read
    with one open handle."""
    return itertools.groupby(items, key=lambda item: item[1].file)


def load_expert_weights(plan: ConversionPlan, model: torch.nn.Module, torch_dtype: torch.dtype | None = None):
    """Assign the planned tensors to `model` (built by `expert_skeleton`), cast as `from_pretrained` would."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    state = {}
    for file, items in _by_file(plan.tensors.items()):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for model_key, info in items:
                    tensor = handle.get_tensor(info.key)
                    state[model_key] = tensor.to(load_dtype(model_key, tensor.dtype, torch_dtype, keep))
        except SafetensorError as err:
            raise _open_error(file, err) from None
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------ writing


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _write_safetensors(path: Path, entries: list[tuple[str, SourceTensor, torch.dtype]], progress=None) -> None:
    """Write one safetensors file tensor by tensor: the header first (names, dtypes, shapes, offsets known from the
    plan), then each tensor's bytes, so no more than one tensor is in memory. `safe_open` reads it back later."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, info, dtype in entries:
        size = _nbytes(info.shape, dtype)
        header[name] = {
            "dtype": TORCH_TO_SAFETENSORS[dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for file, items in _by_file(entries):
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for _, info, dtype in items:
                        tensor = handle.get_tensor(info.key).to(dtype)
                        # (..) -> (numel,) -> (numel * itemsize,) bytes, without a copy
                        out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                        if progress is not None:
                            progress.update(tensor.numel() * tensor.element_size())
                        del tensor
            except SafetensorError as err:
                raise _open_error(file, err) from None


def output_dtypes(plan: ConversionPlan, dtype: torch.dtype | None = None) -> dict[str, torch.dtype]:
    """The dtype each tensor of `plan` is written in: `dtype` for floating tensors when given, else the checkpoint's
    own. Modules the model keeps in float32 keep the checkpoint's precision, so loading the export with `torch_dtype`
    equals loading the original checkpoint with it."""
    return {
        name: info.torch_dtype
        if dtype is None or not info.torch_dtype.is_floating_point or _kept_in_fp32(name, plan.keep_in_fp32)
        else dtype
        for name, info in plan.tensors.items()
    }


def shard_layout(plan: ConversionPlan, max_shard_size: int | str, dtypes: Mapping[str, torch.dtype]):
    """How the converted tensors, written in `dtypes`, split into diffusers-named shards (huggingface_hub's greedy
    split, in plan order)."""
    sizes = {name: _nbytes(info.shape, dtypes[name]) for name, info in plan.tensors.items()}
    return split_state_dict_into_shards_factory(
        sizes, get_storage_size=lambda size: size, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size
    )


def write_expert_shards(
    plan: ConversionPlan,
    folder: str | os.PathLike,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Write the converted expert into `folder` as diffusers does: `diffusion_pytorch_model-0000i-of-0000N.safetensors`
    plus `diffusion_pytorch_model.safetensors.index.json` (one file without an index when it fits one shard).

    Source shards are read in order and each output shard is written as its tensors arrive, so memory holds one
    tensor (plus the pages of the source file being read), never the model. Returns the files written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtypes = output_dtypes(plan, dtype)
    split = shard_layout(plan, max_shard_size, dtypes)
    written = []
    with tqdm(
        total=split.metadata["total_size"], unit="B", unit_scale=True, unit_divisor=1024, desc=f"Writing {plan.expert}"
    ) as progress:
        for index, (filename, names) in enumerate(split.filename_to_tensors.items(), start=1):
            progress.set_postfix_str(f"shard {index}/{len(split.filename_to_tensors)}", refresh=False)
            entries = [(name, plan.tensors[name], dtypes[name]) for name in names]
            _write_safetensors(folder / filename, entries, progress)
            written.append(folder / filename)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(folder / WEIGHTS_INDEX_NAME)
    return written


def verify_written(plan: ConversionPlan, folder: Path, dtype: torch.dtype | None = None) -> None:
    """Read back what `write_expert_shards` wrote and check every name, shape and dtype against the plan."""
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        files, weight_map = index_shards(index)
    else:
        files, weight_map = [folder / WEIGHTS_PATTERN.format(suffix="")], None
    written = read_checkpoint(files, weight_map)
    dtypes = output_dtypes(plan, dtype)
    expected = {name: (info.shape, TORCH_TO_SAFETENSORS[dtypes[name]]) for name, info in plan.tensors.items()}
    got = {name: (info.shape, info.dtype) for name, info in written.items()}
    if got != expected:
        bad = {k for k in set(got) | set(expected) if got.get(k) != expected.get(k)}
        raise ValueError(
            f"The {plan.expert} shards written to {str(folder)!r} differ from the plan: {sample_names(bad)}."
        )
