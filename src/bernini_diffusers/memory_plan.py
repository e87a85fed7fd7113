"""The memory plan: peak GPU memory and peak host RAM of a call, before any weight is loaded.

`BerniniPipeline.estimate_memory(...)` and `bernini generate ... --plan` call `estimate_memory` here. Nothing is a
hand-written size; every figure comes from the model's configs and the call's real shapes:

- **weights**: each component (expert, UMT5 text encoder, Wan VAE) is built on the meta device from its config and
  its parameters counted in the dtype `from_pretrained` leaves them (`_keep_in_fp32_modules` in float32). The experts
  are priced in the checkpoint format: a plain dtype, `fp8` (diffusers' layerwise casting on a meta copy: exactly the
  layers the `fp8` profile stores in float8) or a GGUF quantization (the blocks' Linear weights at ggml's block size,
  the rest in bf16);
- **activations**: one forward of a one-layer copy of the expert on meta tensors at the call's real token count
  (every stream of the widest guidance branch), under a dispatch mode that adds each new tensor's bytes when it is
  made and takes them off when it dies; attention is priced as the fused kernels run it (its output, no score
  matrix). Inference frees each block's tensors before the next block, so one layer's peak is the model's. The VAE
  decode is measured the same way on 1 and 3 latent frames and extrapolated linearly in frames (it decodes frame by
  frame with a fixed cache); the text encoder's on a one-layer copy at 512 tokens;
- **this process**: the resident set of the process making the plan (torch and the libraries imported), measured.

Each profile then places these (docs/memory.md): `resident` keeps everything on the device; `expert_offload` and
`low_ram` one component at a time (the largest component plus its activations); `group_offload` an expert's
non-block weights plus two blocks (the one running and the one prefetched); `fp8*` prices the experts in float8.
Host RAM is what the CPU holds at its peak: every component for the profiles that load everything (loaded in the
file's dtype, so a bf16 file's `fp8` peak is the bf16 load plus the float8 copy of each expert: the loaded tensors
map the file, and the layers kept in full precision keep it mapped while the expert is on the CPU), and for `low_ram`
the larger of the text encoder and one expert with the VAE. On the CPU the activations are host RAM too, and
`expert_offload` holds one more expert (diffusers' model offload computes on `cpu:0`, which torch does not take for
`cpu`, so each hook copies the whole component while its old storage is alive). `shard_degree` N prices FSDP's
per-rank share of the experts: 1/N of an expert plus one gathered block on the device (`fp8`: 1/N of the float8
expert), read row by row from the files (`from_pretrained_sharded`), so host RAM holds the text encoder and the VAE,
plus both experts' shards under `expert_offload`; the text encoder is sharded too (1/N, plus its token embedding and
one block gathered while it encodes).
"""

from __future__ import annotations

import functools
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import UMT5Config, UMT5EncoderModel

from .constants import (
    CHECKPOINT_FORMATS,
    GGUF_BLOCKS,
    KNOWN_MODELS,
    PLAIN_FORMATS,
    UMT5_XXL_CONFIG,
    WAN_VAE_CONFIG,
)
from .memory import FP8_STORAGE_DTYPE, check_sharded_profile, get_memory_profile, parameter_bytes
from .transformer_bernini import BerniniTransformer3DModel

GB = 1e9
TEXT_TOKENS = 512
# The latent-sized float32 tensors the denoising loop keeps besides one forward's: the latents, each branch's
# prediction (up to 4), the guided prediction and UniPC's history of model outputs (order 2) and last sample.
LOOP_LATENT_COPIES = 9


@dataclass
class ModelConfigs:
    """The configs a plan reads: one expert's (both experts share it), how many experts, the text encoder's and the
    VAE's."""

    transformer: dict[str, Any]
    num_experts: int
    text_encoder: dict[str, Any] = field(default_factory=lambda: dict(UMT5_XXL_CONFIG))
    vae: dict[str, Any] = field(default_factory=lambda: dict(WAN_VAE_CONFIG))
    name: str = "custom"


