"""The `low_ram` profile and the memory plan on the CPU: peak RSS of a whole call per memory profile, measured in a
fresh process each, against the plan's estimate (`BerniniPipeline.estimate_memory`) and against one expert plus the
text encoder; the output of every exact profile against the resident run's, bit for bit.

A medium model is built and saved to disk first: the tiny model's text encoder, VAE and tokenizer with two experts of
12 heads x 128, ffn 8960, 6 layers (278M parameters, 1.11 GB in float32 each). Each profile then runs in a spawned
child: imports, the plan (made before the load, in that process), `from_pretrained(folder, memory_profile=...)`, one
v2v call (5 frames at 32x48, 2 steps: one on each expert) and the decode. Peak RSS is the child's `VmHWM` (the
whole process: libraries, load and call); "growth" subtracts the child's RSS after its imports. The CPU is also the
offload device, so the offload profiles save nothing here; `low_ram` does (one expert in RAM at a time).

Run: python benchmarks/bench_low_ram.py [--profiles resident low_ram ...] [--json out.json]
"""

from __future__ import annotations

import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import base_parser, print_header, print_table, setup, write_json

MEDIUM = {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 6}
CALL = {"prompt": "a red car", "task_type": "v2v", "num_frames": 5, "height": 32, "width": 48, "num_inference_steps": 2}
PROFILES = ("resident", "expert_offload", "group_offload", "fp8", "low_ram", "fp8+low_ram")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def build(folder: Path) -> dict[str, int]:
    from bernini_diffusers import BerniniPipeline
    from bernini_diffusers.memory import parameter_bytes
    from bernini_diffusers.testing import HIGH_NOISE_SEED, LOW_NOISE_SEED, get_tiny_components, tiny_transformer

    components = get_tiny_components()
    components["transformer"] = tiny_transformer(HIGH_NOISE_SEED, **MEDIUM)
    components["transformer_2"] = tiny_transformer(LOW_NOISE_SEED, **MEDIUM)
    pipe = BerniniPipeline(**components)
    pipe.save_pretrained(folder)
    return {name: parameter_bytes(getattr(pipe, name)) for name in ("transformer", "text_encoder", "vae")}


def child(profile: str, folder: str, video: str, out: str, queue) -> None:
    start = _status_bytes("VmRSS")
    from bernini_diffusers import BerniniPipeline

    plan = BerniniPipeline.estimate_memory(
        folder, profile, "fp32", device="cpu", dtype=torch.float32, video=video, media_sizes={"video": (48, 32)},
        **CALL,
    )
    began = time.perf_counter()
    pipe = BerniniPipeline.from_pretrained(folder, memory_profile=profile, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(**CALL, video=video, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    frames = pipe.decode_latents(latents, "pt")
    seconds = time.perf_counter() - began
    np.save(f"{out}/{profile}_latents.npy", latents.numpy())
    np.save(f"{out}/{profile}_frames.npy", frames.numpy())
    queue.put({
        "start_rss": start, "peak_rss": _status_bytes("VmHWM"), "estimate": plan.ram_bytes,
        "plan_process": plan.parts["this process"], "seconds": seconds,
    })  # fmt: skip


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], repeats=1, warmup=0)
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=PROFILES)
    args = parser.parse_args()
    device, dtype = setup(args)
    if device.type != "cpu" or dtype != torch.float32:
        sys.exit("bench_low_ram runs on the CPU in fp32 (--device cpu --dtype fp32)")
    print_header("low_ram and the memory plan: peak RSS of a whole call per profile (medium model)", device, dtype)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per profile: each peak is its own
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        from bernini_diffusers.testing import make_test_video

        folder = Path(tmp) / "medium"
        sizes = build(folder)
        video = str(make_test_video(Path(tmp) / "source.mp4", num_frames=8, width=48, height=32, fps=16, seed=1))
        for profile in args.profiles:
            queue = context.Queue()
            process = context.Process(target=child, args=(profile, str(folder), video, tmp, queue))
            process.start()
            result = queue.get()
            process.join()
            if process.exitcode != 0:
                sys.exit(f"the {profile} run failed (exit code {process.exitcode})")
            result["latents"] = np.load(f"{tmp}/{profile}_latents.npy")
            result["frames"] = np.load(f"{tmp}/{profile}_frames.npy")
            results[profile] = result
    expert, text_encoder = sizes["transformer"], sizes["text_encoder"]
    rows, report = [], {}
    for profile, r in results.items():
        # the exact profiles against resident, fp8+low_ram against fp8 (float8 storage rounds the weights)
        reference = results.get("fp8" if profile.startswith("fp8") else "resident")
        growth = r["peak_rss"] - r["start_rss"]
        row = {
            "peak_rss_GB": r["peak_rss"] / 1e9,
            "estimate_GB": r["estimate"] / 1e9,
            "estimate/measured": r["estimate"] / r["peak_rss"],
            "growth_GB": growth / 1e9,
            "growth/(expert+TE)": growth / (expert + text_encoder),
            "bit_identical": None if reference is None or reference is r else bool(
                np.array_equal(r["latents"], reference["latents"]) and np.array_equal(r["frames"], reference["frames"])
            ),
            "load+call_s": r["seconds"],
        }
        report[profile] = row
        rows.append([profile, *row.values()])
    print(f"one expert {expert / 1e9:.2f} GB, text encoder {text_encoder / 1e6:.1f} MB, VAE {sizes['vae'] / 1e6:.1f} MB "
          "(float32)")  # fmt: skip
    print_table(["profile", *next(iter(report.values())).keys()], rows)
    if "low_ram" in report and "resident" in report:
        low, resident = report["low_ram"], report["resident"]
        print(
            f"RESULT low_ram_growth_over_expert_plus_te={low['growth/(expert+TE)']:.3f} "
            f"low_ram_peak_vs_resident={low['peak_rss_GB'] / resident['peak_rss_GB']:.3f} "
            f"low_ram_bit_identical={low['bit_identical']} "
            f"worst_estimate_error={max(abs(r['estimate/measured'] - 1) for r in report.values()):.3f}"
        )
    write_json(args.json, {"sizes": sizes, "profiles": report}, device, dtype)


if __name__ == "__main__":
    main()
