"""BerniniPipeline (t2v) against diffusers' WanPipeline end to end, on the same tiny components.

Both pipelines share one set of objects (tokenizer, UMT5 encoder, VAE, both experts), run the same number of steps at
the same size with two forwards per step, and decode to `output_type="np"`. Rows, timed in one run with the
contenders interleaved (bernini t2v, wan, bernini t2v_apg, wan, ...):

- `t2v` guidance (plain CFG) vs WanPipeline: the target ratio.
- `t2v_apg` (the t2v task's default) vs WanPipeline: informational; APG adds per-step float64 projections.

The tiny models make the forward cheap, so this measures the pipeline's own per-call and per-step overhead (text
encoding, scheduler setup, guidance, decode) rather than the transformer.

Run: python benchmarks/bench_pipeline.py [--steps 10] [--repeats 20] [--json out.json]
"""

from __future__ import annotations

import torch
from _common import (
    base_parser,
    interleaved,
    paired_ratio,
    print_header,
    print_table,
    setup,
    summary,
    tiny_components,
    write_json,
)
from diffusers import UniPCMultistepScheduler, WanPipeline

from bernini_diffusers import BerniniPipeline

TARGET = 1.05
PROMPT = "A red fox runs through fresh snow at sunrise."


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], repeats=20, warmup=2)
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of both pipelines")
    parser.add_argument("--num-frames", type=int, default=9)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--guidance-scale", type=float, default=4.0, help="Wan's guidance_scale = Bernini's omega_txt")
    args = parser.parse_args()
    device, dtype = setup(args)

    components = tiny_components(device, dtype)
    bernini = BerniniPipeline(**components).to(device)
    wan = WanPipeline(
        tokenizer=components["tokenizer"],
        text_encoder=components["text_encoder"],
        vae=components["vae"],
        scheduler=UniPCMultistepScheduler.from_config(bernini.scheduler.config),
        transformer=components["transformer"],
        transformer_2=components["transformer_2"],
        boundary_ratio=0.875,
    ).to(device)
    for pipe in (bernini, wan):
        pipe.set_progress_bar_config(disable=True)

    size = dict(num_frames=args.num_frames, height=args.height, width=args.width, num_inference_steps=args.steps)

    def run_bernini(mode: str):
        return lambda: bernini(
            PROMPT,
            task_type="t2v",
            guidance_mode=mode,
            omega_txt=args.guidance_scale,
            generator=torch.Generator().manual_seed(args.seed),
            output_type="np",
            **size,
        )

    def run_wan():
        return wan(
            PROMPT,
            guidance_scale=args.guidance_scale,
            generator=torch.Generator().manual_seed(args.seed),
            output_type="np",
            **size,
        )

    latent = (1, 16, (args.num_frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    tokens = latent[2] * (latent[3] // 2) * (latent[4] // 2)
    print_header("bench_pipeline: BerniniPipeline (t2v) vs WanPipeline, tiny components", device, dtype)
    print(
        f"{args.steps} steps, {args.num_frames} frames {args.height}x{args.width} "
        f"(latent {list(latent)}, {tokens} tokens), 2 forwards/step, output_type=np"
    )
    print(f"repeats={args.repeats} warmup={args.warmup}, interleaved, median per call\n")

    # The outputs differ by design (Bernini prefixes a system prompt and uses the official flow sigmas), so no
    # numerical comparison here; shapes must match.
    shape_b = run_bernini("t2v")().frames.shape
    shape_w = run_wan().frames.shape
    assert shape_b == shape_w, (shape_b, shape_w)

    contenders = {
        "bernini t2v": run_bernini("t2v"),
        "wan (vs t2v)": run_wan,
        "bernini t2v_apg": run_bernini("t2v_apg"),
        "wan (vs t2v_apg)": run_wan,
    }
    times = interleaved(contenders, repeats=args.repeats, warmup=args.warmup, device=device)
    stats = {name: summary(values) for name, values in times.items()}

    rows, figures = [], {}
    for label, ours_key, wan_key in (
        ("t2v (plain CFG)", "bernini t2v", "wan (vs t2v)"),
        ("t2v_apg (informational)", "bernini t2v_apg", "wan (vs t2v_apg)"),
    ):
        ratio = stats[ours_key]["median_s"] / stats[wan_key]["median_s"]
        paired = paired_ratio(times[ours_key], times[wan_key])
        figures[ours_key] = {"ratio": ratio, "paired_ratio": paired}
        rows.append(
            (
                label,
                stats[ours_key]["median_s"],
                stats[wan_key]["median_s"],
                f"{ratio:.3f}",
                f"{paired:.3f}",
                f"{1000 * stats[ours_key]['median_s'] / args.steps:.1f} / "
                f"{1000 * stats[wan_key]['median_s'] / args.steps:.1f}",
            )
        )
    print_table(("bernini mode", "bernini s/call", "wan s/call", "ours/wan", "paired", "ms/step ours / wan"), rows)
    print("\nours/wan = ratio of the medians; paired = median of the per-round ratios (robust to drifting load)")
    ratio = figures["bernini t2v"]["ratio"]
    apg_ratio = figures["bernini t2v_apg"]["ratio"]
    print(
        f"RESULT pipeline_ratio={ratio:.3f} (target <= {TARGET}) {'PASS' if ratio <= TARGET else 'ABOVE TARGET'}; "
        f"apg_ratio={apg_ratio:.3f} (informational)"
    )
    write_json(
        args.json,
        {
            "benchmark": "pipeline",
            "steps": args.steps,
            "size": size,
            "latent": list(latent),
            "tokens": tokens,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "times_s": times,
            "stats": stats,
            "pipeline_ratio": ratio,
            "pipeline_ratio_paired": figures["bernini t2v"]["paired_ratio"],
            "apg_ratio": apg_ratio,
            "apg_ratio_paired": figures["bernini t2v_apg"]["paired_ratio"],
            "target": TARGET,
        },
        device,
        dtype,
    )


if __name__ == "__main__":
    main()
