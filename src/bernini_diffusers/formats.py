"""Single-file expert checkpoints: what a file is, read from the file itself, and how its weights become an expert.

The files people have (docs/checkpoints.md) differ in three ways, each recognised from the file, never its name:

- **container**: safetensors (read with `safe_open`: header first, one tensor at a time) or GGUF (read with the
  `gguf` package); pickles (`.bin`, `.pt`, `.ckpt`, ...) are refused unopened, since unpickling runs code;
- **key layout**: the official renderer's (`ema.diff_dec.transformer.*`, converted by `hub_export/convert.py`'s
  table), Wan's original names (`self_attn.q`, `head.head`, ...; with ComfyUI's `model.diffusion_model.` prefix or
  without), or diffusers' own (`attn1.to_q`, ...). Wan names become diffusers names through diffusers' own
  `convert_wan_transformer_to_diffusers`;
- **storage**: float32/float16/bfloat16; plain float8 (e4m3fn, e5m2); scaled float8 in ComfyUI's current format
  (`<layer>.comfy_quant` + `<layer>.weight_scale`) or its older one (a `scaled_fp8` marker + `<layer>.scale_weight`);
  GGUF block quantizations (kept quantized by diffusers' `GGUFQuantizationConfig`).

Scaled float8 is dequantized while it is read: `float32(weight) * float32(scale)`, rounded once to the load dtype,
which is what ComfyUI's own dequantization computes (`TensorCoreFP8Layout`: `qdata.to(dtype) * scale`, per-tensor
float32 scale). A loader that ignored the scales (diffusers' `from_single_file` does: it reports them as unused and
upcasts the float8 values) yields weights off by the scale factor; no such loader is on this module's path: only
GGUF files, whose tensors carry no side scales, go through diffusers' single-file machinery. Quantizations this
module does not implement (nvfp4, mxfp8, int8 variants, any other `comfy_quant` format, optimum-quanto) are refused
naming the format and a layer, never read as plain weights.

`detect_format` reads only headers (and the few bytes of `comfy_quant` markers); `CheckpointFormat` gives the byte
counts a memory plan needs. `plan_file` maps a file onto an expert's keys, checked against its config (a `FilePlan`:
the stored tensor and scale of each key), which `load_transformer` reads whole and the sharded loader by rows
(`FileRows`). `load_transformer` builds the expert; `BerniniTransformer3DModel.from_single_file` is it, with
diffusers' signature.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import tempfile
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import gguf
import huggingface_hub
import numpy as np
import torch
from diffusers import GGUFQuantizationConfig
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from diffusers.models.model_loading_utils import load_gguf_checkpoint
from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter, dequantize_gguf_tensor
from safetensors import SafetensorError, safe_open

from .constants import WAN21_T2V_1_3B_TRANSFORMER_CONFIG, WAN22_A14B_TRANSFORMER_CONFIG
from .hub_export.convert import (
    EXPERTS,
    KEY_PREFIXES,
    SAFETENSORS_DTYPES,
    SourceTensor,
    expected_tensors,
    expert_skeleton,
    index_shards,
    load_dtype,
    load_expert_weights,
    plan_conversion,
    sample_names,
)
from .transformer_bernini import BerniniTransformer3DModel

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
GGUF_MAGIC = b"GGUF"
# Bytes per element of safetensors' dtype names (float8 included, which `convert.SAFETENSORS_DTYPES` leaves out).
SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}  # fmt: skip
FLOAT8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
FLOAT_DTYPES = {**{k: v for k, v in SAFETENSORS_DTYPES.items() if v.is_floating_point}, **FLOAT8_DTYPES}
# ComfyUI's `comfy_quant` formats this module dequantizes (per-tensor float32 `weight_scale`).
COMFY_FLOAT8_FORMATS = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
COMFY_PREFIX = "model.diffusion_model."
# GGUF storage types that need no quantizer (plain floats); diffusers dequantizes the others it lists.
GGUF_PLAIN_TYPES = ("F32", "F16")
GGUF_SUPPORTED_TYPES = (*GGUF_PLAIN_TYPES, *(t.name for t in SUPPORTED_GGUF_QUANT_TYPES))
# city96's GGUF converter stores tensors of more than 4 dims flattened, with their shape in this metadata key.
GGUF_ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."

# Key markers of each layout (after ComfyUI's prefix is stripped).
# The official renderer keys, and the `transformer.`/`transformer_2.`-prefixed form the official conversion accepts too.
_OFFICIAL_RE = re.compile(r"^(?:(?:ema\.)?diff_dec\.)?transformer(_2)?\.")
_WAN_MARKERS = (".self_attn.", ".cross_attn.", "head.head.", "text_embedding.", "time_embedding.")
_DIFFUSERS_MARKERS = (".attn1.", ".attn2.", "proj_out.", "condition_embedder.")
# Side tensors of the scaled formats and of formats this module refuses (suffixes of a layer's name).
_QUANTO_SUFFIXES = ("._data", "._scale", ".input_scale", ".output_scale")

# The configs recognised from a file's shapes when `config` is not given: (name, config).
KNOWN_CONFIGS = (
    ("Wan2.2-T2V-A14B expert (Bernini-R 14B)", WAN22_A14B_TRANSFORMER_CONFIG),
    ("Wan2.1-T2V-1.3B (Bernini-R 1.3B)", WAN21_T2V_1_3B_TRANSFORMER_CONFIG),
)


def bits_per_weight(storage: str) -> float:
    """Bits one weight takes in storage type `storage`: a safetensors dtype name (`BF16`, `F8_E4M3`) or a GGUF type
    name (`Q4_K`: 4.5, `Q8_0`: 8.5, the block scales included)."""
    if storage in SAFETENSORS_ITEMSIZE:
        return SAFETENSORS_ITEMSIZE[storage] * 8.0
    quant = gguf.GGMLQuantizationType[storage]
    block_size, type_size = gguf.GGML_QUANT_SIZES[quant]
    return type_size * 8.0 / block_size


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: where it is, its storage type (safetensors dtype or GGUF type name) and logical shape."""

    file: Path
    key: str
    storage: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n


