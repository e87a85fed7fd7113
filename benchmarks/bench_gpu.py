"""Bernini-R at the real 14B size on one GPU: seconds per step, forwards, peak memory and the attention share, per
guidance mode, attention backend, compile setting, memory profile and step-cache preset.

Both experts are built at the Wan2.2-T2V-A14B transformer config with random weights created directly on the GPU (no
download), in bf16. The media I/O and the VAE are replaced by random condition latents of the sizes the VAE gives at
480x848x81, and the text by random embeddings (1, 512, 4096): what is timed is `BerniniPipeline.__call__`'s denoising
loop, each step being the guidance mode's distinct transformer forwards, as the pipeline packs them.

Rows (each in one run, a few steps each; `--plan` prints the estimate without running anything):
  modes     t2v, v2v_apg and rv2v with the default attention backend, eager, every weight on the GPU
  backends  t2v with each attention backend present (sdpa, _native_flash, _native_cudnn, fa2, fa3, sage)
  cache     t2v with each step-cache preset (`pipe.enable_cache_preset`): forwards skipped
  compile   t2v with regional compilation of both experts (`pipe.compile()`), after a warm-up call
  memory    t2v with each memory profile (`pipe.enable_memory_profile`), on a freshly built pipeline each
A feature whose API this checkout lacks gives a "skipped: ... not available" row. The attention/rest split of the mode
rows comes from a torch.profiler pass over their timed call (device time of the attention kernels over all kernel
time); the other rows are not profiled (the profiler's event processing costs more than their steps).

A GPU lent for 15 minutes, at most 10 per command, runs the default in two parts of about 6 minutes each
(scripts/gpu_check.sh, docs/gpu-check.md): `--part 1` the modes, backends and compile rows, `--part 2` the memory
profiles and cache presets. The JSON is rewritten after every row, so a run killed at the command limit keeps what it
measured; past `--deadline_s` the remaining rows are skipped and reported as such. The `group_offload` row pins a host
copy of every block (torch's pinned allocator rounds each tensor up to a power of two: about 41 GiB per 14B expert),
so it runs only when the host has that much memory free.

The FLOP model (`step_flops`) prints, per mode, its ratio to plain Wan2.2 t2v at the same size and the official
Wan2.2 t2v figure scaled by that ratio: an estimate from the model, not a measurement.

Run:  python benchmarks/bench_gpu.py [--part 1|2] [--quick] [--groups modes,compile] [--json out.json] [--deadline_s S]
      python benchmarks/bench_gpu.py --plan [--part 1|2]
      python benchmarks/bench_gpu.py --tiny      # the same code on the CPU with the tiny model (the test suite's run)
Without a CUDA device (and without --tiny or --plan) it prints one line and exits with status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import logging
import math
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
from _common import environment, print_table, synchronize
from diffusers.models.attention_dispatch import (
    _AttentionBackendRegistry,
    dispatch_attention_fn,
)
from PIL import Image

from bernini_diffusers import BerniniPipeline, BerniniTransformer3DModel
from bernini_diffusers.attention import available_backends, resolve_attention_backend
from bernini_diffusers.constants import ATTENTION_BACKENDS
from bernini_diffusers.guidance import GUIDANCE_SPECS, Combo
from bernini_diffusers.scheduling import default_scheduler
from bernini_diffusers.tasks import GuidanceMode
from bernini_diffusers.tiny import (
    TINY_TRANSFORMER_CONFIG,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_vae,
)

try:  # the step-cache presets; absent from a checkout without them, whose cache rows are then skipped
    from bernini_diffusers.acceleration import CACHE_PRESETS, calibrate_magcache
except ImportError:
    CACHE_PRESETS, calibrate_magcache = None, None
try:
    from bernini_diffusers.memory import MEMORY_PROFILES
except ImportError:
    MEMORY_PROFILES = None

# The transformer config of both Wan2.2-T2V-A14B experts (Wan-AI/Wan2.2-T2V-A14B-Diffusers, transformer/ and
# transformer_2/config.json; the official code's wan/configs/wan_t2v_A14B.py: dim 5120, ffn_dim 13824, freq_dim 256,
# num_heads 40, num_layers 40, qk_norm, cross_attn_norm, eps 1e-6; diffusers' WanTransformer3DModel defaults for the
# rest). 14.3B parameters each.
WAN22_A14B_CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}

# The official anchor: Wan2.2-T2V-A14B, 480p (81 frames), 40 steps of plain CFG (two forwards per step) on one H100.
ANCHOR = {"seconds": 326.9, "steps": 40, "forwards_per_step": 2, "gpu": "1x H100", "size": "480x848x81"}
OFFICIAL_STEPS = 40
TEXT_LEN = 512  # the renderer always pads the text to 512 tokens

MODES = ("t2v", "v2v_apg", "rv2v")
TASK_OF_MODE = {"t2v": "t2v", "v2v_apg": "v2v", "rv2v": "rv2v"}
SWEEP_MODE = "t2v"  # the feature rows run the cheapest mode; its attention share is already about half the time
GROUPS = ("modes", "backends", "cache", "compile", "memory")
DEFAULT_MEMORY_PROFILES = ("expert_offload", "group_offload", "fp8")  # `resident` is the baseline rows' placement
# diffusers backend names this package has no short name for; probed with one tiny attention call
DIFFUSERS_ONLY_BACKENDS = ("_native_flash", "_native_cudnn")
HIGH_NOISE_SEED, LOW_NOISE_SEED = 1, 2

# Fixed costs of the run-time estimate (seconds on one H100, assumptions, not measurements): building both experts
# on the GPU, one regional compile of the transformer block, and copying both experts' 57 GB to the host for an
# offload profile (plus rebuilding them first).
BUILD_S, COMPILE_S, OFFLOAD_SETUP_S = 20.0, 60.0, 15.0
BUDGET_S = 8 * 60
# The default run split in two commands, each within this estimate (a lent GPU runs at most 10 minutes per command,
# with the GPU tests and the start-up around it).
PARTS = {1: ("modes", "backends", "compile"), 2: ("memory", "cache")}
PART_BUDGET_S = 6 * 60
PLAN_BACKENDS = ("sdpa", "_native_flash", "_native_cudnn", "fa2", "fa3")
PLAN_CACHE_PRESETS = ["fbc-safe", "fbc-fast", "taylorseer", "magcache"]
CALIBRATED_PRESETS = (
    {name for name, preset in CACHE_PRESETS.items() if getattr(preset, "needs_calibration", False)}
    if CACHE_PRESETS is not None
    else {"magcache"}
)
# Attention kernels in a profile: torch's SDPA variants, flash-attn 2/3, cuDNN and efficient SDPA, SageAttention.
ATTENTION_OP = re.compile(r"attention|attn|flash|fmha|sdpa|sage", re.IGNORECASE)


@dataclass(frozen=True)
class Geometry:
    """The clip: output frames, height and width in pixels, the reference images of rv2v (each at the clip's size,
    one latent frame) and the text tokens."""

    frames: int = 81
    height: int = 480
    width: int = 848
    references: int = 2
    text_len: int = TEXT_LEN

    def latent(self, frames: int | None = None) -> tuple[int, int, int, int]:
        frames = self.frames if frames is None else frames
        return (16, (frames - 1) // 4 + 1, self.height // 8, self.width // 8)

    def stream_tokens(self, patch_size=(1, 2, 2)) -> dict[str, int]:
        """Tokens of the target, the source video and one reference image."""

        def tokens(latent):
            return math.prod(size // p for size, p in zip(latent[1:], patch_size))

        return {"target": tokens(self.latent()), "video": tokens(self.latent()), "reference": tokens(self.latent(1))}


REAL_GEOMETRY = Geometry()
# 32 text tokens: at 512 the tiny model's cross-attention would outweigh its 72-168 video tokens many times over
TINY_GEOMETRY = Geometry(frames=9, height=64, width=96, references=2, text_len=32)


# ------------------------------------------------------------------------------------------------ FLOP model


def forward_flops(config: dict, tokens: int, target_tokens: int | None = None, text_len: int = TEXT_LEN) -> dict:
    """Multiply-add FLOPs (2 per MAC) of one expert forward over a packed sequence of `tokens`.

    Per block: self-attention projections 4 x 2*S*D^2 and core 4*S^2*D (QK^T and AV); cross-attention projections of
    the tokens 2 x 2*S*D^2, of the text 2 x 2*T*D^2, core 4*S*T*D; the feed-forward 2 x 2*S*D*F. Outside the blocks:
    the patch embedding, the text and time embedders, the output head (on the target tokens). Norms, RoPE, modulation and
    the softmax are left out: memory-bound and a few percent of the time at most.
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    f, layers, s, t = config["ffn_dim"], config["num_layers"], tokens, text_len
    patch = math.prod(config["patch_size"])
    target_tokens = tokens if target_tokens is None else target_tokens
    attention = layers * (4 * s * s * d + 4 * s * t * d)
    blocks_linear = layers * (2 * s * 4 * d * d + 2 * s * 2 * d * d + 2 * t * 2 * d * d + 2 * s * 2 * d * f)
    outside = (
        2 * s * config["in_channels"] * patch * d  # patch embedding
        + 2 * t * (config["text_dim"] * d + d * d)  # text embedder
        + 2 * (config["freq_dim"] * d + d * d + d * 6 * d)  # time embedder and its projection (once per forward)
        + 2 * target_tokens * d * config["out_channels"] * patch  # output head
    )
    linear = blocks_linear + outside
    return {"attention": attention, "linear": linear, "total": attention + linear}


