"""Memory profiles on the CPU: the experts' parameter bytes plain vs fp8, fp8's effect on the output, and the peak
resident memory of a call under each profile.

Part 1 (no weights, no run): both experts at the real Wan2.2-A14B config are built on the meta device, and their
storage is counted as `from_pretrained(dtype=bf16)` leaves it (RoPE, time embedder, norms, modulation in float32) and
after the `fp8` profile's layerwise casting. These are exact byte counts, not measurements of a run.

Part 2 (runs): one v2v call (2 steps, 5 frames at 32x48) per memory profile, each in a forked child process so
that its peak resident set (`ru_maxrss`, minus the child's resident set when it started) is its own; the build's
float32 weights count too. fp8's effect is the rel-L2 of the final latents (decoded frames are clipped to [0, 1]);
"bit_identical" compares the latents and the decoded frames. The CPU stands in for the accelerator: the offload
profiles run their hooks but move nothing, so their rows show the hooks' cost, not a saving.
`--size medium` widens the experts (8 heads x 128, ffn 4096, 2 layers: 41M parameters, 165 MB in float32 each) so
that weights dominate the resident set.

Run: python benchmarks/bench_memory.py [--size tiny|medium] [--json out.json]
"""

from __future__ import annotations

import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import base_parser, print_header, print_table, setup, write_json

from bernini_diffusers import BerniniPipeline, BerniniTransformer3DModel
from bernini_diffusers.memory import FP8_STORAGE_DTYPE, MEMORY_PROFILES, parameter_bytes
from bernini_diffusers.testing import (
    HIGH_NOISE_SEED,
    LOW_NOISE_SEED,
    cast_like_from_pretrained,
    get_tiny_components,
    make_test_video,
    tiny_transformer,
)

# Wan2.2-T2V-A14B's transformer config (each expert), the real size of Bernini-R's experts.
A14B_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip
SIZES = {"tiny": {}, "medium": {"num_attention_heads": 8, "ffn_dim": 4096, "num_layers": 2}}
CALL = {"prompt": "a red car", "task_type": "v2v", "num_frames": 5, "height": 32, "width": 48, "num_inference_steps": 2}


