"""One process of tests/test_sharded_formats.py, launched with `torchrun --standalone --nproc-per-node 2`.

For each load of `LOADS` every rank loads the pipeline whole (`from_pretrained(base, high_noise_ckpt=FILE,
low_noise_ckpt=FILE, dtype=...)`) and by shards (`from_pretrained_sharded` with the same arguments), runs one t2v
case on both, and compares its shard of every parameter with the rows of what the whole load computes with. It
writes what it measured to OUT/rank<r>.json; the test process makes the assertions. Run by hand (FILES written by
the test's `write_checkpoints`):

    torchrun --standalone --nproc-per-node 2 tests/sharded_formats_worker.py OUT FILES
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SMALL = dict(prompt="a red ball rolls", task_type="t2v", num_frames=5, height=32, width=48, num_inference_steps=3,
             output_type="latent")  # fmt: skip
# (high_noise_ckpt file, low_noise_ckpt file, dtype, ulysses_degree, branch_degree, memory profile): the files are
# those of the test's `write_checkpoints`. Ulysses needs yunchang; without it that load runs on branch_degree=2. The
# fp8 profile stores the shards in float8 (from the load dtype, as the whole load's fp8 profile does).
LOADS = [
    ("comfy_fp8", "legacy_fp8_per_channel", "fp32", 1, 2, None),
    ("gguf_q8_0", "wan_bf16", "fp32", 2, 1, None),
    ("official", "official", "fp32", 1, 2, None),
    ("gguf_q4_0", "comfy_fp8", "bf16", 1, 2, None),
    ("plain_fp8", "legacy_fp8_per_channel", "bf16", 1, 2, "fp8"),
]
EXPERTS = ("transformer", "transformer_2")


def effective_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What each parameter of a whole expert computes with: GGUF weights dequantized by diffusers and cast to their
    layer's compute dtype (as `GGUFLinear.forward_native` does), every other parameter as it is."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    out = {}
    for prefix, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            key = f"{prefix}.{name}" if prefix else name
            if hasattr(param, "quant_type"):
                out[key] = dequantize_gguf_tensor(param).to(module.compute_dtype)
            else:
                out[key] = param.detach()
    return out


def compare_shards(sharded: torch.nn.Module, whole: dict[str, torch.Tensor], rank: int, degree: int) -> dict:
    """This rank's rows of every parameter against the whole load's: the largest difference, the names whose dtype
    differs, the bytes held here and the bytes of the whole (dequantized) expert."""
    worst, wrong_dtype, local_bytes, full_bytes = 0.0, [], 0, 0
    for name, param in sharded.named_parameters():
        expected = whole[name]
        full_bytes += param.numel() * param.element_size()  # a DTensor's numel is the whole tensor's
        if hasattr(param, "to_local"):
            local = param.to_local()
            start = rank * -(-expected.shape[0] // degree)
            expected = expected[start : start + local.shape[0]]
        else:
            local = param
        local_bytes += local.numel() * local.element_size()
        if local.dtype != expected.dtype:
            wrong_dtype.append(f"{name}: {local.dtype} != {expected.dtype}")
        if local.numel():
            worst = max(worst, (local.detach().double() - expected.double()).abs().max().item())
    return {"max_param_diff": worst, "wrong_dtypes": wrong_dtype, "local_bytes": local_bytes,
            "full_bytes": full_bytes}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("files", type=Path)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])

    import torch.distributed as dist

    from bernini_diffusers import BerniniPipeline

    has_yunchang = importlib.util.find_spec("yunchang") is not None
    paths = json.loads((args.files / "files.json").read_text())
    base = args.files / "base"
    results = []
    for high, low, dtype, ulysses, branch, profile in LOADS:
        if ulysses > 1 and not has_yunchang:
            ulysses, branch = 1, ulysses * branch
        kwargs = {"high_noise_ckpt": paths[high], "low_noise_ckpt": paths[low], "dtype": DTYPES[dtype]}
        if profile is not None:
            kwargs.update(memory_profile=profile, device="cpu")
        whole = BerniniPipeline.from_pretrained(base, **kwargs)
        whole.set_progress_bar_config(disable=True)
        expected = whole(**SMALL, generator=torch.Generator().manual_seed(42)).frames.float()
        pipe = BerniniPipeline.from_pretrained_sharded(base, ulysses, branch, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(**SMALL, generator=torch.Generator().manual_seed(42)).frames.float()
        group = pipe.parallel_state.data_group
        result = {
            "high": high, "low": low, "dtype": dtype, "ulysses_degree": ulysses, "branch_degree": branch,
            "profile": profile,
            "max_abs_diff": (out - expected).abs().max().item(),
            # a whole block's bytes as loaded here (dequantized, for GGUF): the rounding allowed per rank
            "block_bytes": sum(p.numel() * p.element_size() for p in pipe.transformer.blocks[0].parameters()),
        }  # fmt: skip
        for expert in EXPERTS:
            result[expert] = compare_shards(getattr(pipe, expert), effective_weights(getattr(whole, expert)),
                                            dist.get_rank(group), dist.get_world_size(group))  # fmt: skip
        results.append(result)
        del whole, pipe
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps({"rank": rank, "loads": results}, indent=1))
    tmp.rename(args.out / f"rank{rank}.json")


if __name__ == "__main__":
    main()