def branch_tokens(mode: str, geometry: Geometry, patch_size=(1, 2, 2)) -> list[int]:
    """Sequence length of each distinct forward of one step of `mode` on its task's media (t2v: none; v2v_apg: the
    source video; rv2v: the video and the reference images), as the pipeline packs the streams."""
    per = geometry.stream_tokens(patch_size)
    references = geometry.references if TASK_OF_MODE[mode] == "rv2v" else 0
    target, video, refs = per["target"], per["video"], per["reference"] * references
    combo_tokens = {Combo.NONE: target, Combo.V: target + video, Combo.I: target + refs, Combo.VI: target + video + refs}
    # With every medium present the combos differ, so each branch is its own forward (shared forwards: docs/design.md)
    distinct = {(b.combo, b.positive) for b in GUIDANCE_SPECS[GuidanceMode(mode)].branches}
    return sorted(combo_tokens[combo] for combo, _ in distinct)


def step_flops(mode: str, geometry: Geometry = REAL_GEOMETRY, config: dict = WAN22_A14B_CONFIG) -> dict:
    """FLOPs of one denoising step of `mode` (all its distinct forwards) and the attention part of them."""
    target = geometry.stream_tokens(config["patch_size"])["target"]
    tokens = branch_tokens(mode, geometry, config["patch_size"])
    parts = [forward_flops(config, s, target, geometry.text_len) for s in tokens]
    return {key: sum(p[key] for p in parts) for key in ("attention", "linear", "total")}


def flop_model(geometry: Geometry = REAL_GEOMETRY, config: dict = WAN22_A14B_CONFIG) -> dict[str, dict]:
    """Per mode: tokens per forward, FLOPs per step, the ratio to plain Wan2.2 t2v at the same size, and the official
    anchor scaled by that ratio (seconds per step and per 40-step call). A model-based estimate."""
    base = step_flops("t2v", geometry, config)["total"]
    anchor_step = ANCHOR["seconds"] / ANCHOR["steps"]
    model = {}
    for mode in MODES:
        flops = step_flops(mode, geometry, config)
        ratio = flops["total"] / base
        model[mode] = {
            "tokens_per_forward": branch_tokens(mode, geometry, config["patch_size"]),
            "forwards_per_step": len(branch_tokens(mode, geometry, config["patch_size"])),
            "tflop_per_step": flops["total"] / 1e12,
            "attention_flop_share": flops["attention"] / flops["total"],
            "ratio_to_wan_t2v": ratio,
            "estimated_s_per_step": anchor_step * ratio,
            "estimated_s_per_40_steps": ANCHOR["seconds"] * ratio,
        }
    return model


