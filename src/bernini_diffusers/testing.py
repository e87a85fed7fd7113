"""Test helpers: the tiny model in every Hub layout, tiny original checkpoints, synthetic images and videos.

The tiny model itself lives in `bernini_diffusers.tiny` (it is what `--model tiny` runs); its names are re-exported
here for tests, docs and benchmarks. No runtime module imports this one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import split_state_dict_into_shards_factory
from PIL import Image
from safetensors.torch import save_file

from .hub_export.convert import expected_tensors, expert_skeleton, original_key
from .loading import CHECKPOINT_FOLDERS
from .media import write_output
from .pipeline_bernini import BerniniPipeline
from .tiny import tiny_pipeline as _tiny_pipeline
from .tiny import (  # noqa: F401  (re-exported)
    HIGH_NOISE_SEED,
    LOW_NOISE_SEED,
    TINY_TEXT_DIM,
    TINY_TRANSFORMER_CONFIG,
    cast_like_from_pretrained,
    get_tiny_components,
    save_tiny_tokenizer,
    tiny_scheduler,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_transformer,
    tiny_vae,
)


# diffusers' key -> Wan's original key: the inverse of diffusers' `convert_wan_transformer_to_diffusers` (tested in
# tests/test_formats.py), for writing community files (Wan, ComfyUI, GGUF names) from a diffusers state dict.
_TO_WAN = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"), ("attn2", "cross_attn"), (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."),
    (".to_v.", ".v."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("proj_out", "head.head"),
]  # fmt: skip


def wan_key(key: str) -> str:
    """Wan's original name of a diffusers transformer key: `blocks.0.attn1.to_q.weight` ->
    `blocks.0.self_attn.q.weight`."""
    for new, old in _TO_WAN:
        key = key.replace(new, old)
    key = key.replace("norm2", "norm__x").replace("norm3", "norm2").replace("norm__x", "norm3")
    if key == "scale_shift_table":
        return "head.modulation"
    return key.replace("scale_shift_table", "modulation")


def tiny_pipeline(
    two_experts: bool = True, torch_dtype: torch.dtype | None = None, call_defaults: dict[str, int] | None = None
) -> BerniniPipeline:
    """[`~tiny.tiny_pipeline`] with the official call defaults unless `call_defaults` is given: the tests check the
    official call (81 frames, 40 steps, ...) on the tiny components, so a size they leave out means the official one."""
    return _tiny_pipeline(two_experts, torch_dtype, call_defaults=call_defaults)


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
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def make_test_video(
    path: str | os.PathLike, num_frames: int = 9, width: int = 48, height: int = 32, fps: float = 16, seed: int = 0
) -> Path:
    """A small MP4 of smooth random frames."""
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
