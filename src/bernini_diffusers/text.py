"""Text side of the renderer: prompt cleaning, the T5 tokenizer's stored pipeline, and UMT5 embeddings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers.pipelines.wan.pipeline_wan import (
    prompt_clean,  # ftfy, double html.unescape, whitespace collapse
)
from diffusers.utils import is_ftfy_available
from diffusers.utils.torch_utils import get_module_execution_device
from tokenizers import Tokenizer

from .tasks import SYSTEM_PROMPTS, TaskType

__all__ = ["prompt_clean", "positive_text", "restore_tokenizer_pipeline", "encode_texts", "MAX_SEQUENCE_LENGTH"]

MAX_SEQUENCE_LENGTH = 512


def positive_text(prompt: str, task: TaskType, system_prompt: str | None) -> str:
    """The positive T5 input: the system prefix and the cleaned prompt, joined with no separator (as upstream)."""
    prefix = SYSTEM_PROMPTS[task.value] if system_prompt is None else system_prompt
    if not is_ftfy_available():  # diffusers' prompt_clean would fail with a NameError
        raise ImportError(
            "cleaning a prompt as the official renderer does needs ftfy; install it with `pip install ftfy`."
        )
    return prefix + prompt_clean(prompt)


def _component(serialized: str, name: str):
    return json.dumps(json.loads(serialized).get(name), sort_keys=True)


def restore_tokenizer_pipeline(tokenizer, tokenizer_file: str | os.PathLike | None = None) -> bool:
    """Make a fast tokenizer run the normalizer and pre-tokenizer stored in its `tokenizer.json`.

    transformers 5 rebuilds T5 tokenizers from the vocabulary and drops the stored normalizer (sentencepiece's
    NFKC map); the official stack ran the stored pipeline, under which "，" becomes "," rather than `<unk>`.
    Returns True when something was restored.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    if tokenizer_file is None:
        tokenizer_file = Path(str(getattr(tokenizer, "name_or_path", ""))) / "tokenizer.json"
    if not Path(tokenizer_file).is_file():
        return False
    stored = Tokenizer.from_file(str(tokenizer_file))
    stored_json, loaded_json = stored.to_str(), backend.to_str()
    restored = False
    for name in ("normalizer", "pre_tokenizer"):
        if _component(stored_json, name) != _component(loaded_json, name):
            setattr(backend, name, getattr(stored, name))
            restored = True
    return restored


@torch.no_grad()
def encode_texts(
    tokenizer,
    text_encoder,
    texts: list[str],
    device: torch.device,
    dtype: torch.dtype,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
) -> torch.Tensor:
    """UMT5 `last_hidden_state` of each text, rows past its length zeroed, all `max_sequence_length` rows kept:
    `[N, max_sequence_length, D]` (the renderer uses 512)."""
    inputs = tokenizer(
        texts,
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    encoder_device = get_module_execution_device(text_encoder)
    mask = inputs.attention_mask.to(encoder_device)
    hidden = text_encoder(inputs.input_ids.to(encoder_device), mask).last_hidden_state
    lengths = inputs.attention_mask.sum(dim=1)
    hidden = hidden.to(device=device, dtype=dtype)
    keep = torch.arange(max_sequence_length, device=device)[None, :] < lengths.to(device)[:, None]  # (N, L)
    return torch.where(keep[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=device))