# ------------------------------------------------------------------------------------------------ plan


@dataclass
class Row:
    group: str
    mode: str
    backend: str
    steps: int
    compile: bool = False
    memory_profile: str = "resident"
    cache_preset: str | None = None
    warmup_steps: int = 0
    result: dict = field(default_factory=dict)

    def label(self) -> dict:
        return {
            "group": self.group, "mode": self.mode, "backend": self.backend, "compile": self.compile,
            "memory_profile": self.memory_profile, "cache_preset": self.cache_preset, "steps": self.steps,
            "warmup_steps": self.warmup_steps,
        }  # fmt: skip


def present_backends(device: torch.device, dtype: torch.dtype) -> dict[str, bool]:
    """Each attention backend worth a row and whether it runs here: the package's names (sdpa, fa2, fa3, and any
    other it knows) and diffusers' own torch-native variants."""
    found = {name: ok for name, ok in available_backends().items()}
    for name in DIFFUSERS_ONLY_BACKENDS:
        found[name] = _native_backend_runs(name, device, dtype)
    return found


def _native_backend_runs(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    q = torch.randn(1, 64, 2, 128, device=device, dtype=dtype)  # diffusers' layout: (batch, tokens, heads, dim)
    try:
        dispatch_attention_fn(q, q, q, backend=name)
    except Exception:  # noqa: BLE001 - any failure (no kernel for this device or dtype) means absent
        return False
    return True


def plan_rows(args, backends: dict[str, bool], baseline: str, cache_presets: list[str] | None) -> list[Row]:
    """The rows of a run: `backends` (name -> present) gives the backend rows, `cache_presets` the cache rows
    (None: one row that reports the presets missing)."""
    steps, short_steps, cache_steps = args.steps, args.short_steps, args.cache_steps
    rows: list[Row] = []
    groups = args.groups
    if "modes" in groups:
        for mode in MODES:
            rows.append(Row("modes", mode, baseline, steps if mode == SWEEP_MODE else short_steps))
    if "backends" in groups:
        for name in args.backends or [n for n in backends if n != baseline]:
            rows.append(Row("backends", SWEEP_MODE, name, short_steps))
    if "cache" in groups:
        presets = args.cache_presets or cache_presets or ["-"]
        for preset in presets:
            rows.append(Row("cache", SWEEP_MODE, baseline, cache_steps, cache_preset=preset))
    if "compile" in groups:
        # the warm-up call compiles; the timed step then runs the same expert, as every later step would
        rows.append(Row("compile", SWEEP_MODE, baseline, short_steps, compile=True, warmup_steps=1))
    if "memory" in groups:
        for profile in args.memory_profiles:
            # model offload costs a swap at the expert switch, so its rows cross it; the others run one step
            rows.append(Row("memory", SWEEP_MODE, baseline, steps if "expert_offload" in profile else short_steps,
                            memory_profile=profile))  # fmt: skip
    return rows


def estimate_seconds(rows: list[Row], model: dict) -> float:
    """Run time of `rows` on one H100 from the FLOP model at the anchor's throughput, plus the fixed costs."""
    total = BUILD_S
    for row in rows:
        step = model[row.mode]["estimated_s_per_step"]
        total += (row.steps + row.warmup_steps) * step
        total += COMPILE_S if row.compile else 0.0
        if row.cache_preset in CALIBRATED_PRESETS:
            total += row.steps * step  # the uncached calibration call
        if row.group == "memory":
            total += BUILD_S + (OFFLOAD_SETUP_S if "offload" in row.memory_profile else 0.0)
    return total


# ------------------------------------------------------------------------------------------------ building


def build_expert(config: dict, device: torch.device, dtype: torch.dtype, seed: int) -> BerniniTransformer3DModel:
    """An expert with random weights allocated on `device` in `dtype` from the start, as `from_pretrained(
    torch_dtype=dtype)` leaves it: the `_keep_in_fp32_modules` (RoPE, time embedder, norms, modulation) in float32."""
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    # An expert built in float32 and cast afterwards would need 57 GB for a moment; allocate in `dtype` directly.
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            expert = BerniniTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(default_dtype)
    keep = set(expert._keep_in_fp32_modules or [])
    for name, tensor in [*expert.named_parameters(), *expert.named_buffers()]:
        if tensor.is_floating_point() and keep.intersection(name.split(".")):
            tensor.data = tensor.data.float()
    return expert.eval()


def expert_gib(config: dict, dtype: torch.dtype) -> float:
    """GiB of one expert's weights in `dtype` (counted on the meta device, nothing allocated)."""
    with torch.device("meta"):
        numel = sum(p.numel() for p in BerniniTransformer3DModel(**config).parameters())
    return numel * torch.finfo(dtype).bits / 8 / 2**30


def device_gib(device: torch.device) -> float | None:
    return torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None


def build_pipeline(config: dict, device: torch.device, dtype: torch.dtype, *, offload: bool = False) -> BerniniPipeline:
    """Both experts at `config`; the tiny tokenizer, text encoder and VAE stand in for UMT5 and the Wan VAE, which the
    benchmark never runs (random text embeddings and condition latents are given instead).

    The experts are built on `device`. With `offload` (a profile that keeps them in host memory) each one moves to the
    CPU as soon as it is built, so the GPU never holds more than one; on a GPU too small for one expert they are built
    on the CPU (slower: the random initialisation then runs on the host)."""
    build_on = device
    if offload and device.type == "cuda" and device_gib(device) < 1.1 * expert_gib(config, dtype):
        build_on = torch.device("cpu")
    experts = []
    for seed in (HIGH_NOISE_SEED, LOW_NOISE_SEED):
        expert = build_expert(config, build_on, dtype, seed)
        experts.append(expert.to("cpu") if offload else expert)
        del expert
    tokenizer = tiny_tokenizer()
    return BerniniPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(len(tokenizer)),
        vae=tiny_vae(),
        scheduler=default_scheduler(),
        transformer=experts[0],
        transformer_2=experts[1],
        boundary_ratio=0.875,
    )