def model_configs(model: str | os.PathLike | ModelConfigs = "A14B") -> ModelConfigs:
    """The configs of `model`: `"A14B"` or `"1.3B"` (the released configs, in `constants`), a local model folder
    (its `transformer/`, `transformer_2/`, `text_encoder/` and `vae/` config.json files; the released defaults for any
    it lacks), a Hub repo id whose name says which of the two it is, or ready `ModelConfigs`."""
    if isinstance(model, ModelConfigs):
        return model
    name = str(model)
    if name in KNOWN_MODELS:
        config, experts = KNOWN_MODELS[name]
        return ModelConfigs(dict(config), experts, name=name)
    folder = Path(name).expanduser()
    if folder.is_dir():
        read = {}
        for component in ("transformer", "transformer_2", "text_encoder", "vae"):
            path = folder / component / "config.json"
            if path.is_file():
                try:
                    read[component] = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
                except (OSError, ValueError) as err:
                    raise ValueError(f"`model`={name!r}: {path.name} of {component}/ is not readable JSON: {err}") from None
        expert = read.get("transformer") or read.get("transformer_2")
        if expert is None:
            raise FileNotFoundError(f"`model`={name!r} has no transformer/config.json to plan from.")
        experts = int("transformer" in read) + int("transformer_2" in read)
        configs = ModelConfigs(expert, experts, name=name)
        if "text_encoder" in read:
            configs.text_encoder = read["text_encoder"]
        if "vae" in read:
            configs.vae = read["vae"]
        return configs
    if "1.3b" in name.lower():
        return model_configs("1.3B")
    if "bernini" in name.lower() or "wan2.2" in name.lower():
        return model_configs("A14B")
    raise ValueError(
        f"`model`={name!r} is not a model a plan knows without files: pass 'A14B', '1.3B', a local model folder, or "
        "a released repo id."
    )


# ------------------------------------------------------------------------------------------------ measuring


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors alive during a pass: each op's new (non-aliasing) outputs are added when made
    and taken off when their Python object dies (a view keeps its base alive through `_base`). Inputs and weights made
    before the pass are not counted."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for i, tensor in enumerate(tree_flatten(out)[0]):
            if not isinstance(tensor, torch.Tensor):
                continue
            if i < len(returns) and returns[i].alias_info is not None:
                continue  # a view or an in-place result: no new storage
            nbytes = tensor.numel() * tensor.element_size()
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._free, nbytes)
        return out


class _FusedAttention(TorchFunctionMode):
    """`scaled_dot_product_attention` as the fused kernels (flash, memory-efficient, CPU flash) run it: the output and
    a float32 log-sum-exp per query, never the score matrix that the math decomposition of meta tensors would make."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value")
            query, _, value = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))
            lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
            del lse  # made and freed: counted at the peak only if it coincides
            return query.new_empty((*query.shape[:-1], value.shape[-1]))
        return func(*args, **kwargs)


def _peak_bytes(run) -> int:
    tracker = _LiveBytes()
    with torch.no_grad(), _FusedAttention(), tracker:
        result = run()
    del result
    return tracker.peak


def _cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> None:
    # `from_pretrained(dtype=...)` keeps `_keep_in_fp32_modules` in float32 (transformers: only for fp16).
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    if type(model).__module__.startswith("transformers.") and dtype != torch.float16:
        keep = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not keep.intersection(name.split(".")):
            tensor.data = tensor.data.to(dtype)


def _meta_expert(config: dict, dtype: torch.dtype, **overrides) -> BerniniTransformer3DModel:
    with torch.device("meta"):
        expert = BerniniTransformer3DModel(**{**config, **overrides})
    _cast_like_from_pretrained(expert, dtype)
    return expert


def _meta_text_encoder(config: dict, dtype: torch.dtype, **overrides):
    with torch.device("meta"):
        encoder = UMT5EncoderModel(UMT5Config(**{**config, **overrides}))
    _cast_like_from_pretrained(encoder, dtype)
    return encoder


def _meta_vae(config: dict):
    with torch.device("meta"):
        return AutoencoderKLWan(**config)


@dataclass
class ExpertBytes:
    """One expert's parameter bytes in a format: in all, in its transformer blocks, and its largest block."""

    total: int
    blocks: int
    largest_block: int
    largest_layer_compute: int  # the largest Linear weight in the compute dtype (a cast or dequantized copy)
    parameters: int


