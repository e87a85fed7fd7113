"""Step-cache presets on the tiny two-expert model: forwards run, seconds and rel-L2, each against the uncached call.

For each preset of `bernini_diffusers.acceleration.CACHE_PRESETS` (MagCache calibrated in the same run with
`calibrate_magcache`, for the call's mode), the call runs with the preset enabled on both experts. A forward counts as
run when it went through the whole block stack (the last block's feed-forward ran); a skipped one reused cached
residuals. rel-L2 is ||cached - uncached|| / ||uncached|| on the final latents. Seconds are the median of interleaved
repeats; the ratio is the preset's median over the uncached median. The tiny model's random weights change more
between steps than trained experts, so these are lower bounds of what the real model skips.

Run: python benchmarks/bench_cache.py [--steps 8] [--mode t2v] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import statistics

import torch
from _common import base_parser, interleaved, print_header, print_table, setup, tiny_components, write_json

from bernini_diffusers import BerniniPipeline
from bernini_diffusers.acceleration import CACHE_PRESETS, calibrate_magcache

EXPERTS = ("transformer", "transformer_2")


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], repeats=3, warmup=1)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps (8: 4 high-noise + 4 low-noise)")
    parser.add_argument("--mode", default="t2v", help="guidance mode of the t2v call")
    parser.add_argument("--frames", type=int, default=5, help="output frames")
    parser.add_argument("--size", type=int, nargs=2, default=(32, 48), metavar=("H", "W"), help="output size")
    args = parser.parse_args()
    device, dtype = setup(args)
    pipe = BerniniPipeline(**tiny_components(device, dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    call = {
        "prompt": "a red ball", "task_type": "t2v", "guidance_mode": args.mode, "num_frames": args.frames,
        "height": args.size[0], "width": args.size[1], "num_inference_steps": args.steps, "output_type": "latent",
    }  # fmt: skip

    counts = dict.fromkeys(EXPERTS, 0)
    for name in EXPERTS:
        getattr(pipe, name).blocks[-1].ffn.register_forward_hook(
            lambda *_, name=name: counts.__setitem__(name, counts[name] + 1)
        )

    def run():
        return pipe(**call, generator=torch.Generator().manual_seed(args.seed)).frames

    calibration = calibrate_magcache(pipe, {**call, "generator": torch.Generator().manual_seed(args.seed)})
    outputs, forwards = {}, {}
    contenders = {}
    for preset in ("none", *CACHE_PRESETS):

        def contender(preset=preset):
            pipe.disable_cache()
            if preset != "none":
                pipe.enable_cache_preset(preset, calibration=calibration if preset == "magcache" else None)
            for name in EXPERTS:
                counts[name] = 0
            with torch.no_grad():
                outputs[preset] = run()
            forwards[preset] = dict(counts)

        contenders[preset] = contender

    print_header(f"Step-cache presets, tiny model, {args.mode}, {args.steps} steps", device, dtype)
    times = interleaved(contenders, repeats=args.repeats, warmup=args.warmup, device=device)
    pipe.disable_cache()
    base_s = statistics.median(times["none"])
    reference = outputs["none"]
    total = sum(forwards["none"].values())
    rows, report = [], {}
    for preset in contenders:
        ran = sum(forwards[preset].values())
        rel = ((outputs[preset] - reference).norm() / reference.norm()).item()
        seconds = statistics.median(times[preset])
        per_expert = "+".join(str(forwards[preset][name]) for name in EXPERTS)
        rows.append([preset, f"{ran}/{total} ({per_expert})", total - ran, seconds, seconds / base_s, rel])
        report[preset] = {"forwards_run": forwards[preset], "forwards_uncached": total, "seconds": times[preset],
                          "seconds_ratio": seconds / base_s, "rel_l2": rel}  # fmt: skip
    print_table(["preset", "forwards run (high+low)", "skipped", "median s", "s / uncached", "rel-L2"], rows)
    print(f"\nMagCache calibration (steps per expert): "
          f"{ {name: calibration.steps(name) for name in EXPERTS} }")  # fmt: skip
    write_json(args.json, {"presets": report, "calibration": calibration.ratios, "call": call}, device, dtype)


if __name__ == "__main__":
    main()