@dataclass
class CheckpointFormat:
    """What a checkpoint is, read from its files (see `detect_format`).

    Attributes:
        path: what was given.
        files: the files that hold the tensors (one, or the shards of an index or folder).
        container: `"safetensors"` or `"gguf"`.
        layout: `"official"` (renderer checkpoint), `"wan"` (Wan's original names), `"comfyui"` (Wan names under
            `model.diffusion_model.`) or `"diffusers"`.
        quantization: `"none"`, `"float8"` (plain), `"scaled_float8"` (ComfyUI `comfy_quant`),
            `"scaled_float8_legacy"` (`scaled_fp8` marker + `scale_weight`) or `"gguf"`.
        weights: the model tensors by source key (side tensors excluded).
        scales: source weight key -> its scale tensor.
        side: source keys read for their meaning only (markers, `comfy_quant`, activation scales).
        experts: the experts an official checkpoint holds (`("transformer",)`, ...); empty for other layouts.
        float8_dtype: the float8 type of a scaled file's weights.
    """

    path: str
    files: tuple[Path, ...]
    container: str
    layout: str
    quantization: str
    weights: dict[str, TensorEntry] = field(repr=False)
    scales: dict[str, TensorEntry] = field(default_factory=dict, repr=False)
    side: tuple[str, ...] = ()
    experts: tuple[str, ...] = ()
    float8_dtype: str | None = None
    gguf_orig_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @property
    def storage(self) -> Counter:
        """Parameters (elements) per storage type, e.g. `{"Q4_K": 13.2e9, "F32": 0.1e9}`."""
        counts: Counter = Counter()
        for entry in self.weights.values():
            counts[entry.storage] += entry.numel
        return counts

    @property
    def parameters(self) -> int:
        """Elements of the model tensors (what the expert holds once loaded)."""
        return sum(entry.numel for entry in self.weights.values())

    @property
    def tensor_bytes(self) -> int:
        """Bytes of the model tensors as stored, with their scales (markers excluded)."""
        return sum(e.nbytes for e in self.weights.values()) + sum(s.nbytes for s in self.scales.values())

    @property
    def bytes_per_parameter(self) -> float:
        """Stored bytes per parameter: 2.0 for bf16, about 1.0 for float8, 0.56 for Q4_K-mostly GGUF, ..."""
        return self.tensor_bytes / max(self.parameters, 1)

    @property
    def main_storage(self) -> str:
        """The storage type of most parameters."""
        return self.storage.most_common(1)[0][0]

    def loaded_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes the expert's weights take in memory after `load_transformer(..., dtype=dtype)`: GGUF quantized
        tensors stay as stored (their plain tensors take the dtype); every other format is expanded to `dtype`
        (float32 when None), float8 included (it is cast back to float8 by the `fp8` memory profile, if chosen)."""
        itemsize = (dtype or torch.float32).itemsize
        if self.container == "gguf":
            plain = sum(e.numel for e in self.weights.values() if e.storage in GGUF_PLAIN_TYPES)
            quantized = sum(e.nbytes for e in self.weights.values() if e.storage not in GGUF_PLAIN_TYPES)
            return quantized + plain * itemsize
        return self.parameters * itemsize

    @property
    def name(self) -> str:
        """A readable name, e.g. "ComfyUI scaled float8 (comfy_quant, F8_E4M3), Wan keys"."""
        layouts = {
            "official": "official renderer keys (ema.diff_dec.transformer)",
            "wan": "Wan keys",
            "comfyui": "Wan keys under ComfyUI's model.diffusion_model.",
            "diffusers": "diffusers keys",
        }
        kinds = {
            "none": f"{self.main_storage} weights",
            "float8": f"plain float8 ({self.main_storage}, no scales)",
            "scaled_float8": f"ComfyUI scaled float8 (comfy_quant + weight_scale, {self.float8_dtype})",
            "scaled_float8_legacy": (
                f"scaled float8, older format (scaled_fp8 marker + scale_weight, {self.float8_dtype})"
            ),
            "gguf": "GGUF " + ", ".join(f"{t} x{n}" for t, n in self._tensor_types().most_common()),
        }
        return f"{kinds[self.quantization]}, {layouts[self.layout]}"

    def _tensor_types(self) -> Counter:
        return Counter(entry.storage for entry in self.weights.values())

    def describe(self) -> str:
        """The one log line: the format, parameters and bytes per parameter."""
        return (
            f"{self.path}: {self.container}, {self.name}; {self.parameters / 1e6:.1f}M parameters, "
            f"{self.tensor_bytes / 2**20:.1f} MiB stored ({self.bytes_per_parameter:.3f} bytes/parameter)"
        )


# ------------------------------------------------------------------------------------------------ reading headers


def _refuse_pickle(path: Path, argument: str) -> None:
    raise ValueError(
        f"`{argument}`={str(path)!r} is a pickle checkpoint ({path.suffix}); bernini_diffusers never unpickles, "
        "because unpickling runs code. Use a .safetensors or .gguf file (convert it first)."
    )


def _sniff(path: Path, argument: str) -> str:
    """The container of one file, from its first bytes: "gguf" or "safetensors"; anything else is refused."""
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        _refuse_pickle(path, argument)
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[:4] == GGUF_MAGIC:
        return "gguf"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size:
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":  # a zip (torch.save) or a raw pickle stream
        _refuse_pickle(path, argument)
    raise ValueError(
        f"`{argument}`={str(path)!r} is neither a safetensors nor a GGUF file (first bytes {head[:8]!r})."
    )


def _safetensors_entries(files: list[Path]) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    entries: dict[str, TensorEntry] = {}
    metadata: dict[str, str] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                metadata.update(handle.metadata() or {})
                for key in handle.keys():
                    tensor_slice = handle.get_slice(key)
                    storage, shape = tensor_slice.get_dtype(), tuple(tensor_slice.get_shape())
                    if key in entries:
                        first = str(entries[key].file)
                        raise ValueError(f"Tensor {key!r} is stored twice: in {first!r} and {str(file)!r}.")
                    n = 1
                    for size in shape:
                        n *= size
                    entries[key] = TensorEntry(file, key, storage, shape, n * SAFETENSORS_ITEMSIZE.get(storage, 1))
        except SafetensorError as err:
            raise ValueError(
                f"{str(file)!r} is not a readable safetensors file ({err}); it may be truncated."
            ) from None
    return entries, metadata


def _gguf_entries(file: Path) -> tuple[dict[str, TensorEntry], dict[str, tuple[int, ...]]]:
    try:
        reader = gguf.GGUFReader(str(file))
    except (ValueError, OSError) as err:
        raise ValueError(f"{str(file)!r} is not a readable GGUF file ({err}).") from None
    orig_shapes = {
        name[len(GGUF_ORIG_SHAPE_KEY) :]: tuple(int(v) for v in reader_field.contents())
        for name, reader_field in reader.fields.items()
        if name.startswith(GGUF_ORIG_SHAPE_KEY)
    }
    entries = {}
    for tensor in reader.tensors:
        shape = orig_shapes.get(tensor.name) or tuple(int(s) for s in reversed(tensor.shape.tolist()))  # ggml order
        entries[tensor.name] = TensorEntry(file, tensor.name, tensor.tensor_type.name, shape, int(tensor.n_bytes))
    return entries, orig_shapes


def _read_small(entry: TensorEntry) -> torch.Tensor:
    with safe_open(str(entry.file), framework="pt") as handle:
        return handle.get_tensor(entry.key)


def _layer(key: str, suffix: str) -> str:
    return key[: -len(suffix)] if key.endswith(suffix) else key


def _unsupported(path: str, what: str, layer: str, hint: str = "") -> ValueError:
    return ValueError(
        f"{path!r} is quantized as {what} (layer {layer!r}), which bernini_diffusers does not load"
        f"{hint}; it is refused rather than read as plain weights. Supported: bf16/fp16/fp32, plain float8, "
        "ComfyUI scaled float8 (float8_e4m3fn/e5m2), GGUF (" + ", ".join(GGUF_SUPPORTED_TYPES) + ")."
    )


def _classify_safetensors(path: str, entries: dict[str, TensorEntry], metadata: Mapping[str, str]):
    """Split `entries` into model weights, scales and side tensors, and name the quantization (refusing what this
    module does not implement)."""
    keys = set(entries)
    side: set[str] = set()
    scales: dict[str, TensorEntry] = {}
    layer_formats: dict[str, str] = {}

    # ComfyUI's current format: a `comfy_quant` JSON per layer (as a uint8 tensor), or the same per-layer dicts in
    # the header's `_quantization_metadata` (its `convert_old_quants` turns the latter into the former).
    if "_quantization_metadata" in metadata:
        try:
            layers = json.loads(metadata["_quantization_metadata"]).get("layers", {})
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{path!r}: its `_quantization_metadata` header entry is not a JSON object.") from None
        for layer, conf in layers.items():
            layer_formats[layer] = conf.get("format") if isinstance(conf, dict) else conf
    for key in sorted(k for k in keys if k.endswith(".comfy_quant")):
        side.add(key)
        try:
            conf = json.loads(bytes(_read_small(entries[key]).to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RuntimeError):
            raise ValueError(f"{path!r}: {key!r} is not a UTF-8 JSON comfy_quant marker.") from None
        layer_formats[_layer(key, ".comfy_quant")] = conf.get("format") if isinstance(conf, dict) else None
    for layer, fmt in sorted(layer_formats.items()):
        if fmt not in COMFY_FLOAT8_FORMATS:
            raise _unsupported(path, f"ComfyUI comfy_quant format {fmt!r}", layer)

    legacy = [k for k in keys if k in ("scaled_fp8", COMFY_PREFIX + "scaled_fp8")]
    side.update(legacy)

    for key in sorted(keys):
        if key.endswith(".weight_scale_2"):
            raise _unsupported(path, "nvfp4 (weight_scale_2 block scales)", _layer(key, ".weight_scale_2"))
        if key.endswith(("._data", "._scale")) or (key.endswith(".output_scale") and not layer_formats):
            raise _unsupported(path, "optimum-quanto (._data/._scale/.output_scale tensors)", key.rpartition(".")[0])
        if key.endswith(".input_scale") and not layer_formats:
            raise _unsupported(path, "optimum-quanto or another activation-quantized format (.input_scale)",
                               _layer(key, ".input_scale"))  # fmt: skip
        if key.endswith((".scale_input", ".input_scale")):
            # The activation scale of an fp8 matmul; with the weights dequantized, layers compute in the load dtype,
            # as ComfyUI does on GPUs without fp8 matmuls (and for `full_precision_matrix_mult` layers).
            side.add(key)
        elif key.endswith(".weight_scale") or key.endswith(".scale_weight"):
            suffix = ".weight_scale" if key.endswith(".weight_scale") else ".scale_weight"
            weight = _layer(key, suffix) + ".weight"
            if weight not in keys:
                raise ValueError(f"{path!r}: scale {key!r} has no weight {weight!r}.")
            scales[weight] = entries[key]

    for weight, s in scales.items():
        w, scale = entries[weight], s.key
        layer = _layer(weight, ".weight")
        if w.storage not in FLOAT8_DTYPES:
            raise _unsupported(path, f"{w.storage} weights with a scale ({scale.rpartition('.')[2]})", layer)
        if s.storage not in ("F32", "F16", "BF16"):
            raise _unsupported(path, f"a {s.storage} weight scale (block-scaled float8 such as mxfp8)", layer)
        if s.numel not in (1, w.shape[0]):
            raise _unsupported(path, f"float8 with {list(s.shape)} scales for a {list(w.shape)} weight (block-wise)",
                               layer)  # fmt: skip
    scale_keys = {s.key for s in scales.values()}
    for key, entry in sorted(entries.items()):
        if key in side or key in scale_keys:
            continue
        if entry.storage not in FLOAT_DTYPES:
            raise _unsupported(path, f"{entry.storage} tensors (integer weights such as int8)", _layer(key, ".weight"))
        if entry.storage == "F8_E8M0":
            raise _unsupported(path, "mxfp8 (F8_E8M0 block scales)", key)

    weights = {k: e for k, e in entries.items() if k not in side and k not in scale_keys}
    float8 = {e.storage for e in weights.values() if e.storage in FLOAT8_DTYPES}
    float8_dtype = None
    if layer_formats or scales and not legacy:
        quantization = "scaled_float8"
        unscaled = [k for k, e in weights.items() if e.storage in FLOAT8_DTYPES and k not in scales]
        if unscaled and layer_formats:
            raise ValueError(f"{path!r}: float8 weights without a weight_scale next to comfy_quant layers: "
                             f"{sample_names(unscaled)}.")  # fmt: skip
        float8_dtype = "/".join(sorted({entries[k].storage for k in scales}))
    elif legacy:
        quantization = "scaled_float8_legacy"
        float8_dtype = "/".join(sorted(float8)) or None
    elif float8:
        quantization = "float8"
    else:
        quantization = "none"
    return weights, scales, tuple(sorted(side)), quantization, float8_dtype


def _layout(path: str, keys: list[str]) -> str:
    if any(_OFFICIAL_RE.match(k) for k in keys):
        return "official"
    prefixed = bool(keys) and all(k.startswith(COMFY_PREFIX) for k in keys)
    if any(m in k for k in keys for m in _WAN_MARKERS):
        return "comfyui" if prefixed else "wan"
    stripped = [k.removeprefix(COMFY_PREFIX) for k in keys]
    if any(m in k or k.startswith(m) for k in stripped for m in _DIFFUSERS_MARKERS):
        return "diffusers"  # with ComfyUI's prefix or without: it is stripped
    raise ValueError(
        f"{path!r} holds no Wan/Bernini transformer keys (e.g. {sample_names(keys)}): neither the official "
        "renderer's, Wan's original, ComfyUI's nor diffusers' layout."
    )


def _official_experts(keys: list[str]) -> tuple[str, ...]:
    found = set()
    for key in keys:
        match = _OFFICIAL_RE.match(key)
        if match:
            found.add("transformer_2" if match.group(1) else "transformer")
    return tuple(e for e in EXPERTS if e in found)


def _checkpoint_files(path: Path, argument: str) -> list[Path]:
    """The tensor files of `path`: itself, the shards an index names, or the safetensors files of a folder (its
    index first)."""
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise ValueError(f"`{argument}`={str(path)!r} holds several indexes; pass the one to load.")
        if indexes:
            return index_shards(indexes[0])[0]
        files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.gguf"))
        if not files:
            pickles = [p.name for p in path.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES)]
            if pickles:
                _refuse_pickle(path / pickles[0], argument)
            raise FileNotFoundError(f"`{argument}`={str(path)!r} holds no .safetensors or .gguf file.")
        if len(files) > 1 and any(f.suffix == ".gguf" for f in files):
            raise ValueError(f"`{argument}`={str(path)!r} holds several checkpoint files; pass the one to load.")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"`{argument}`={str(path)!r} does not exist.")
    if path.name.lower().endswith(PICKLE_SUFFIXES) or ".bin.index" in path.name:
        _refuse_pickle(path, argument)
    if path.name.endswith(".json"):
        return index_shards(path)[0]
    return [path]


def detect_format(path: str | os.PathLike, argument: str = "path") -> CheckpointFormat:
    """Read what the checkpoint at `path` is from its headers, without reading its weights.

    Args:
        path (`str` or `os.PathLike`):
            A `.safetensors` or `.gguf` file (recognised by its first bytes), a `*.safetensors.index.json` (its
            shards beside it) or a folder of shards.
        argument (`str`, defaults to `"path"`):
            The argument name used in error messages.

    Returns:
        [`CheckpointFormat`]: container, key layout, quantization, and the stored bytes per parameter.

    Raises:
        ValueError: a pickle (never opened past its first bytes), an unreadable file, unknown keys, or a quantization
            this package does not load (the message names the format and one layer).
    """
    path = Path(path)
    files = _checkpoint_files(path, argument)
    containers = {_sniff(f, argument) for f in files}
    if containers == {"gguf"}:
        if len(files) > 1:
            raise ValueError(f"`{argument}`={str(path)!r}: split GGUF files are not supported; merge them first.")
        entries, orig_shapes = _gguf_entries(files[0])
        unsupported = [e for e in entries.values() if e.storage not in GGUF_SUPPORTED_TYPES]
        if unsupported:
            raise _unsupported(str(path), f"GGUF {unsupported[0].storage}", unsupported[0].key,
                               " (diffusers' GGUF support does not dequantize it)")  # fmt: skip
        keys = list(entries)
        layout = _layout(str(path), keys)
        return CheckpointFormat(
            str(path), tuple(files), "gguf", layout, "gguf", entries,
            experts=_official_experts(keys) if layout == "official" else (), gguf_orig_shapes=orig_shapes,
        )  # fmt: skip
    if containers != {"safetensors"}:
        raise ValueError(f"`{argument}`={str(path)!r} mixes safetensors and GGUF files.")
    entries, metadata = _safetensors_entries(files)
    weights, scales, side, quantization, float8_dtype = _classify_safetensors(str(path), entries, metadata)
    keys = list(weights)
    layout = _layout(str(path), keys)
    return CheckpointFormat(
        str(path), tuple(files), "safetensors", layout, quantization, weights, scales, side,
        experts=_official_experts(keys) if layout == "official" else (), float8_dtype=float8_dtype,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ key mapping


def _expert_weights(fmt: CheckpointFormat, expert: str) -> dict[str, TensorEntry]:
    """The weights of `expert` in an official file that holds both experts (the other expert's keys left out)."""
    if len(fmt.experts) < 2:
        return fmt.weights
    other = [e for e in EXPERTS if e != expert][0]
    dropped = tuple(p for p in KEY_PREFIXES[other] if p.endswith(f"{other}."))
    return {k: e for k, e in fmt.weights.items() if not k.startswith(dropped)}


def model_keys(fmt: CheckpointFormat, expert: str = "transformer", expected=None) -> dict[str, str]:
    """Model key -> source key of every weight of `fmt` (the official layout through `convert.KEY_PREFIXES`, Wan's
    and ComfyUI's through diffusers' `convert_wan_transformer_to_diffusers`, diffusers' as they are)."""
    if fmt.layout == "official":
        source = {
            k: SourceTensor(e.file, k, "F32" if e.storage not in SAFETENSORS_DTYPES else e.storage, e.shape)
            for k, e in _expert_weights(fmt, expert).items()
        }
        plan = plan_conversion(source, expert, expected, checkpoint=fmt.path)
        return {model_key: info.key for model_key, info in plan.tensors.items()}
    if fmt.layout == "diffusers":
        return {k.removeprefix(COMFY_PREFIX): k for k in fmt.weights}
    # diffusers' converter renames a dict's keys; given each key as its own value, it returns new key -> old key.
    converted = convert_wan_transformer_to_diffusers({k: k for k in fmt.weights})
    return dict(converted)


def _model_shapes(fmt: CheckpointFormat, rename: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    return {model_key: fmt.weights[source].shape for model_key, source in rename.items()}


def infer_config(fmt: CheckpointFormat, expert: str = "transformer") -> dict[str, Any]:
    """The transformer config of a full-size file, recognised from its shapes: the Wan2.2-A14B expert (dim 5120, 40
    layers, ffn 13824) or Wan2.1-1.3B (dim 1536, 30 layers, ffn 8960). Anything else needs `config`."""
    probe = fmt
    if fmt.layout == "official":  # rename without a key check: the config is what is being looked for
        prefixes = KEY_PREFIXES[expert]
        rename = {}
        for key in fmt.weights:
            for prefix in prefixes[:-1]:
                if key.startswith(prefix):
                    rename.setdefault(key[len(prefix) :], key)
                    break
    else:
        rename = model_keys(probe, expert)
    shapes = _model_shapes(fmt, rename)
    dim = shapes.get("patch_embedding.weight", (None,))[0]
    ffn = shapes.get("blocks.0.ffn.net.0.proj.weight", (None,))[0]
    layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    text_dim = shapes.get("condition_embedder.text_embedder.linear_1.weight", (None, None))[1]
    for _, config in KNOWN_CONFIGS:
        inner = config["num_attention_heads"] * config["attention_head_dim"]
        if (dim, layers, ffn, text_dim) == (inner, config["num_layers"], config["ffn_dim"], config["text_dim"]):
            return dict(config)
    known = "; ".join(
        f"{name}: dim {c['num_attention_heads'] * c['attention_head_dim']}, {c['num_layers']} layers, "
        f"ffn {c['ffn_dim']}"
        for name, c in KNOWN_CONFIGS
    )
    raise ValueError(
        f"{fmt.path!r} has dim {dim}, {layers} layers, ffn {ffn}, text dim {text_dim}, which match no known config "
        f"({known}); pass `config` (a diffusers transformer folder, a repo id, or a config dict)."
    )


def _check_keys(fmt: CheckpointFormat, rename: Mapping[str, str], expected, expert: str) -> None:
    """Missing and unexpected keys, and shapes, against the expert of the config, named (a few of each)."""
    missing = set(expected) - set(rename)
    unexpected = {rename[k] for k in set(rename) - set(expected)}
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {sample_names(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {sample_names(unexpected)}")
    if not parts:
        shapes = _model_shapes(fmt, rename)
        wrong = [
            f"{rename[k]}: shape {list(shapes[k])}, the config expects {list(shape)}"
            for k, (shape, _) in expected.items()
            if tuple(shapes[k]) != tuple(shape)
        ]
        if wrong:
            parts.append(f"{len(wrong)} tensor(s) of another shape: {'; '.join(wrong[:4])}")
    if parts:
        raise ValueError(f"{fmt.path!r} does not match the config of `{expert}`: " + "; ".join(parts) + ".")


@dataclass(frozen=True)
class FileTensor:
    """Where one model tensor of a single-file checkpoint comes from: the stored tensor, and the scale its float8
    values are multiplied by (scaled float8), if any."""

    entry: TensorEntry
    scale: TensorEntry | None = None
    container: str = "safetensors"

    @property
    def key(self) -> str:
        return self.entry.key

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype the stored values stand for, which (as `convert.SourceTensor.torch_dtype`) `convert.load_dtype`
        takes: the file's float dtype (float8 included); float32 for GGUF's block types, which are dequantized."""
        if self.container == "gguf":
            return torch.float16 if self.entry.storage == "F16" else torch.float32
        return FLOAT_DTYPES[self.entry.storage]


@dataclass
class FilePlan:
    """Which stored tensor (and scale) each key of an expert comes from in a single-file checkpoint, checked against
    the expert's config: what `load_transformer` reads whole and `sharded_load` reads by rows.

    Attributes:
        fmt: the checkpoint's format (`detect_format`).
        expert: `"transformer"` or `"transformer_2"`.
        config: the expert's transformer config.
        tensors: model key -> its `FileTensor`, in the model's order.
        keep_in_fp32: the model's `_keep_in_fp32_modules` (what a `dtype` load leaves in float32).
    """

    fmt: CheckpointFormat
    expert: str
    config: dict[str, Any]
    tensors: dict[str, FileTensor]
    keep_in_fp32: tuple[str, ...] = ()

    @property
    def rename(self) -> dict[str, str]:
        """Model key -> source key."""
        return {name: tensor.key for name, tensor in self.tensors.items()}

    def load_dtype(self, name: str, torch_dtype: torch.dtype | None) -> torch.dtype:
        """The dtype tensor `name` holds after `load_transformer(..., dtype=torch_dtype)`: for GGUF block weights, the
        dtype its layers compute with (`GGUFQuantizationConfig.compute_dtype`)."""
        return load_dtype(name, self.tensors[name].torch_dtype, torch_dtype, self.keep_in_fp32)

    def describe(self) -> str:
        return f"{self.expert}: {len(self.tensors)} tensors of {self.fmt.describe()}"


def plan_file(
    fmt: CheckpointFormat, config: Mapping[str, Any] | None = None, expert: str | None = None, argument: str = "path"
) -> tuple[FilePlan, BerniniTransformer3DModel]:
    """Plan the read of the single-file checkpoint `fmt` onto an expert of `config` (recognised from the shapes when
    None), checking the key set and every shape before any weight is read.

    Returns the plan and the expert built on the meta device (no weight memory).
    """
    if fmt.layout == "official" and expert is None:
        if len(fmt.experts) > 1:
            raise ValueError(
                f"`{argument}`={fmt.path!r} holds both experts ({', '.join(fmt.experts)}); say which one to load "
                "(`subfolder='transformer'` or `'transformer_2'`)."
            )
        expert = fmt.experts[0]
    expert = expert or "transformer"
    if config is None:
        config = infer_config(fmt, expert)
        logger.info(f"{fmt.path}: config recognised from the shapes: {config['num_layers']} layers, "
                    f"ffn {config['ffn_dim']}")  # fmt: skip
    model = expert_skeleton(config)
    expected = expected_tensors(model)
    rename = model_keys(fmt, expert, expected)
    _check_keys(fmt, rename, expected, expert)
    tensors = {
        name: FileTensor(fmt.weights[rename[name]], fmt.scales.get(rename[name]), fmt.container) for name in expected
    }
    plan = FilePlan(fmt, expert, dict(config), tensors, tuple(model._keep_in_fp32_modules or ()))
    return plan, model


# ------------------------------------------------------------------------------------------------ loading


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`float32(weight) * float32(scale)`, rounded once to `dtype`; a per-channel scale (`[out]` or `[out, 1]`)
    scales each output row."""
    scale = scale.to(torch.float32)
    if scale.numel() > 1:
        scale = scale.reshape(-1, *([1] * (weight.ndim - 1)))
    else:
        scale = scale.reshape(())
    return (weight.to(torch.float32) * scale).to(dtype)


FLOAT8_HOOK = "bernini_float8_weight"


class Float8WeightHook(ModelHook):
    """Keeps a layer's weight in float8 and hands its forward `float32(weight) * scale` rounded to `compute_dtype`,
    the value a load with `dtype=compute_dtype` would have stored: the output is bit-identical, the weight takes one
    byte per value between forwards (plus the float32 scale)."""

    _is_stateful = False

    def __init__(self, scale: torch.Tensor, compute_dtype: torch.dtype) -> None:
        self.scale = scale
        self.compute_dtype = compute_dtype
        self._stored = None

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        weight = module.weight
        self._stored = weight.data
        weight.data = dequantize(weight.data, self.scale.to(weight.device), self.compute_dtype)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output):
        module.weight.data, self._stored = self._stored, None
        return output


def _keep_float8(model: torch.nn.Module, kept: Mapping[str, tuple[torch.Tensor, torch.dtype]]) -> None:
    """Register `Float8WeightHook` on every layer whose weight was kept in float8 (`kept`: weight name -> its scale
    and the dtype the default load would have given it)."""
    for name, module in model.named_modules():
        if f"{name}.weight" in kept:
            scale, compute_dtype = kept[f"{name}.weight"]
            HookRegistry.check_if_exists_or_initialize(module).register_hook(
                Float8WeightHook(scale, compute_dtype), FLOAT8_HOOK
            )


class FileRows:
    """Rows of the tensors of a `FilePlan`, in the dtype `load_transformer(..., dtype=torch_dtype)` gives them.

    `rows(name, start, stop)` copies rows `[start, stop)` of model tensor `name` (all of it without a range) out of
    the memory-mapped file and only those: a safetensors tensor through `get_slice`, its per-channel scale sliced to
    the same rows (a per-tensor scale is read whole); a GGUF tensor through `gguf.GGUFReader`'s array (a block type's
    rows are its rows of blocks), its block types dequantized by diffusers' own `dequantize_gguf_tensor`, so the values
    are the ones diffusers' GGUF layers compute with. Use it as a context manager: the file stays open inside.
    """

    def __init__(self, plan: FilePlan, torch_dtype: torch.dtype | None, ignore_scales: bool = False) -> None:
        self.plan = plan
        self.torch_dtype = torch_dtype
        self.ignore_scales = ignore_scales
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        self._gguf: dict[str, Any] | None = None

    def __enter__(self) -> FileRows:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._handles.clear()
        self._gguf = None

    def _handle(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt"))
            except SafetensorError as err:
                raise ValueError(f"{str(file)!r} is not a readable safetensors file ({err}).") from None
        return self._handles[file]

    def stored(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows of tensor `name` as the safetensors file stores them (float8 included)."""
        entry = self.plan.tensors[name].entry
        if start is None and stop is None:
            return self._handle(entry.file).get_tensor(entry.key)
        return self._handle(entry.file).get_slice(entry.key)[start:stop]

    def scale(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor | None:
        """The scale of tensor `name`'s rows: a per-tensor scale whole, a per-channel one at the same rows."""
        source = self.plan.tensors[name]
        scale = source.scale
        if scale is None:
            return None
        handle = self._handle(scale.file)
        if (start is None and stop is None) or scale.numel == 1:
            return handle.get_tensor(scale.key)
        if scale.shape[:1] == source.shape[:1]:  # `[out]` or `[out, 1]`: one scale per row
            return handle.get_slice(scale.key)[start:stop]
        return handle.get_tensor(scale.key).reshape(-1)[start:stop]  # another arrangement of out values (small)

    def __call__(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        dtype = self.plan.load_dtype(name, self.torch_dtype)
        if self.plan.fmt.container == "gguf":
            return self._gguf_rows(name, start, stop).to(dtype)
        tensor = self.stored(name, start, stop)
        scale = None if self.ignore_scales else self.scale(name, start, stop)
        if scale is not None:
            return dequantize(tensor, scale, dtype)
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    def _gguf_rows(self, name: str, start: int | None, stop: int | None) -> torch.Tensor:
        source = self.plan.tensors[name]
        if self._gguf is None:
            self._gguf = {t.name: t for t in gguf.GGUFReader(str(source.entry.file)).tensors}
        tensor = self._gguf[source.key]
        data, plain = tensor.data, tensor.tensor_type.name in GGUF_PLAIN_TYPES
        # The array's first axis is the tensor's rows when GGUF stores the tensor in its own shape (numpy's view of
        # GGUF's reversed dims; a block type's last axis holds a row's blocks). Tensors stored flattened (more than 4
        # dims, `GGUF_ORIG_SHAPE_KEY`) and 1-D block-typed ones (a bias) are small: read whole, sliced once shaped.
        direct = (
            source.key not in self.plan.fmt.gguf_orig_shapes
            and (plain or len(source.shape) >= 2)
            and data.shape[:1] == source.shape[:1]
        )
        whole = start is None and stop is None
        values = torch.from_numpy(np.array(data if whole or not direct else data[start:stop]))  # copies those rows
        if not plain:  # wrapped as diffusers' `load_gguf_checkpoint` does
            values = dequantize_gguf_tensor(GGUFParameter(values, quant_type=tensor.tensor_type))
        if not direct:
            values = values.reshape(source.shape)
            if not whole:
                values = values[start:stop]
        return values


def _read_safetensors(
    plan: FilePlan, torch_dtype, ignore_scales: bool = False, keep_float8: bool = False, kept=None
) -> dict[str, torch.Tensor]:
    """The model's state dict read from the file, tensor by tensor: scaled float8 dequantized to the load dtype, or
    (`keep_float8`) the float8 Linear weights kept as stored, with their scale and dtype collected into `kept`."""
    state = {}
    with FileRows(plan, torch_dtype, ignore_scales) as rows:
        for name, source in plan.tensors.items():
            if keep_float8 and source.entry.storage in FLOAT8_DTYPES and len(source.shape) == 2:
                scale = rows.scale(name)
                kept[name] = (scale if scale is not None else torch.ones((), dtype=torch.float32),
                              plan.load_dtype(name, torch_dtype))  # fmt: skip
                state[name] = rows.stored(name)
            else:
                state[name] = rows(name)
    return state


def resolve_config(config: Any, subfolder: str | None, hub: Mapping[str, Any]) -> dict[str, Any]:
    """`config` as a dict: a dict as given, or `BerniniTransformer3DModel.load_config` of a folder or repo id (its
    `subfolder`, by default `transformer` when the folder has one, as diffusers' single-file loader picks it)."""
    if isinstance(config, Mapping):
        return dict(config)
    if not isinstance(config, (str, os.PathLike)):
        raise ValueError(f"`config`={config!r} must be a folder, a repo id or a dict of transformer settings.")
    root = Path(config)
    if subfolder is None and (root / "transformer" / "config.json").is_file():
        subfolder = "transformer"
    return dict(BerniniTransformer3DModel.load_config(str(config), subfolder=subfolder, **hub))


def load_transformer(
    path: str | os.PathLike,
    config: Any = None,
    *,
    expert: str | None = None,
    dtype: torch.dtype | None = None,
    quantization_config: Any = None,
    argument: str = "path",
    fmt: CheckpointFormat | None = None,
    keep_float8: bool = False,
    _ignore_scales: bool = False,
) -> BerniniTransformer3DModel:
    """A `BerniniTransformer3DModel` holding the weights of the checkpoint at `path`, in any format of
    `detect_format` (see `BerniniTransformer3DModel.from_single_file` for the arguments).

    The format is named in one log line. Keys, shapes and the config are checked before any weight is read. With
    `keep_float8`, the float8 Linear weights of a plain or scaled float8 file stay float8 in memory (one byte per
    weight) and each layer computes with `float32(weight) * scale` rounded to `dtype`, registered as a diffusers hook
    (`Float8WeightHook`): the output equals the default load's bit for bit. Such an expert already stores float8, so
    the `fp8` memory profile is not applied on top of it.
    """
    fmt = fmt or detect_format(path, argument)
    logger.info(fmt.describe())
    plan, model = plan_file(fmt, config, expert, argument)
    if fmt.layout == "official" and fmt.quantization == "none" and quantization_config is None:
        # The official shards: the conversion `from_pretrained(high_noise_ckpt=...)` has always used.
        expected = expected_tensors(model)
        weights = _expert_weights(fmt, plan.expert)
        source = {k: SourceTensor(e.file, k, e.storage, e.shape) for k, e in weights.items()}
        conversion = plan_conversion(source, plan.expert, expected, checkpoint=fmt.path, keep_in_fp32=plan.keep_in_fp32)
        model = load_expert_weights(conversion, model, dtype)
    elif fmt.container == "gguf" or quantization_config is not None:
        model = _load_with_diffusers(plan, dtype, quantization_config, model)
    else:
        kept: dict[str, tuple[torch.Tensor, torch.dtype]] = {}
        state = _read_safetensors(plan, dtype, _ignore_scales, keep_float8, kept)
        model.load_state_dict(state, strict=True, assign=True)
        model.eval()
        _keep_float8(model, kept)
    model.register_to_config(_name_or_path=str(path))
    return model


def _load_with_diffusers(plan: FilePlan, dtype, quantization_config, skeleton) -> BerniniTransformer3DModel:
    """GGUF files (and any file with a `quantization_config`) through diffusers' own single-file loader, handed a
    state dict already in diffusers' keys with every scale applied: its quantizer keeps GGUF weights quantized and
    dequantizes them layer by layer at compute."""
    fmt, rename, config = plan.fmt, plan.rename, plan.config
    if fmt.container == "gguf":
        if quantization_config is None:
            quantization_config = GGUFQuantizationConfig(compute_dtype=dtype or torch.float32)
        elif not isinstance(quantization_config, GGUFQuantizationConfig):
            raise ValueError(
                f"`quantization_config`={type(quantization_config).__name__}: {fmt.path!r} is a GGUF file, which "
                "loads with a GGUFQuantizationConfig (or none: one is made with `dtype` as compute dtype)."
            )
        raw = load_gguf_checkpoint(str(fmt.files[0]))
        state = {}
        for model_key, source in rename.items():
            tensor = raw.pop(source)
            shape = fmt.gguf_orig_shapes.get(source)
            if shape is not None and not hasattr(tensor, "quant_type"):
                tensor = tensor.reshape(shape)
            state[model_key] = tensor
    else:
        if isinstance(quantization_config, GGUFQuantizationConfig):
            raise ValueError(f"`quantization_config` is a GGUFQuantizationConfig but {fmt.path!r} is not a GGUF file.")
        state = _read_safetensors(plan, dtype)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps({**dict(config), "_class_name": "WanTransformer3DModel"}))
        # diffusers' own `FromOriginalModelMixin.from_single_file` (our class overrides the name).
        return super(BerniniTransformer3DModel, BerniniTransformer3DModel).from_single_file.__func__(
            BerniniTransformer3DModel, state, config=folder, torch_dtype=dtype, quantization_config=quantization_config
        )


# ------------------------------------------------------------------------------------------------ from_single_file

_HUB_URL = re.compile(r"^https://huggingface\.co/(?P<repo>[^/]+/[^/]+)/(blob|resolve)/(?P<rev>[^/]+)/(?P<path>.+)$")
HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download", "proxies")


def fetch_single_file(name: str | os.PathLike, hub: Mapping[str, Any], argument: str) -> Path:
    """A local path as it is; a Hub file (`https://huggingface.co/<owner>/<repo>/blob/<rev>/<file>` or
    `[hf://]owner/repo[@revision]/path/file`) downloaded with huggingface_hub."""
    path = Path(name)
    text = str(name)
    if path.exists() or path.is_absolute() or text.startswith(("./", "../", "~")):
        if not path.exists():
            raise FileNotFoundError(f"`{argument}`={text!r} does not exist.")
        return path
    match = _HUB_URL.match(text)
    if match:
        repo_id, revision, filename = match["repo"], match["rev"], match["path"]
    else:
        owner, _, rest = text.removeprefix("hf://").partition("/")
        repo, _, filename = rest.partition("/")
        repo, _, revision = repo.partition("@")
        repo_id, revision = f"{owner}/{repo}", revision or hub.get("revision")
        if not owner or not repo or not filename:
            raise FileNotFoundError(
                f"`{argument}`={text!r} is neither a local file nor a Hub file (owner/repo[@revision]/path/file)."
            )
    if filename.lower().endswith(PICKLE_SUFFIXES):
        _refuse_pickle(Path(filename), argument)
    options = {k: v for k, v in hub.items() if k in ("cache_dir", "local_files_only", "token", "force_download")}
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, **options))
    except (huggingface_hub.errors.LocalEntryNotFoundError, huggingface_hub.errors.HfHubHTTPError) as err:
        raise FileNotFoundError(f"`{argument}`={text!r} could not be fetched ({type(err).__name__}: {err}).") from err


def from_single_file(cls, pretrained_model_link_or_path_or_dict=None, **kwargs):
    """`BerniniTransformer3DModel.from_single_file` (its docstring); installed on the class by this module."""
    name = pretrained_model_link_or_path_or_dict
    if name is None:
        name = kwargs.pop("pretrained_model_link_or_path", None)
    if isinstance(name, Mapping) or name is None:
        raise ValueError(
            "`pretrained_model_link_or_path_or_dict` must be a file path or Hub file: bernini_diffusers reads the "
            "format from the file itself (a state dict carries no scales or quantization markers to check)."
        )
    config = kwargs.pop("config", None)
    subfolder = kwargs.pop("subfolder", None)
    if "dtype" in kwargs and "torch_dtype" in kwargs:
        raise ValueError("`dtype` and `torch_dtype` were both given; pass `dtype` (diffusers deprecates the other).")
    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"`dtype`={dtype!r} is not a torch.dtype; pass e.g. torch.bfloat16.")
    quantization_config = kwargs.pop("quantization_config", None)
    expert = kwargs.pop("expert", None)
    keep_float8 = kwargs.pop("keep_float8", False)
    device = kwargs.pop("device", None)
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    config_revision = kwargs.pop("config_revision", None)
    for ignored in ("low_cpu_mem_usage", "disable_mmap"):
        kwargs.pop(ignored, None)  # weights are always read tensor by tensor from the memory-mapped file
    if kwargs:
        raise ValueError(
            f"BerniniTransformer3DModel.from_single_file got unsupported arguments: {sorted(kwargs)}. It accepts "
            "config, subfolder, dtype (torch_dtype), quantization_config, keep_float8, device and the Hub arguments "
            f"{list(HUB_KWARGS)}."
        )
    if expert is None and subfolder in EXPERTS:
        expert = subfolder
    if expert is not None and expert not in EXPERTS:
        raise ValueError(f"`expert`={expert!r} must be one of {EXPERTS}.")
    path = fetch_single_file(name, hub, "pretrained_model_link_or_path_or_dict")
    if config is not None:
        config_hub = {k: v for k, v in hub.items() if k in ("cache_dir", "local_files_only", "token")}
        if config_revision is not None:
            config_hub["revision"] = config_revision
        config = resolve_config(config, subfolder, config_hub)
    model = load_transformer(
        path, config, expert=expert, dtype=dtype, quantization_config=quantization_config, keep_float8=keep_float8,
        argument="pretrained_model_link_or_path_or_dict",
    )  # fmt: skip
    if device is not None:
        model.to(device)
    return model


BerniniTransformer3DModel._single_file_loader = classmethod(from_single_file)