def expert_bytes(config: dict, checkpoint_format: str = "bf16", dtype: torch.dtype = torch.bfloat16) -> ExpertBytes:
    """Bytes of one expert's parameters and buffers in `checkpoint_format` (see the module docstring)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"`checkpoint_format`={checkpoint_format!r} is not a format a plan knows; choose one of "
            f"{', '.join(CHECKPOINT_FORMATS)}."
        )
    return _expert_bytes(json.dumps(config, sort_keys=True), checkpoint_format, dtype)


@functools.lru_cache(maxsize=64)
def _expert_bytes(config_json: str, checkpoint_format: str, dtype: torch.dtype) -> ExpertBytes:
    config = json.loads(config_json)
    if checkpoint_format in PLAIN_FORMATS:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[checkpoint_format]
    expert = _meta_expert(config, dtype)
    compute = torch.finfo(dtype).bits // 8
    linear_sizes = [m.weight.numel() for m in expert.modules() if isinstance(m, torch.nn.Linear)]
    if checkpoint_format == "fp8":
        # exactly the layers the fp8 profile stores in float8 (diffusers' skip patterns and Wan's own)
        expert.enable_layerwise_casting(storage_dtype=FP8_STORAGE_DTYPE, compute_dtype=dtype)
    per_block = [parameter_bytes(block) for block in expert.blocks]
    if checkpoint_format in GGUF_BLOCKS:
        size, block_bytes = GGUF_BLOCKS[checkpoint_format]
        quantized = 0
        for block in expert.blocks:
            for module in block.modules():
                if isinstance(module, torch.nn.Linear):
                    quantized += module.weight.numel() * module.weight.element_size()
        # the blocks' Linear weights quantized, every other tensor as loaded
        block_weights = sum(
            m.weight.numel() for b in expert.blocks for m in b.modules() if isinstance(m, torch.nn.Linear)
        )
        gguf = block_weights * block_bytes / size
        total = parameter_bytes(expert) - quantized + int(gguf)
        blocks = sum(per_block) - quantized + int(gguf)
        largest = int(blocks / len(per_block))
    else:
        total, blocks, largest = parameter_bytes(expert), sum(per_block), max(per_block)
    return ExpertBytes(
        total=total,
        blocks=blocks,
        largest_block=largest,
        largest_layer_compute=max(linear_sizes) * compute,
        parameters=sum(p.numel() for p in expert.parameters()),
    )


def expert_activation_bytes(
    config: dict, latent_grid: tuple[int, int, int], tokens: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16
) -> int:
    return _expert_activation_bytes(json.dumps(config, sort_keys=True), tuple(latent_grid), tokens, batch, dtype)


expert_activation_bytes.__doc__ = """Peak bytes of one expert forward's own tensors at `tokens` sequence length: a one-layer copy of the expert on
    meta tensors, the target of latent size `latent_grid` (T, H, W) plus condition frames of the same size making up
    the other `tokens`."""


@functools.lru_cache(maxsize=64)
def _expert_activation_bytes(config_json: str, latent_grid, tokens: int, batch: int, dtype: torch.dtype) -> int:
    config = json.loads(config_json)
    expert = _meta_expert(config, dtype, num_layers=1)
    p_t, p_h, p_w = config.get("patch_size", (1, 2, 2))
    t, h, w = latent_grid
    per_frame = (h // p_h) * (w // p_w)
    target = (t // p_t) * per_frame
    extra_frames = -(-max(tokens - target, 0) // per_frame)
    channels = config.get("in_channels", 16)
    meta = {"device": "meta", "dtype": dtype}
    latents = torch.empty(batch, channels, t, h, w, **meta)
    text = torch.empty(batch, TEXT_TOKENS, config.get("text_dim", 4096), **meta)
    timestep = torch.empty(batch, device="meta", dtype=torch.float32)
    conditions = [torch.empty(1, channels, extra_frames, h, w, **meta)] if extra_frames else None
    ids = [1.0] if extra_frames else None

    def run():
        return expert(
            hidden_states=latents, timestep=timestep, encoder_hidden_states=text, condition_latents=conditions,
            condition_source_ids=ids, return_dict=False,
        )[0]

    return _peak_bytes(run)


@functools.lru_cache(maxsize=64)
def _vae_decode_bytes(config_json: str, latent_grid: tuple[int, int, int]) -> int:
    vae = _meta_vae(json.loads(config_json))
    t, h, w = latent_grid

    def peak(frames: int) -> int:
        latents = torch.empty(1, vae.config.z_dim, frames, h, w, device="meta")
        return _peak_bytes(lambda: vae.decode(latents, return_dict=False)[0])

    if t <= 4:
        return peak(t)
    three, four = peak(3), peak(4)
    return three + (four - three) * (t - 3)


def vae_decode_bytes(config: dict, latent_grid: tuple[int, int, int]) -> int:
    """Peak bytes of the VAE decode's own tensors for a `latent_grid` (T, H, W) latent, float32: measured on meta
    tensors at 3 and 4 latent frames and extrapolated linearly in frames past 4 (the decoder runs frame by frame with
    a fixed cache, so only the output grows with T; at the A14B config's 480p, 21 frames measured whole give the
    extrapolated figure to the byte)."""
    return _vae_decode_bytes(json.dumps(config, sort_keys=True), tuple(latent_grid))


@functools.lru_cache(maxsize=64)
def _component_bytes(kind: str, config_json: str, dtype: torch.dtype) -> int:
    config = json.loads(config_json)
    return parameter_bytes(_meta_text_encoder(config, dtype) if kind == "text_encoder" else _meta_vae(config))


@functools.lru_cache(maxsize=64)
def _text_encoder_activation_bytes(config_json: str, dtype: torch.dtype) -> int:
    encoder = _meta_text_encoder(json.loads(config_json), dtype, num_layers=1)
    ids = torch.zeros(1, TEXT_TOKENS, dtype=torch.long, device="meta")
    # no mask: reading one is data-dependent (not possible on meta tensors), and a full one allocates the same
    return _peak_bytes(lambda: encoder(input_ids=ids).last_hidden_state)


def text_encoder_activation_bytes(config: dict, dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak bytes of one UMT5 encoder forward at 512 tokens (a one-layer copy on meta tensors)."""
    return _text_encoder_activation_bytes(json.dumps(config, sort_keys=True), dtype)


