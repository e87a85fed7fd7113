"""Tiny offline Bernini-R components, built in code, for tests, docs, benchmarks and `--model tiny`.

Random weights with fixed seeds; the two experts get different seeds; head_dim is 128 as in the real models so the
RoPE splits (44/42/42) and the source-id phase are exercised as they are at full size. No file is downloaded.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from .tasks import DEFAULT_NEGATIVE_PROMPT
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
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tokenizer = Tokenizer(models.Unigram(_vocabulary(), unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "extra_ids": 0,
        "model_max_length": 512,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def tiny_tokenizer():
    """The tiny tokenizer, loaded the way transformers loads the real UMT5 folder, with its stored pipeline restored."""
    import tempfile

    from transformers import AutoTokenizer

    from .text import restore_tokenizer_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_tokenizer(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        restore_tokenizer_pipeline(tokenizer, Path(tmp) / "tokenizer.json")
    tokenizer.name_or_path = "bernini-tiny"
    return tokenizer


def tiny_text_encoder(vocab_size: int, seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=vocab_size,
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
    return UMT5EncoderModel(config).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


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


def tiny_scheduler():
    from .pipeline_bernini import default_scheduler

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


def tiny_pipeline(two_experts: bool = True, torch_dtype: torch.dtype | None = None):
    from .pipeline_bernini import BerniniPipeline

    return BerniniPipeline(**get_tiny_components(two_experts, torch_dtype))


def save_tiny_pretrained(directory: str | os.PathLike, layout: str = "wan", two_experts: bool = True) -> Path:
    """Write a tiny model in a Hub layout.

    `layout="wan"`: `Wan-AI/Wan2.2-T2V-A14B-Diffusers` style, a `model_index.json` naming `WanPipeline` and
    `WanTransformer3DModel`. `layout="bernini"`: the same folders with a root `config.json` of
    `model_type: bernini_renderer` instead of a model index. `layout="diffusers"`: `save_pretrained` of the
    pipeline itself.
    """
    directory = Path(directory)
    pipe = tiny_pipeline(two_experts)
    pipe.save_pretrained(directory)
    if layout == "diffusers":
        return directory
    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text())
    if layout == "wan":
        index["_class_name"] = "WanPipeline"
        for name in ("transformer", "transformer_2"):
            if index.get(name, [None])[0] is not None:
                index[name] = ["diffusers", "WanTransformer3DModel"]
        index["tokenizer"] = ["transformers", "T5TokenizerFast"]
        index["expand_timesteps"] = False
        index_path.write_text(json.dumps(index, indent=2))
    elif layout == "bernini":
        index_path.unlink()
        config = {
            "model_type": "bernini_renderer",
            "shift": 3.0,
            "switch_dit_boundary": 0.875 if two_experts else 0,
            "skip_transformer_2": not two_experts,
            "use_unipc": True,
            "use_src_id_rotary_emb": True,
        }
        (directory / "config.json").write_text(json.dumps(config, indent=2))
    else:
        raise ValueError(f"`layout`={layout!r} is not supported; choose one of: wan, bernini, diffusers.")
    # The real folders ship a T5 tokenizer config; transformers 5 rebuilds it without the stored normalizer.
    save_tiny_tokenizer(directory / "tokenizer")
    for name in ("transformer", "transformer_2"):
        config_path = directory / name / "config.json"
        if config_path.exists():
            config = json.loads(config_path.read_text())
            config["_class_name"] = "WanTransformer3DModel"
            config_path.write_text(json.dumps(config, indent=2))
    return directory


def make_test_image(path: str | os.PathLike, width: int = 48, height: int = 32, seed: int = 0) -> Path:
    """A small random RGB PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def make_test_video(
    path: str | os.PathLike, num_frames: int = 9, width: int = 48, height: int = 32, fps: float = 16, seed: int = 0
) -> Path:
    """A small MP4 of smooth random frames."""
    from .media import write_output

    rng = np.random.default_rng(seed)
    base = rng.random((height, width, 3))
    frames = np.stack([np.clip(base + 0.05 * t, 0, 1) for t in range(num_frames)])
    return write_output(frames, path, fps)


# ------------------------------------------------------------------------------------------------ Hub layouts

ORIGINAL_SEEDS = {"transformer": 11, "transformer_2": 12}  # differ from the tiny experts': the base's weights lose


