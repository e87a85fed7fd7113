"""The tiny random Bernini-R model, built in code: `--model tiny`, the demo's tiny model, tests and benchmarks.

Random weights with fixed seeds; the two experts get different seeds; head_dim is 128 as in the real models so the
RoPE splits (44/42/42) and the source-id phase are exercised as they are at full size. No file is downloaded.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from .constants import TINY_MODEL
from .memory_plan import ModelConfigs
from .constants import TINY_CALL_DEFAULTS
from .pipeline_bernini import BerniniPipeline
from .scheduling import default_scheduler
from .tasks import DEFAULT_NEGATIVE_PROMPT
from .text import restore_tokenizer_pipeline
from .transformer_bernini import BerniniTransformer3DModel

TINY_TEXT_DIM = 32
HIGH_NOISE_SEED, LOW_NOISE_SEED = 1, 2


def _vocabulary() -> list[tuple[str, float]]:
    """A Unigram vocabulary: specials, ASCII pieces, and the CJK characters of the default negative prompt."""
    ascii_chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?'\"-:;()&"
    # The full-width comma is deliberately absent: only the NFKC normalizer turns it into ",".
    cjk = sorted({c for c in DEFAULT_NEGATIVE_PROMPT if ord(c) > 0x2E80 and c != "，"})
    pieces = ["▁" + c for c in ascii_chars] + list(ascii_chars) + cjk + ["▁"]
    return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0 - 0.001 * i) for i, p in enumerate(pieces)]


def save_tiny_tokenizer(directory: str | os.PathLike) -> Path:
    """Write a UMT5-style tokenizer folder (`tokenizer.json` with an NFKC normalizer, T5 config) to `directory`."""
    tokenizer = Tokenizer(models.Unigram(_vocabulary(), unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer.save(str(directory / "tokenizer.json"))
    except Exception as err:  # tokenizers' Rust error names no file: "File too large (os error 27)"
        raise OSError(f"cannot write '{directory / 'tokenizer.json'}': {err}") from err
    config = {
        "tokenizer_class": "T5Tokenizer",
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "extra_ids": 0,
        "model_max_length": 512,
    }
    try:
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    except OSError as err:  # a failed write (file too large, no space) names no file
        raise OSError(err.errno, f"cannot write '{directory / 'tokenizer_config.json'}': {err.strerror}") from err
    return directory


def tiny_tokenizer():
    """The tiny tokenizer, loaded the way transformers loads the real UMT5 folder, with its stored pipeline restored."""
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_tokenizer(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        restore_tokenizer_pipeline(tokenizer, Path(tmp) / "tokenizer.json")
    tokenizer.name_or_path = "bernini-tiny"
    return tokenizer


TINY_TEXT_ENCODER_CONFIG = dict(
    d_model=TINY_TEXT_DIM,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
)
TINY_VAE_CONFIG = dict(
    base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
)


def tiny_text_encoder(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **TINY_TEXT_ENCODER_CONFIG)).eval()


def tiny_vae(seed: int = 0):
    torch.manual_seed(seed)
    return AutoencoderKLWan(**TINY_VAE_CONFIG).eval()


TINY_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=TINY_TEXT_DIM,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=64,
)


def tiny_transformer(seed: int = HIGH_NOISE_SEED, **overrides) -> BerniniTransformer3DModel:
    torch.manual_seed(seed)
    return BerniniTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, **overrides}).eval()


def cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """Cast to `dtype` as `from_pretrained(torch_dtype=...)` does, keeping `_keep_in_fp32_modules` in float32."""
    if dtype is None or dtype == torch.float32:
        return model
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    if type(model).__module__.startswith("transformers.") and dtype != torch.float16:
        keep = set()  # transformers keeps UMT5's `wo` in float32 for fp16 only
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not keep.intersection(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    return model


def tiny_model_configs() -> ModelConfigs:
    """The tiny model's configs, for a memory plan (`BerniniPipeline.estimate_memory`) without building it."""
    text_encoder = dict(TINY_TEXT_ENCODER_CONFIG, vocab_size=len(_vocabulary()))
    return ModelConfigs(dict(TINY_TRANSFORMER_CONFIG), 2, text_encoder, dict(TINY_VAE_CONFIG), name=TINY_MODEL)


def tiny_scheduler():
    return default_scheduler()


def get_tiny_components(two_experts: bool = True, torch_dtype: torch.dtype | None = None) -> dict:
    """Components for `BerniniPipeline(**components)`: the 14B layout (two experts) or the 1.3B one (one expert).

    `torch_dtype` applies to the experts and the text encoder as `from_pretrained` would; the VAE stays float32.
    """
    tokenizer = tiny_tokenizer()
    experts = [tiny_transformer(HIGH_NOISE_SEED), tiny_transformer(LOW_NOISE_SEED) if two_experts else None]
    experts = [cast_like_from_pretrained(e, torch_dtype) if e is not None else None for e in experts]
    return {
        "tokenizer": tokenizer,
        "text_encoder": cast_like_from_pretrained(tiny_text_encoder(len(tokenizer)), torch_dtype),
        "vae": tiny_vae(),
        "scheduler": tiny_scheduler(),
        "transformer": experts[0],
        "transformer_2": experts[1],
        "boundary_ratio": 0.875 if two_experts else None,
    }


def tiny_pipeline(
    two_experts: bool = True,
    torch_dtype: torch.dtype | None = None,
    call_defaults: dict[str, int] | None = TINY_CALL_DEFAULTS,
) -> BerniniPipeline:
    """The tiny pipeline (`--model tiny`): random weights, so its output is noise; everything around it is real.

    A call that leaves the sizes out runs `call_defaults` (9 frames at 64x96, 4 steps: seconds on a CPU, as `--model
    tiny` does); sizes given win. `call_defaults=None` gives the official defaults (81 frames at 480x848, 40 steps).
    """
    return BerniniPipeline(**get_tiny_components(two_experts, torch_dtype), call_defaults=call_defaults)