# ------------------------------------------------------------------------------------------------ the plan


@dataclass
class MemoryPlan:
    """What a call needs at its peak, in bytes, and whether it fits.

    `gpu_bytes` is None on the CPU (everything is host RAM there). `parts` names each term in bytes; `fits_gpu` and
    `fits_ram` are None when the available memory is unknown.
    """

    model: str
    memory_profile: str
    checkpoint_format: str
    device: str
    tokens: int
    latent_grid: tuple[int, int, int]
    shard_degree: int
    gpu_bytes: int | None
    ram_bytes: int
    parts: dict[str, int]
    gpu_available: int | None = None
    ram_available: int | None = None

    @property
    def fits_gpu(self) -> bool | None:
        if self.gpu_bytes is None or self.gpu_available is None:
            return None
        return self.gpu_bytes <= self.gpu_available

    @property
    def fits_ram(self) -> bool | None:
        return None if self.ram_available is None else self.ram_bytes <= self.ram_available

    @property
    def fits(self) -> bool | None:
        answers = [a for a in (self.fits_gpu, self.fits_ram) if a is not None]
        return all(answers) if answers else None

    def __str__(self) -> str:
        def gb(n):
            if n is None:
                return "-"
            return f"{n / GB:.1f} GB" if n >= GB / 10 else f"{n / 1e6:.1f} MB"

        def verdict(need, have, fits):
            if need is None:
                return "n/a (runs on the CPU)"
            if fits is None:
                return f"{gb(need)} (available: unknown)"
            return f"{gb(need)} of {gb(have)}: {'fits' if fits else 'does NOT fit'}"

        t, h, w = self.latent_grid
        lines = [
            f"memory plan: model {self.model}, profile {self.memory_profile}, experts {self.checkpoint_format}, "
            f"device {self.device}" + (f", {self.shard_degree} shards" if self.shard_degree > 1 else ""),
            f"  call: {self.tokens} tokens per forward (latent {t}x{h}x{w})",
            f"  peak GPU memory: {verdict(self.gpu_bytes, self.gpu_available, self.fits_gpu)}",
            f"  peak host RAM:   {verdict(self.ram_bytes, self.ram_available, self.fits_ram)}",
            "  parts: " + ", ".join(f"{name} {gb(value)}" for name, value in self.parts.items()),
        ]
        return "\n".join(lines)