def stub_media(pipe: BerniniPipeline, geometry: Geometry, seed: int) -> None:
    """Replace the pipeline's media reading and VAE encoding: each condition becomes a random normalised latent of the
    size the VAE would give (a video `[1, 16, 21, 60, 106]` at 480x848x81, a reference one latent frame)."""

    def load_media(videos, image, images, max_image_size, fps, num_frames, windowed=False):
        # Zero-stride placeholders: only their shapes are read (output geometry, then `encode_condition`).
        blank = torch.zeros(())
        video_pixels = [blank.expand(3, geometry.frames, geometry.height, geometry.width) for _ in videos]
        references = [blank.expand(3, 1, geometry.height, geometry.width) for _ in images or []]
        return video_pixels, None, references

    generator = torch.Generator().manual_seed(seed)

    def encode_condition(pixels, device):
        _, frames, height, width = pixels.shape
        shape = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
        return torch.randn(shape, generator=generator).to(device)

    pipe.load_media = load_media
    pipe.encode_condition = encode_condition


def call_arguments(mode: str, geometry: Geometry, text_dim: int, device, dtype, seed: int) -> dict:
    """The pipeline call of one mode: random text embeddings, placeholder media (see `stub_media`), latent output."""
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(2, geometry.text_len, text_dim, generator=generator).to(device, dtype)
    task = TASK_OF_MODE[mode]
    media: dict = {}
    if task in ("v2v", "rv2v"):
        media["video"] = np.zeros((geometry.frames, 16, 16, 3), dtype=np.uint8)  # a token; `stub_media` sizes it
    if task == "rv2v":
        media["images"] = [Image.new("RGB", (16, 16)) for _ in range(geometry.references)]
    return dict(
        task_type=task,
        guidance_mode=mode,
        prompt_embeds=embeds[:1],
        negative_prompt_embeds=embeds[1:],
        num_frames=geometry.frames,
        height=geometry.height,
        width=geometry.width,
        output_type="latent",
        **media,
    )


# ------------------------------------------------------------------------------------------------ measuring