def real_size_bytes() -> dict[str, float]:
    """Bytes of one A14B expert's parameters and buffers, bf16 as loaded and after fp8 layerwise casting (meta)."""
    with torch.device("meta"):
        expert = BerniniTransformer3DModel(**A14B_CONFIG)
    cast_like_from_pretrained(expert, torch.bfloat16)
    params = sum(p.numel() for p in expert.parameters())
    bf16 = parameter_bytes(expert)
    expert.enable_layerwise_casting(storage_dtype=FP8_STORAGE_DTYPE, compute_dtype=torch.bfloat16)
    fp8 = parameter_bytes(expert)
    kept = sum(p.numel() for p in expert.parameters() if p.dtype != FP8_STORAGE_DTYPE)
    return {"parameters": params, "bf16_bytes": bf16, "fp8_bytes": fp8, "full_precision_parameters": kept}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _pipeline(size: str) -> BerniniPipeline:
    components = get_tiny_components()
    if SIZES[size]:
        components["transformer"] = tiny_transformer(HIGH_NOISE_SEED, **SIZES[size])
        components["transformer_2"] = tiny_transformer(LOW_NOISE_SEED, **SIZES[size])
    pipe = BerniniPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _profile_run(name: str, size: str, video: str, queue) -> None:
    """In a forked child: build, apply the profile, call once; send back the latents, the decoded frames, the
    experts' bytes, the child's peak RSS above its RSS at the start, and the call's time."""
    start_rss = _rss_bytes()
    pipe = _pipeline(size)
    experts = [pipe.transformer, pipe.transformer_2]
    plain_bytes = sum(parameter_bytes(e) for e in experts)
    if name != "none":
        pipe.enable_memory_profile(name, "cpu")
    stored = sum(parameter_bytes(e) for e in experts)
    began = time.perf_counter()
    latents = pipe(**CALL, video=video, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    seconds = time.perf_counter() - began
    frames = pipe.decode_latents(latents, "pt")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    # numpy copies: a tensor would travel as shared memory of a child that is about to exit
    queue.put({
        "latents": latents.numpy(), "frames": frames.numpy(), "plain_bytes": plain_bytes, "stored_bytes": stored,
        "peak_rss_growth": peak - start_rss, "call_s": seconds,
    })  # fmt: skip


def run_profiles(size: str, video: str) -> dict[str, dict]:
    # A fresh forked child per profile, so that each peak is its own (ru_maxrss only grows). The parent must not
    # have run torch's thread pool before forking (a child would deadlock in OpenMP), so nothing is warmed up here.
    context = multiprocessing.get_context("fork")
    results = {}
    # `low_ram` is chosen at load, from files: benchmarks/bench_low_ram.py measures it
    for name in ("none", *(name for name, profile in MEMORY_PROFILES.items() if not profile.at_load)):
        queue = context.Queue()
        child = context.Process(target=_profile_run, args=(name, size, video, queue))
        child.start()
        result = queue.get()
        child.join()
        if child.exitcode != 0:
            sys.exit(f"the {name} run failed (exit code {child.exitcode})")
        results[name] = {**result, "latents": torch.from_numpy(result["latents"]),
                         "frames": torch.from_numpy(result["frames"])}  # fmt: skip
    return results


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], repeats=1, warmup=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="experts' width in part 2")
    args = parser.parse_args()
    device, dtype = setup(args)
    if device.type != "cpu" or dtype != torch.float32:
        sys.exit("bench_memory runs on the CPU in fp32 (--device cpu --dtype fp32); bench_gpu.py measures GPUs")
    print_header(f"Memory profiles: A14B storage, and one v2v call per profile ({args.size} experts)", device, dtype)

    real = real_size_bytes()
    gb = 1e9
    print("Part 1: one A14B expert's storage (computed on the meta device, not measured)")
    print_table(
        ["parameters", "bf16 GB", "fp8 GB", "fp8/bf16", "kept in full precision"],
        [[f"{real['parameters'] / 1e9:.2f}e9", real["bf16_bytes"] / gb, real["fp8_bytes"] / gb,
          real["fp8_bytes"] / real["bf16_bytes"], f"{real['full_precision_parameters'] / 1e6:.0f}M params"]],
    )  # fmt: skip
    print()

    with tempfile.TemporaryDirectory() as tmp:
        video = str(make_test_video(Path(tmp) / "source.mp4", num_frames=8, width=48, height=32, fps=16, seed=1))
        results = run_profiles(args.size, video)
    plain = results["none"]
    reference = plain["latents"].double()
    rows, report = [], {}
    for name, r in results.items():
        rel = ((r["latents"].double() - reference).norm() / reference.norm()).item()
        row = {
            "experts_MB": r["stored_bytes"] / 1e6,
            "bytes_vs_plain": r["stored_bytes"] / r["plain_bytes"],
            "peak_rss_growth_MB": r["peak_rss_growth"] / 1e6,
            "rss_vs_none": r["peak_rss_growth"] / plain["peak_rss_growth"],
            "latents_rel_l2": rel,
            "bit_identical": torch.equal(r["latents"], plain["latents"]) and torch.equal(r["frames"], plain["frames"]),
            "call_s": r["call_s"],
        }
        report[name] = row
        rows.append([name, *row.values()])
    print("Part 2: one call per profile on the CPU (the CPU is also the offload device: offload saves nothing here)")
    print_table(["profile", *next(iter(report.values())).keys()], rows)
    print()
    fp8 = report["fp8"]
    exact = all(report[n]["bit_identical"] for n in ("resident", "expert_offload", "group_offload"))
    print(
        f"RESULT fp8_bytes_ratio_a14b={real['fp8_bytes'] / real['bf16_bytes']:.3f} "
        f"fp8_bytes_ratio_{args.size}={fp8['bytes_vs_plain']:.3f} fp8_rel_l2_{args.size}={fp8['latents_rel_l2']:.2e} "
        f"offload_bit_identical={exact}"
    )
    write_json(args.json, {"a14b_expert": real, "size": args.size, "profiles": report}, device, dtype)


if __name__ == "__main__":
    main()