def _detected(device: torch.device, gpu_memory: float | None, ram: float | None) -> tuple[int | None, int | None]:
    gpu = None if gpu_memory is None else int(gpu_memory * GB)
    if gpu is None and device.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.mem_get_info(device)[1]
    return gpu, int(ram * GB) if ram is not None else psutil.virtual_memory().total


def _process_bytes() -> int:
    return psutil.Process().memory_info().rss


def _positive(name: str, value, kind=float):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"`{name}`={value!r} must be a positive number.")
    if kind is int and value != int(value):
        raise ValueError(f"`{name}`={value!r} must be a positive integer.")
    return kind(value)


def estimate_memory(
    model: str | os.PathLike | ModelConfigs = "A14B",
    *,
    tokens: int,
    latent_grid: tuple[int, int, int],
    batch: int = 1,
    memory_profile: str = "resident",
    checkpoint_format: str = "bf16",
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    shard_degree: int = 1,
    gpu_memory: float | None = None,
    ram: float | None = None,
) -> MemoryPlan:
    """The memory plan of one call (see the module docstring); `BerniniPipeline.estimate_memory` works out `tokens`
    and `latent_grid` from a call's arguments.

    Args:
        model: `"A14B"`, `"1.3B"`, a local model folder, a released repo id, or `ModelConfigs`.
        tokens: the sequence length of the call's widest forward (every stream).
        latent_grid: the target's latent (T, H, W).
        batch: videos per call.
        memory_profile: a memory profile name (`memory.MEMORY_PROFILES`).
        checkpoint_format: the experts' weights in memory: fp32, bf16, fp16, fp8, Q8_0, Q6_K, Q5_K, Q4_K, Q4_0.
        dtype: the compute dtype of the experts and the text encoder (bf16 on GPUs).
        device: where the call computes; on the CPU every byte is host RAM.
        shard_degree: FSDP ranks sharing each expert's weights (the device holds 1/N of an expert plus a block).
        gpu_memory, ram: the memory available, in GB (1e9 bytes); detected when None.
    """
    profile = get_memory_profile(memory_profile)
    configs = model_configs(model)
    shard_degree = _positive("shard_degree", shard_degree, int)
    if shard_degree > 1:
        check_sharded_profile(profile.name)
    gpu_memory, ram = _positive("gpu_memory", gpu_memory), _positive("ram", ram)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"`device`={device!r} is not a torch device; use cpu, cuda, cuda:N.") from None
    fmt = "fp8" if profile.fp8 and checkpoint_format in PLAIN_FORMATS else checkpoint_format
    if shard_degree > 1 and checkpoint_format in GGUF_BLOCKS:
        if profile.fp8:
            raise ValueError(
                f"`memory_profile`={profile.name!r}: a GGUF expert is already quantized; sharded, it is held "
                "dequantized in the compute dtype, and the fp8 profile does not apply to it."
            )
        # FSDP2 cannot shard GGUF's packed blocks: a sharded GGUF expert is held dequantized in the compute dtype.
        fmt = {torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, "bf16")
    expert = expert_bytes(configs.transformer, fmt, dtype)
    # A plain file under an fp8 profile is read in its dtype, then cast: the load holds the file's bytes.
    loaded = expert_bytes(configs.transformer, checkpoint_format, dtype) if checkpoint_format != fmt else expert
    text_encoder = _component_bytes("text_encoder", json.dumps(configs.text_encoder, sort_keys=True), dtype)
    vae = _component_bytes("vae", json.dumps(configs.vae, sort_keys=True), torch.float32)  # the VAE stays float32
    t, h, w = latent_grid
    channels = configs.transformer.get("in_channels", 16)
    loop = LOOP_LATENT_COPIES * batch * channels * t * h * w * 4
    forward = expert_activation_bytes(configs.transformer, latent_grid, tokens, batch, dtype)
    forward += expert.largest_layer_compute if fmt not in PLAIN_FORMATS else 0  # the layer cast back to compute
    decode = vae_decode_bytes(configs.vae, latent_grid) * batch
    # the decoded video back on the host: float32 frames and their postprocessed copy (4k+1 frames, 8x the latent)
    video = 2 * batch * 3 * ((t - 1) * 4 + 1) * (8 * h) * (8 * w) * 4
    encode = text_encoder_activation_bytes(configs.text_encoder, dtype)
    process = _process_bytes()
    experts = configs.num_experts

    # Per rank: 1/N of an expert's weights, plus one block gathered whole while it runs; the text encoder likewise
    # (its root holds the token embedding, gathered while it encodes).
    expert_device = expert.total if shard_degree == 1 else expert.total // shard_degree + expert.largest_block
    text_encoder_device = text_encoder
    if shard_degree > 1:
        embedding = configs.text_encoder["vocab_size"] * configs.text_encoder["d_model"] * dtype.itemsize
        block = (text_encoder - embedding) // configs.text_encoder["num_layers"]
        text_encoder_device = text_encoder // shard_degree + embedding + block
    non_block = expert.total - expert.blocks
    phases = {  # what the device holds while each component runs, for the one-component-at-a-time placements
        "text encoder": text_encoder_device + encode,
        "expert": expert_device + forward + loop,
        "VAE decode": vae + decode + loop,
    }
    if profile.placement == "resident":
        gpu = text_encoder_device + experts * expert_device + vae + max(encode, forward + loop, decode + loop)
    elif profile.placement in ("expert_offload", "low_ram"):
        gpu = max(phases.values())
    else:  # group_offload: the text encoder as one group; an expert's non-block weights and two blocks; VAE layers
        gpu = max(text_encoder + encode, non_block + 2 * expert.largest_block + forward + loop, decode + loop)

    # Host RAM: on the CPU the activations of each phase are host RAM too; on an accelerator the decoded video comes
    # back to the host at the end.
    on_cpu = device.type == "cpu"
    # Casting a plain file to float8 (layer by layer, diffusers' layerwise casting) makes the float8 copy of each
    # expert next to its loaded tensors. Those are views of the memory-mapped file, and the layers kept in full
    # precision (norms, embeddings, proj_out) stay views of it: the whole file stays mapped, the pages the cast read
    # stay resident, as long as the expert lives on the CPU (measured: bench_low_ram.py).
    cast = expert.total if loaded is not expert else 0
    if shard_degree > 1:
        # `from_pretrained_sharded`: each rank reads only its rows of each tensor (cast to float8 row by row for the
        # fp8 profiles) straight into its shards, which stay on the host only under expert_offload or on the CPU.
        shards = experts * (expert.total // shard_degree + expert.largest_block)
        held = shards if on_cpu or profile.placement == "expert_offload" else 0
        host = text_encoder + vae + held + (max(encode, forward + loop, decode + loop) if on_cpu else 0)
    elif profile.at_load:
        # one component at a time: the text encoder while it encodes, then one expert (read from its file), then the
        # VAE; the VAE stays loaded (it also encodes the source media)
        host = max(
            text_encoder + vae + (encode if on_cpu else 0),
            loaded.total + cast + vae + (forward + loop if on_cpu else 0),
            vae + (decode + loop if on_cpu else 0),
        )
    else:
        load = text_encoder + experts * (loaded.total + cast) + vae
        # on the CPU the cast experts keep their files mapped (above); on a GPU they leave the host after the load
        run = load if on_cpu and cast else text_encoder + experts * expert.total + vae
        if on_cpu and profile.placement == "expert_offload":
            # diffusers' model offload runs on `cpu:0`, which torch does not take for `cpu`: every hook's `.to` copies
            # the whole component, and the expert's old (file-mapped) storage lives until the copy ends
            run += expert.total
        host = max(load, run + (max(encode, forward + loop, decode + loop) if on_cpu else 0))
    ram_bytes, gpu_bytes = process + host, (None if on_cpu else gpu)
    if not on_cpu:
        ram_bytes += video
    gpu_available, ram_available = _detected(device, gpu_memory, ram)
    parts = {
        f"expert ({fmt})": expert.total,
        "text encoder": text_encoder,
        "VAE": vae,
        "forward activations": forward,
        "VAE decode": decode,
        "loop latents": loop,
        "decoded video": video,
        "this process": process,
    }
    return MemoryPlan(
        model=configs.name,
        memory_profile=profile.name,
        checkpoint_format=fmt,
        device=str(device),
        tokens=tokens,
        latent_grid=tuple(latent_grid),
        shard_degree=shard_degree,
        gpu_bytes=gpu_bytes,
        ram_bytes=ram_bytes,
        parts=parts,
        gpu_available=gpu_available if device.type != "cpu" else None,
        ram_available=ram_available,
    )
