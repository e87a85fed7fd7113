"""Facts shared by every floor of the package: the Wan2.2 base, dtype names, the tiny model's name, the frame grid.

This module imports only the standard library, so the command line can read it before torch loads.
"""

from __future__ import annotations

from pathlib import Path

# The base the official `configs/bernini_renderer_wan22` names (`wan22_base`), used with separate checkpoints.
WAN22_BASE = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"

# Command-line dtype names and the torch dtype each stands for (`getattr(torch, DTYPES[name])`).
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# The attention backend names (attention.py maps them onto diffusers' dispatcher).
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "sdpa", "fa2", "fa3", "sage")

# `--model tiny` / `from_pretrained("tiny")`: the random tiny model built in code by `bernini_diffusers.testing`.
TINY_MODEL = "tiny"

# The frame rates accepted for sampling and writing. The model works at 16 to 24 fps; below 1 fps a video is a
# slide show and above 240 no source or player is meant, while ffmpeg refuses rates like 1e-9 or 1e300.
MIN_FPS = 1.0
MAX_FPS = 240.0

# The video VAE compresses time by 4 and keeps the first frame, so frame counts are 4k + 1.
TEMPORAL_FACTOR = 4

# Temporal context windows (`context_frames`, `context_overlap`): the overlap neighbouring windows share by default
# (16 frames, four latent frames, one second at 16 fps), and the longest clip windows render: 961 frames, 60 s at
# 16 fps. Past it the source frames, the decoded output and the per-window caches outgrow one accelerator's host.
DEFAULT_CONTEXT_OVERLAP = 16
MAX_WINDOWED_FRAMES = 961

# The longest guidance branch allowed by default, in transformer tokens (`bernini generate --max_tokens`, `bernini
# serve --max_tokens`, or this variable): 2.5 times the official 720p 121-frame rv2v example at its upper-bound
# estimate (409,600), and three orders of magnitude below what the rope table of the released models would accept
# (1024 positions per axis, 1024**3 tokens).
DEFAULT_MAX_TOKENS = 2**20
MAX_TOKENS_ENV = "BERNINI_MAX_TOKENS"
# The demo's budgets for a request from the page (`bernini demo --max_steps/--max_upload_mb/--max_uploads`,
# `create_demo`'s arguments): one worker serves every visitor, so a request that would hold it for hours, or uploads
# that would fill the disk, are refused before they are queued. 200 steps is four times the official default.
DEMO_MAX_STEPS = 200
DEMO_MAX_UPLOAD_MB = 512
DEMO_MAX_UPLOADS = 10

# The prompt enhancer's patience (`--pe_timeout`, `--pe_retries`, these variables, or `PromptEnhancer`'s arguments):
# seconds one request may take and further tries after a failed one. With the waits between tries (1 s, 2 s) a prompt
# costs at most 20 x 3 + 3 = 63 s; an endpoint that fails that budget is not asked again by the same enhancer.
PE_TIMEOUT_ENV = "BERNINI_PE_TIMEOUT"
PE_RETRIES_ENV = "BERNINI_PE_RETRIES"
PE_TIMEOUT = 20.0
PE_RETRIES = 2
# What a request's timeout and the number of retries may be: (0, 3600] seconds, 0 to 100 retries.
PE_MAX_TIMEOUT = 3600.0
PE_MAX_RETRIES = 100

# Torch-free copies of runtime tables the command line's parser needs (`bernini --help` answers before torch loads);
# tests/test_cli_startup.py checks each against the table it copies, so they cannot drift apart.
# The names of `memory.MEMORY_PROFILES`, in its order.
MEMORY_PROFILE_NAMES: tuple[str, ...] = (
    "resident", "expert_offload", "group_offload", "fp8", "fp8+expert_offload", "fp8+group_offload", "low_ram",
    "fp8+low_ram", "low_ram+group_offload",
)  # fmt: skip
# The memory profiles sharded experts take (`memory.check_sharded_profile`): the others move or read whole blocks.
SHARDED_PROFILE_NAMES: tuple[str, ...] = ("resident", "expert_offload", "fp8", "fp8+expert_offload")
# The step-cache presets of `acceleration.CACHE_PRESETS` that need no calibration (the ones a flag can name).
CACHE_PRESET_NAMES: tuple[str, ...] = ("fbc-safe", "fbc-fast", "taylorseer")
# The official guidance defaults: `BerniniPipeline.__call__`'s defaults of the settings `acceleration.TURBO` replaces
# (the step count aside).
OFFICIAL_GUIDANCE: dict[str, float] = {
    "flow_shift": 5.0, "omega_vid": 1.25, "omega_img": 4.5, "omega_txt": 4.0, "omega_scale": 0.8, "eta": 0.5,
    "momentum": 0.0, "norm_threshold": 50.0,
}  # fmt: skip