class Probe:
    """Counts the experts' forwards, the forwards that ran the last block's feed-forward (a step cache skips it), and
    the wall time of each denoising step (the first forward starts step 0; `on_step_end` closes each step)."""

    def __init__(self, pipe: BerniniPipeline, device: torch.device, count_computed: bool):
        self.device = device
        self.forwards = 0
        self.computed = 0
        self.count_computed = count_computed
        self.step_ends: list[float] = []
        self.step_counts: list[tuple[int, int]] = []  # (forwards, computed) at the end of each step
        self.start: float | None = None
        self.handles = []
        for expert in (pipe.transformer, pipe.transformer_2):
            self.handles.append(expert.register_forward_pre_hook(self._on_forward))
            if count_computed:
                # a hook inside a compiled block would be traced into it, so compiled rows do not count this
                last_linear = [m for m in expert.blocks[-1].ffn.modules() if isinstance(m, torch.nn.Linear)][-1]
                self.handles.append(last_linear.register_forward_pre_hook(self._on_computed))

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _on_forward(self, module, args):
        if self.start is None:
            self.start = self._sync()
        self.forwards += 1

    def _on_computed(self, module, args):
        self.computed += 1

    def on_step_end(self, pipe, step, timestep, callback_kwargs):
        self.step_ends.append(self._sync())
        self.step_counts.append((self.forwards, self.computed))
        return {}

    def skipped_per_step(self) -> list[int]:
        """Forwards of each step whose last block did not run."""
        edges = [(0, 0), *self.step_counts]
        return [(f1 - f0) - (c1 - c0) for (f0, c0), (f1, c1) in itertools.pairwise(edges)]

    def step_seconds(self) -> list[float]:
        edges = [self.start, *self.step_ends]
        return [b - a for a, b in itertools.pairwise(edges)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def attention_share(prof, device: torch.device) -> float | None:
    """Attention's share of the profiled call. On CUDA: the kernel time of the outermost attention ops over the time
    of every kernel and copy on the device; on the CPU: their CPU time over that of the top-level ops."""
    cpu, events = torch.autograd.DeviceType.CPU, prof.events()
    # The event list holds the ops (CPU events, each with the kernels it launched) and the kernels themselves
    # (device events); an op's device time includes its children's, so only the outermost matching op counts.
    ops = [e for e in events if e.device_type == cpu]

    def outermost(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if ATTENTION_OP.search(parent.name):
                return False
            parent = parent.cpu_parent
        return True

    matches = [e for e in ops if ATTENTION_OP.search(e.name) and outermost(e)]
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type != cpu]
        total = sum(e.device_time_total for e in kernels)
        attention = sum(e.device_time_total for e in matches)
        if attention == 0:  # kernels launched outside any recorded op (compiled code): go by the kernel names
            attention = sum(e.device_time_total for e in kernels if ATTENTION_OP.search(e.name))
    else:
        attention = sum(e.cpu_time_total for e in matches)
        total = sum(e.cpu_time_total for e in ops if e.cpu_parent is None)
    return attention / total if total > 0 else None


def apply_backend(pipe: BerniniPipeline, name: str) -> None:
    if name in ATTENTION_BACKENDS:
        pipe.set_attention_backend(name)
    else:  # a diffusers name the package has no alias for
        modeling_logger = logging.getLogger("diffusers.models.modeling_utils")
        level = modeling_logger.level
        modeling_logger.setLevel(logging.ERROR)  # its "experimental feature" warning on every call
        # ModelMixin.set_attention_backend also makes the choice process-wide; keep it the experts' own
        process_wide = _AttentionBackendRegistry._active_backend
        try:
            for expert in (pipe.transformer, pipe.transformer_2):
                expert.set_attention_backend(name)
        finally:
            _AttentionBackendRegistry.set_active_backend(process_wide)
            modeling_logger.setLevel(level)


def run_row(row: Row, pipe: BerniniPipeline, ctx: dict) -> dict:
    """Time one configuration on `pipe` (already set up for its memory profile); returns its figures."""
    device, dtype, geometry, config = ctx["device"], ctx["dtype"], ctx["geometry"], ctx["config"]
    apply_backend(pipe, row.backend)
    arguments = call_arguments(row.mode, geometry, config["text_dim"], device, dtype, ctx["seed"])
    result: dict = {}
    if row.warmup_steps:
        start = time.perf_counter()
        pipe(**arguments, num_inference_steps=row.warmup_steps, generator=torch.Generator().manual_seed(ctx["seed"]))
        synchronize(device)
        result["warmup_seconds"] = time.perf_counter() - start
    probe = Probe(pipe, device, count_computed=not row.compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        result["resident_gib_before"] = torch.cuda.memory_allocated(device) / 2**30
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiled = ctx["profile"] and row.group == "modes"  # the split is reported for the mode rows only
    profiler = torch.profiler.profile(activities=activities) if profiled else contextlib.nullcontext()
    try:
        with profiler as prof:
            pipe(
                **arguments,
                num_inference_steps=row.steps,
                generator=torch.Generator().manual_seed(ctx["seed"]),
                callback_on_step_end=probe.on_step_end,
            )
    finally:
        probe.remove()
    seconds = probe.step_seconds()
    ends = [0, *(forwards for forwards, _ in probe.step_counts)]
    per_step_forwards = [b - a for a, b in itertools.pairwise(ends)]
    per_step = statistics.median(seconds)
    share = attention_share(prof, device) if profiled else None
    flops = step_flops(row.mode, geometry, config)
    result.update(
        {
            "status": "ok",
            "step_seconds": seconds,
            "s_per_step": per_step,
            "forwards": probe.forwards,
            "forwards_per_step": probe.forwards / row.steps,
            "forwards_per_step_spec": len(branch_tokens(row.mode, geometry, config["patch_size"])),
            "forwards_computed": probe.computed if probe.count_computed else None,
            "forwards_skipped": probe.forwards - probe.computed if probe.count_computed else None,
            "forwards_skipped_per_step": probe.skipped_per_step() if probe.count_computed else None,
            # a step is skipped when none of its forwards ran the whole stack
            "steps_skipped": (
                sum(skipped == forwards for skipped, forwards in zip(probe.skipped_per_step(), per_step_forwards))
                if probe.count_computed
                else None
            ),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "attention_share": share,
            "attention_s_per_step": share * per_step if share is not None else None,
            "rest_s_per_step": (1 - share) * per_step if share is not None else None,
            "model_tflop_per_step": flops["total"] / 1e12,
            "model_tflops_achieved": flops["total"] / 1e12 / per_step,
        }
    )
    return result


def calibrate(row: Row, pipe: BerniniPipeline, ctx: dict):
    """The calibration a preset needs (MagCache's ratios per expert, from one uncached call of the row's mode and
    steps), or None for presets that need none."""
    preset = CACHE_PRESETS.get(row.cache_preset) if CACHE_PRESETS is not None else None
    if preset is None or not getattr(preset, "needs_calibration", False) or calibrate_magcache is None:
        return None
    arguments = call_arguments(row.mode, ctx["geometry"], ctx["config"]["text_dim"], ctx["device"], ctx["dtype"],
                               ctx["seed"])  # fmt: skip
    start = time.perf_counter()
    calibration = calibrate_magcache(
        pipe, {**arguments, "num_inference_steps": row.steps, "generator": torch.Generator().manual_seed(ctx["seed"])}
    )
    ctx["calibration_seconds"] = time.perf_counter() - start
    return calibration


def _release() -> None:
    """Return the memory of a pipeline the caller has dropped, before the next one is built: its device blocks and the
    pinned host blocks torch's host allocator keeps cached (an offload row's pinned copies would otherwise stay)."""
    torch._dynamo.reset()  # compiled code and its guards would keep the compiled experts alive
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        # The name of the pinned cache's release moved between torch versions; each is tried, none is required.
        for owner, name in ((getattr(torch, "accelerator", None), "empty_host_cache"),
                            (torch._C, "_accelerator_emptyHostCache"), (torch._C, "_host_emptyCache")):  # fmt: skip
            empty = getattr(owner, name, None)
            if callable(empty):
                empty()
                break


def pinned_gib(config: dict, dtype: torch.dtype) -> float:
    """GiB of pinned host memory one expert's streamed group offload takes: a pinned copy of every tensor, each rounded
    up to a power of two by torch's pinned allocator (about 41 GiB for a 14B expert of 26.7 GiB in bf16)."""
    with torch.device("meta"):
        expert = BerniniTransformer3DModel(**config)
    keep = set(expert._keep_in_fp32_modules or [])
    total = 0
    for name, tensor in [*expert.named_parameters(), *expert.named_buffers()]:
        size = 4 if tensor.is_floating_point() and keep.intersection(name.split(".")) else torch.finfo(dtype).bits // 8
        nbytes = tensor.numel() * size
        total += 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0
    return total / 2**30


def host_shortfall(row: Row, config: dict, dtype: torch.dtype) -> str | None:
    """Why the host cannot hold `row`'s pinned copies (group offload on CUDA: both experts pinned, plus one expert's
    pageable copy still held while the other is pinned), or None when it can. A host out of memory kills the whole
    run, so the row is skipped instead."""
    if "group_offload" not in row.memory_profile or not torch.cuda.is_available():
        return None
    need = 2 * pinned_gib(config, dtype) + expert_gib(config, dtype)
    free = psutil.virtual_memory().available / 2**30
    if need <= 0.95 * free:
        return None
    return (f"skipped: {row.memory_profile} pins about {need:.0f} GiB of host memory (both experts' blocks rounded up "
            f"to powers of two, plus one expert's copy), {free:.0f} GiB is free")  # fmt: skip


def _error(err: Exception) -> str:
    return f"error: {type(err).__name__}: {err}"


def run(args, rows: list[Row], backends: dict[str, bool], baseline: str, device: torch.device, dtype: torch.dtype,
        config: dict, geometry: Geometry, on_row=None) -> list[Row]:
    """Run every planned row and fill in its `result`; `on_row(row)` is called after each row (the JSON is rewritten
    there). Past `args.deadline_s` seconds from the start, the rows not yet run are skipped with the reason."""
    ctx = {"device": device, "dtype": dtype, "geometry": geometry, "config": config, "seed": args.seed,
           "profile": not args.no_profile}  # fmt: skip
    started = time.perf_counter()

    def expired(row: Row) -> bool:
        elapsed = time.perf_counter() - started
        if args.deadline_s is None or elapsed < args.deadline_s:
            return False
        row.result = {"status": f"skipped: deadline of {args.deadline_s:g} s reached ({elapsed:.0f} s elapsed)"}
        show(row)
        return True

    shared = [r for r in rows if r.group in ("modes", "backends", "cache", "compile")]
    needed, available = 2 * expert_gib(config, dtype), device_gib(device)
    pipe = None
    if shared and available is not None and available < 1.1 * needed:
        # both experts resident do not fit: only the memory rows (offload, fp8) can run on this GPU
        for row in shared:
            row.result = {"status": f"skipped: both experts resident need {needed:.0f} GiB, this GPU has "
                                    f"{available:.0f} GiB (see the memory rows)"}  # fmt: skip
        shared = []
    if shared:
        pipe = build_pipeline(config, device, dtype).to(device)
        stub_media(pipe, geometry, args.seed)
        pipe.set_progress_bar_config(disable=True)
        # One forward at a tiny size first: library handles, workspaces and backend selection are not timed.
        with torch.no_grad():
            for expert in (pipe.transformer, pipe.transformer_2):
                expert(torch.zeros(1, 16, 1, 4, 4, device=device, dtype=dtype), torch.tensor([999], device=device),
                       torch.zeros(1, 8, config["text_dim"], device=device, dtype=dtype))  # fmt: skip
        synchronize(device)

    def show(row: Row) -> None:
        if not args.quiet:
            print(f"  {row.group:8s} {row.mode:8s} {row.backend:14s} {'compile' if row.compile else 'eager':7s} "
                  f"{row.memory_profile:18s} {row.cache_preset or '-':12s} {_status(row)}", flush=True)  # fmt: skip
        if on_row is not None:
            on_row(row)

    # Rows on the shared pipeline first (eager), compile last on it (it stays compiled), then one pipeline per
    # memory profile (diffusers' offload and casting hooks cannot be undone).
    for row in [r for r in shared if r.group in ("modes", "backends", "cache")]:
        if expired(row):
            continue
        if row.group == "backends" and not backends.get(row.backend, False):
            row.result = {"status": f"skipped: attention backend {row.backend} not available here"}
        elif row.group == "cache" and not hasattr(pipe, "enable_cache_preset"):
            row.result = {"status": "skipped: cache presets (pipe.enable_cache_preset) not available"}
        else:
            try:
                calibration = None
                if row.cache_preset is not None:
                    calibration = calibrate(row, pipe, ctx)
                    pipe.enable_cache_preset(row.cache_preset, calibration=calibration)
                row.result = run_row(row, pipe, ctx)
                if calibration is not None:
                    row.result["calibration_seconds"] = ctx.pop("calibration_seconds")
            except Exception as err:  # noqa: BLE001 - one failing configuration must not lose the others
                row.result = {"status": _error(err)}
                _release()  # e.g. after an out-of-memory error, before the next row
            finally:
                if row.cache_preset is not None and hasattr(pipe, "disable_cache"):
                    pipe.disable_cache()
                apply_backend(pipe, baseline)
        show(row)
    for row in [r for r in shared if r.group == "compile"]:
        if expired(row):
            continue
        if not hasattr(pipe, "compile"):
            row.result = {"status": "skipped: compile (pipe.compile) not available"}
        else:
            try:
                pipe.compile(dynamic=True, fullgraph=True, backend=args.compile_backend)
                row.result = run_row(row, pipe, ctx)
            except Exception as err:  # noqa: BLE001
                row.result = {"status": _error(err)}
        show(row)
    pipe = None
    _release()

    for row in [r for r in rows if r.group == "memory"]:
        if expired(row):
            continue
        if not hasattr(BerniniPipeline, "enable_memory_profile"):
            row.result = {"status": "skipped: memory profiles (pipe.enable_memory_profile) not available"}
            show(row)
            continue
        shortfall = host_shortfall(row, config, dtype)
        if shortfall is not None:
            row.result = {"status": shortfall}
            show(row)
            continue
        try:
            offload = MEMORY_PROFILES is not None and getattr(MEMORY_PROFILES.get(row.memory_profile), "offloads", False)
            pipe = build_pipeline(config, device, dtype, offload=offload)
            stub_media(pipe, geometry, args.seed)
            pipe.set_progress_bar_config(disable=True)
            pipe.enable_memory_profile(row.memory_profile, device=device)
            row.result = run_row(row, pipe, ctx)
        except Exception as err:  # noqa: BLE001
            row.result = {"status": _error(err)}
        finally:
            pipe = None
            _release()
        show(row)
    return rows


def _short(status: str, width: int = 90) -> str:
    """The first line of a status, cut to `width` characters for the table (the JSON keeps all of it)."""
    line = status.splitlines()[0] if status else status
    return line if len(line) <= width else line[: width - 3] + "..."


def _status(row: Row) -> str:
    r = row.result
    if r.get("status") != "ok":
        return _short(r.get("status", "not run"))
    return f"{r['s_per_step']:.3f} s/step"


# ------------------------------------------------------------------------------------------------ report


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def result_table(rows: list[Row]) -> None:
    table = []
    for row in rows:
        r = row.result
        ok = r.get("status") == "ok"
        share = r.get("attention_share")
        table.append(
            (
                row.group, row.mode, row.backend, "yes" if row.compile else "no", row.memory_profile,
                row.cache_preset or "-", row.steps, r.get("s_per_step") if ok else None,
                r.get("forwards_per_step") if ok else None,
                f"{r['forwards_skipped']} ({r['steps_skipped']})" if ok and r.get("forwards_skipped") is not None else "-",
                r.get("peak_gib") if ok else None, r.get("attention_s_per_step") if ok else None,
                r.get("rest_s_per_step") if ok else None, f"{100 * share:.0f}%" if ok and share is not None else "-",
                "ok" if ok else _short(r.get("status", "not run")),
            )
        )  # fmt: skip
    print_table(
        ("group", "mode", "attention", "compile", "memory", "cache", "steps", "s/step", "fwd/step", "skipped",
         "peak GiB", "attn s", "rest s", "attn %", "status"),
        table,
        _fmt,
    )  # fmt: skip


def model_table(model: dict, measured: dict[str, float]) -> None:
    base = measured.get("t2v")
    print("FLOP model at 480x848x81 (a model-based estimate, not a measurement): one step of each mode against plain "
          f"Wan2.2 t2v, and the official anchor ({ANCHOR['seconds']} s for {ANCHOR['steps']} steps of t2v on "
          f"{ANCHOR['gpu']}) scaled by that ratio")  # fmt: skip
    rows = []
    for mode, m in model.items():
        rows.append(
            (
                mode, "+".join(map(str, m["tokens_per_forward"])), m["forwards_per_step"], m["tflop_per_step"],
                f"{100 * m['attention_flop_share']:.0f}%", f"{m['ratio_to_wan_t2v']:.2f}x", m["estimated_s_per_step"],
                m["estimated_s_per_40_steps"],
                measured.get(mode), f"{measured[mode] / base:.2f}x" if base and mode in measured else "-",
            )
        )  # fmt: skip
    print_table(
        ("mode", "tokens per forward", "fwd/step", "TFLOP/step", "attn FLOPs", "vs Wan t2v", "est. s/step",
         "est. s @40", "measured s/step", "measured vs t2v"),
        rows,
        _fmt,
    )  # fmt: skip


def markdown_report(payload: dict) -> str:
    """The rows of a JSON report as a markdown table, under one line naming the machine and the run's state."""
    env = payload["environment"]
    where = "tiny model on the CPU (the times mean nothing for the 14B experts)" if payload["tiny"] else env.get("gpu")
    state = "complete" if payload["complete"] else "incomplete (still running, or stopped)"
    lines = [
        f"bench_gpu part {payload['part'] or 'all'}: {where}, {env['dtype']}, torch {env['torch']}, diffusers "
        f"{env['diffusers']}; {state}, {payload['wall_seconds']:.0f} s",
        "",
        "| group | mode | attention | compile | memory | cache | steps | s/step | fwd/step | peak GiB | attn % "
        "| status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        ok = row.get("status") == "ok"
        share = row.get("attention_share") if ok else None
        cells = [
            row["group"], row["mode"], row["backend"], "yes" if row["compile"] else "no", row["memory_profile"],
            row["cache_preset"] or "-", row["steps"], _fmt(row.get("s_per_step") if ok else None),
            _fmt(row.get("forwards_per_step") if ok else None), _fmt(row.get("peak_gib") if ok else None, 1),
            f"{100 * share:.0f}%" if share is not None else "-", "ok" if ok else _short(row.get("status", "not run")),
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(cell).replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def gpu_environment(device: torch.device, dtype: torch.dtype) -> dict:
    """The benchmarks' environment record, with the GPU's memory where there is one."""
    info = environment(device, dtype)
    if device.type == "cuda":
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return info


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="run on the CPU with the tiny model (float32)")
    parser.add_argument("--quick", action="store_true", help="only the three mode rows (about 2 minutes on a GPU)")
    parser.add_argument(
        "--part", type=int, choices=sorted(PARTS), default=None,
        help="one half of the default run: 1 = modes, backends, compile; 2 = memory profiles and cache presets "
             "(overrides --groups)",
    )  # fmt: skip
    parser.add_argument(
        "--deadline_s", type=float, default=None, metavar="S",
        help="skip (and report) the rows not started within S seconds of the first row (default: no deadline)",
    )
    parser.add_argument("--plan", action="store_true", help="print the rows and the estimated run time, run nothing")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}")
    parser.add_argument(
        "--steps", type=int, default=2, help="timed steps of the t2v mode row and expert_offload rows (one per expert)"
    )
    parser.add_argument(
        "--short_steps", type=int, default=1, help="timed steps of every other row but the cache rows"
    )
    parser.add_argument("--cache_steps", type=int, default=3, help="timed steps of the cache rows")
    parser.add_argument("--backends", default=None, help="comma-separated backend rows (default: every one present)")
    parser.add_argument("--memory_profiles", default=",".join(DEFAULT_MEMORY_PROFILES), help="memory profile rows")
    parser.add_argument("--cache_presets", default=None, help="cache preset rows (default: every preset)")
    parser.add_argument("--references", type=int, default=2, help="reference images of rv2v (one latent frame each)")
    parser.add_argument("--compile_backend", default=None, help="torch.compile backend (inductor; eager with --tiny)")
    parser.add_argument("--no_profile", action="store_true", help="skip the profiler pass (no attention split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress line per row")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write every figure as JSON")
    parser.add_argument(
        "--markdown", type=Path, default=None, metavar="PATH", help="also write the rows as a markdown table"
    )
    args = parser.parse_args(argv)
    args.groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if args.part is not None:
        args.groups = list(PARTS[args.part])
    if args.quick:
        args.groups = ["modes"]
    if args.deadline_s is not None and args.deadline_s <= 0:
        parser.error(f"--deadline_s must be > 0, got {args.deadline_s:g}")
    unknown = sorted(set(args.groups) - set(GROUPS))
    if unknown:
        parser.error(f"--groups: unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    for name in ("steps", "short_steps", "cache_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.references < 0:
        parser.error(f"--references must be >= 0, got {args.references}")
    args.backends = [b.strip() for b in args.backends.split(",")] if args.backends else None
    args.memory_profiles = [p.strip() for p in args.memory_profiles.split(",") if p.strip()]
    args.cache_presets = [p.strip() for p in args.cache_presets.split(",")] if args.cache_presets else None
    if args.compile_backend is None:
        # inductor on a 2-core CPU takes minutes for the tiny block; eager still traces it through dynamo
        args.compile_backend = "eager" if args.tiny else "inductor"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    real_geometry = Geometry(references=args.references)
    model = flop_model(real_geometry)
    if args.plan:
        # The estimate assumes every backend present (FA3 the default) and the four cache presets.
        rows = plan_rows(args, {name: True for name in PLAN_BACKENDS}, "fa3", PLAN_CACHE_PRESETS)
        model_table(model, {})
        budget = PART_BUDGET_S if args.part is not None else BUDGET_S
        print(f"\n{len(rows)} rows; estimated run time on one H100: {estimate_seconds(rows, model) / 60:.1f} min "
              f"(FLOP model at the anchor's throughput plus assumed fixed costs; budget {budget // 60} min)")
        for row in rows:
            print("  " + ", ".join(f"{k}={v}" for k, v in row.label().items()))
        return 0
    if not args.tiny and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; nothing measured (run with --tiny for the CPU run of the same code).")
        return 0

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.tiny:
        device, dtype, config = torch.device("cpu"), torch.float32, dict(TINY_TRANSFORMER_CONFIG)
        geometry = Geometry(**{**asdict(TINY_GEOMETRY), "references": args.references})
    else:
        device, dtype, config, geometry = torch.device("cuda"), torch.bfloat16, dict(WAN22_A14B_CONFIG), real_geometry
    env = gpu_environment(device, dtype)
    backends = present_backends(device, dtype)
    baseline = resolve_attention_backend(None, dtype)
    rows = plan_rows(args, backends, baseline, list(CACHE_PRESETS) if CACHE_PRESETS is not None else None)
    print(f"bench_gpu: {'tiny model on the CPU' if args.tiny else 'Wan2.2-A14B size'}, {env.get('gpu', 'CPU')}, "
          f"{env['dtype']}, torch {env['torch']}, diffusers {env['diffusers']}")  # fmt: skip
    print(f"clip {geometry.frames}x{geometry.height}x{geometry.width} -> latent {list(geometry.latent())}, "
          f"{geometry.references} reference image(s); default attention backend {baseline}; {len(rows)} rows; "
          f"estimated run time on one H100 {estimate_seconds(rows, model) / 60:.1f} min\n")  # fmt: skip

    start = time.perf_counter()

    def write_json(row: Row | None = None) -> None:
        if args.json is None and args.markdown is None:
            return
        payload = {
            "benchmark": "gpu",
            "tiny": args.tiny,
            "part": args.part,
            "complete": row is None,  # False while rows are still running (or if the run was killed)
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
            "geometry": asdict(geometry),
            "latent": list(geometry.latent()),
            "anchor": ANCHOR,
            "flop_model": model,
            "rows": [{**r.label(), **(r.result or {"status": "not run"})} for r in rows],
            "wall_seconds": time.perf_counter() - start,
            "estimated_h100_seconds": estimate_seconds(rows, model),
            "environment": env,
        }
        texts = ((args.json, json.dumps(payload, indent=2) + "\n"), (args.markdown, markdown_report(payload)))
        for path, text in texts:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(path.name + ".partial")
                partial.write_text(text)
                partial.replace(path)  # a reader never sees a half-written file

    run(args, rows, backends, baseline, device, dtype, config, geometry, on_row=write_json)
    wall = time.perf_counter() - start

    measured = {
        row.mode: row.result["s_per_step"]
        for row in rows
        if row.group == "modes" and row.result.get("status") == "ok"
    }
    print()
    result_table(rows)
    print("\nattn s / rest s: the step time split by the profiled share of attention kernels (self and cross) in all "
          "kernel time; skipped: forwards whose last block did not run (step cache), and in brackets the steps where no forward did; peak GiB: torch's peak "
          "allocation during the timed call\n")  # fmt: skip
    if args.tiny:
        print("(tiny model on the CPU: the times below exercise the code path and mean nothing for the 14B experts)")
    model_table(model, {} if args.tiny else measured)
    if not args.tiny and "t2v" in measured:
        anchor_step = ANCHOR["seconds"] / ANCHOR["steps"]
        print(f"\nmeasured t2v {measured['t2v']:.2f} s/step vs the anchor's {anchor_step:.2f} s/step on "
              f"{ANCHOR['gpu']}: {measured['t2v'] / anchor_step:.2f}x")  # fmt: skip
    print(f"\nwall time {wall:.1f} s")
    write_json()
    for path in (args.json, args.markdown):
        if path is not None:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