def save_original_checkpoint(
    directory: str | os.PathLike, model: torch.nn.Module, expert: str = "transformer", num_shards: int = 3,
    raw_twins: bool = True,
) -> Path:
    """Write `model`'s weights as an original Bernini-R expert checkpoint (`ByteDance/Bernini-R` layout).

    Keys are `ema.diff_dec.transformer[_2].*` (the weights) plus, with `raw_twins`, the raw twins
    `diff_dec.transformer[_2].*` holding other values (weights + 1), spread over `num_shards` files
    `model-0000i-of-0000N.safetensors` with a `model.safetensors.index.json`; with two shards or more a twin never
    shares a shard with its EMA copy.
    """
    from safetensors.torch import save_file

    from .hub_export.convert import original_key

    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for i, (key, value) in enumerate(model.state_dict().items()):
        parts[i % num_shards][original_key(key, expert)] = value.detach().clone().contiguous()
        if raw_twins:
            twin = value + 1 if value.is_floating_point() else value
            parts[(i + 1) % num_shards][original_key(key, expert, ema=False)] = twin.detach().clone().contiguous()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for shard, part in enumerate(parts):
        filename = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file(part, str(directory / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
    total = sum(t.numel() * t.element_size() for part in parts for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


def save_tiny_original_checkpoints(directory: str | os.PathLike, num_shards: int = 3) -> Path:
    """`bernini_renderer_high/` and `bernini_renderer_low/` of tiny experts seeded `ORIGINAL_SEEDS`, as in
    `ByteDance/Bernini-R`; they fit the configs of `save_tiny_pretrained`'s experts."""
    from .loading import CHECKPOINT_FOLDERS

    directory = Path(directory)
    for expert, seed in ORIGINAL_SEEDS.items():
        save_original_checkpoint(directory / CHECKPOINT_FOLDERS[expert], tiny_transformer(seed), expert, num_shards)
    return directory


def write_random_original_checkpoint(
    directory: str | os.PathLike, config: dict, expert: str = "transformer", shard_size: int = 256 * 2**20,
    dtype: torch.dtype = torch.bfloat16, seed: int = 0,
) -> list[Path]:
    """An original-layout checkpoint of random EMA weights for a transformer `config`, written shard by shard (each
    at most `shard_size` bytes unless one tensor is larger: huggingface_hub's split) so that no more than a shard is
    ever in memory."""
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.torch import save_file

    from .hub_export.convert import expected_tensors, expert_skeleton, original_key

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    expected = expected_tensors(expert_skeleton(config))
    shapes = {original_key(name, expert): shape for name, (shape, _) in expected.items()}
    split = split_state_dict_into_shards_factory(
        shapes,
        get_storage_size=lambda shape: math.prod(shape) * dtype.itemsize,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=shard_size,
    )
    generator = torch.Generator().manual_seed(seed)
    files = []
    for filename, keys in split.filename_to_tensors.items():
        part = {key: torch.randn(shapes[key], generator=generator).to(dtype) for key in keys}
        save_file(part, str(directory / filename), metadata={"format": "pt"})
        files.append(directory / filename)
        del part
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return files


def save_to_hub_cache(
    folder: str | os.PathLike, repo_id: str, cache_dir: str | os.PathLike, revision: str = "main",
    listing: bool = True,
) -> Path:
    """Lay `folder` out in a Hugging Face cache exactly as huggingface_hub downloads a repo, and return the snapshot.

    `models--owner--name/blobs/<hash>` holds each file's bytes (named by the git blob sha1, or the sha256 for
    LFS-tracked safetensors), `snapshots/<commit>/<path>` are relative symlinks to the blobs, `refs/<revision>` holds
    the commit, and with `listing` `trees/<commit>.json` is the repo's file listing that `snapshot_download` caches.
    """
    import hashlib

    folder, cache_dir = Path(folder), Path(cache_dir)
    storage = cache_dir / f"models--{repo_id.replace('/', '--')}"
    contents = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    digest = hashlib.sha1()
    for relative, data in contents.items():
        digest.update(relative.encode() + data)
    commit = digest.hexdigest()  # a stand-in commit: the same folder gives the same one
    snapshot = storage / "snapshots" / commit
    entries = {}
    for relative, data in contents.items():
        blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        lfs = relative.endswith(".safetensors")
        blob = storage / "blobs" / (hashlib.sha256(data).hexdigest() if lfs else blob_id)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        entries[relative] = {"size": len(data), "blob_id": blob_id}
        if lfs:
            entries[relative].update(lfs_sha256=blob.name, lfs_size=len(data))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    if listing:
        (storage / "trees").mkdir(exist_ok=True)
        (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": entries}))
    return snapshot