def written_as_path(name: str) -> bool:
    """Whether `name` is written as a filesystem path (absolute, `./`, `../`, `~`, `.`, `..`): never a Hub repo id,
    so a typo in it is reported as a missing path instead of becoming a Hub request."""
    name = str(name)
    return Path(name).is_absolute() or name.startswith(("./", "../", "~")) or name in (".", "..")

# The transformer configs a single-file checkpoint is recognised by (formats.py) when no `config` is given, as
# diffusers' `WanTransformer3DModel` takes them: one Wan2.2-T2V-A14B expert (Wan-AI/Wan2.2-T2V-A14B-Diffusers,
# transformer/config.json; 14.3B parameters) and Wan2.1-T2V-1.3B (the base of Bernini-R 1.3B; 1.4B parameters).
WAN22_A14B_TRANSFORMER_CONFIG = {
    "patch_size": [1, 2, 2], "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None, "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}  # fmt: skip
WAN21_T2V_1_3B_TRANSFORMER_CONFIG = {
    **WAN22_A14B_TRANSFORMER_CONFIG, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30,
}  # fmt: skip

# The accepted range of each guidance and sampling setting, both ends included. Generous for any real use (the official
# defaults: omegas 1.25 to 4.5, omega_scale 0.8, eta 0.5, momentum 0, norm_threshold 50, flow_shift 5; turbo LoRAs use
# omegas of 1), and tight enough that no accepted value overflows float32 in the guidance or the sigma shift: today's
# `omega_scale=1e308` or `flow_shift=1e-300` would turn every latent into inf/NaN.
GUIDANCE_RANGES: dict[str, tuple[float, float]] = {
    "omega_vid": (0.0, 100.0),
    "omega_img": (0.0, 100.0),
    "omega_txt": (0.0, 100.0),
    "guidance_scale": (0.0, 100.0),
    "omega_scale": (0.0, 10.0),
    "eta": (0.0, 10.0),
    "momentum": (-1.0, 1.0),
    "norm_threshold": (0.0, 10000.0),
    "flow_shift": (0.01, 100.0),
}

# The most videos one call renders (`len(prompt) * num_videos_per_prompt`): each holds its own latents and branch
# activations, so a larger batch is a typo rather than a plan; render more with several calls or a case list.
MAX_BATCH_SIZE = 16

# The released models' other component configs, so that a memory plan (`memory_plan.estimate_memory`) needs no
# weights and no network: their UMT5-XXL text encoder (encoder only) and the Wan2.1 VAE (AutoencoderKLWan's defaults);
# the experts' are the two above. A local model folder's own config.json files take precedence over these.
UMT5_XXL_CONFIG = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
)  # fmt: skip
WAN_VAE_CONFIG: dict = {}  # AutoencoderKLWan's defaults are the Wan2.1 VAE (base_dim 96, z_dim 16)
# Model names a plan knows without files: "A14B" (two experts) and "1.3B" (one).
KNOWN_MODELS = {"A14B": (WAN22_A14B_TRANSFORMER_CONFIG, 2), "1.3B": (WAN21_T2V_1_3B_TRANSFORMER_CONFIG, 1)}

# Checkpoint formats a memory plan prices (the experts' weights as they sit in memory): plain dtypes, float8 weights,
# and GGUF quantizations as (block size in weights, bytes per block), ggml's block layouts.
PLAIN_FORMATS = {"fp32": 4, "bf16": 2, "fp16": 2}
GGUF_BLOCKS = {"Q8_0": (32, 34), "Q6_K": (256, 210), "Q5_K": (256, 176), "Q4_K": (256, 144), "Q4_0": (32, 18)}
CHECKPOINT_FORMATS: tuple[str, ...] = (*PLAIN_FORMATS, "fp8", *GGUF_BLOCKS)

# The size arguments of a call whose defaults a pipeline may set (`BerniniPipeline(call_defaults=...)`, saved in its
# config), and the tiny random model's: seconds-long runs, where the official 81 frames at 480x848 and 40 steps take
# tens of minutes on a CPU, for noise. `tiny.tiny_pipeline()`, `--model tiny` and the demo's tiny model share them.
CALL_DEFAULT_NAMES: tuple[str, ...] = ("num_frames", "height", "width", "max_image_size", "num_inference_steps")
TINY_CALL_DEFAULTS: dict[str, int] = {
    "num_frames": 9, "height": 64, "width": 96, "max_image_size": 96, "num_inference_steps": 4,
}  # fmt: skip
