"""Facts shared by every floor of the package: the Wan2.2 base, dtype names, the tiny model's name, the frame grid.

This module imports only the standard library, so the command line can read it before torch loads.
"""

from __future__ import annotations

# The base the official `configs/bernini_renderer_wan22` names (`wan22_base`), used with separate checkpoints.
WAN22_BASE = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"

# Command-line dtype names and the torch dtype each stands for (`getattr(torch, DTYPES[name])`).
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# The attention backend names (attention.py maps them onto diffusers' dispatcher).
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "sdpa", "fa2", "fa3")

# `--model tiny` / `from_pretrained("tiny")`: the random tiny model built in code by `bernini_diffusers.testing`.
TINY_MODEL = "tiny"

# The video VAE compresses time by 4 and keeps the first frame, so frame counts are 4k + 1.
TEMPORAL_FACTOR = 4
