"""BerniniTransformer3DModel against diffusers' WanTransformer3DModel on the same weights.

Two comparisons, timed in one run with the contenders interleaved (ours, wan, ours, wan, ...):

(a) no conditions: ours(target) vs wan(target) on the same latent. Ours forwards to Wan's own `forward`, so this
    measures the cost of the subclass dispatch alone (expected ratio ~1.00, outputs bit-identical).
(b) packed: ours with one clean condition stream plus a target, each half the frames, vs wan on a single latent
    with all the frames, i.e. the SAME total token count. This measures the per-stream patch embedding, the
    per-stream RoPE with the float64 source-id rotation and the concatenation. Ours runs its output head on the
    target tokens only, Wan on all of them.

Run: python benchmarks/bench_transformer.py [--repeats 20] [--frames 6 --height 32 --width 44] [--json out.json]
"""

from __future__ import annotations

import torch
from _common import (
    base_parser,
    cast_model,
    interleaved,
    paired_ratio,
    print_header,
    print_table,
    setup,
    summary,
    write_json,
)
from diffusers import WanTransformer3DModel

from bernini_diffusers import BerniniTransformer3DModel
from bernini_diffusers.testing import TINY_TRANSFORMER_CONFIG
from bernini_diffusers.transformer_bernini import num_tokens

TARGET = 1.05


def build_config(args) -> dict:
    """The tiny test config at the benchmark's size."""
    return {
        **TINY_TRANSFORMER_CONFIG, "num_attention_heads": args.heads, "text_dim": 64, "freq_dim": 64,
        "ffn_dim": args.ffn_dim, "num_layers": args.layers, "rope_max_seq_len": 1024,
    }  # fmt: skip


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], repeats=20, warmup=1)
    parser.add_argument(
        "--frames", type=int, default=6, help="latent frames of the full sequence (even: (b) halves it)"
    )
    parser.add_argument("--height", type=int, default=32, help="latent height")
    parser.add_argument("--width", type=int, default=44, help="latent width")
    parser.add_argument("--text-len", type=int, default=512, help="text tokens (the pipeline always uses 512)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4, help="attention heads of head_dim 128")
    parser.add_argument("--ffn-dim", type=int, default=1024)
    args = parser.parse_args()
    if args.frames % 2:
        parser.error("--frames must be even: comparison (b) splits it into a condition and a target half")
    device, dtype = setup(args)

    config = build_config(args)
    ours = BerniniTransformer3DModel(**config).eval()
    wan = WanTransformer3DModel(**config).eval()
    wan.load_state_dict(ours.state_dict())
    cast_model(ours, device, dtype)
    cast_model(wan, device, dtype)

    full = (1, 16, args.frames, args.height, args.width)
    half = (1, 16, args.frames // 2, args.height, args.width)
    latent = torch.randn(full).to(device, dtype)
    condition = torch.randn(half).to(device, dtype)
    target = torch.randn(half).to(device, dtype)
    text = torch.randn(1, args.text_len, config["text_dim"]).to(device, dtype)
    timestep = torch.tensor([700], device=device)
    n_full = num_tokens(full)
    n_packed = num_tokens(half) * 2
    assert n_full == n_packed

    print_header("bench_transformer: BerniniTransformer3DModel vs WanTransformer3DModel (same weights)", device, dtype)
    print(
        f"model: {args.layers} layers, {args.heads} heads x 128, ffn {args.ffn_dim}, text {args.text_len} tokens; "
        f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters"
    )
    print(f"(a) no conditions: latent {list(full)} -> {n_full} tokens for both")
    print(
        f"(b) packed: ours condition {list(half)} + target {list(half)} -> {n_packed} tokens; "
        f"wan latent {list(full)} -> {n_full} tokens"
    )
    print(f"repeats={args.repeats} warmup={args.warmup}, interleaved, median per forward\n")

    with torch.no_grad():
        # Same weights, same inputs, no conditions: the outputs must be identical.
        out_ours = ours(latent, timestep, text, return_dict=False)[0]
        out_wan = wan(latent, timestep, text, return_dict=False)[0]
        max_diff = (out_ours - out_wan).abs().max().item()
        del out_ours, out_wan

        contenders = {
            "ours (a)": lambda: ours(latent, timestep, text, return_dict=False),
            "wan (a)": lambda: wan(latent, timestep, text, return_dict=False),
            "ours (b) packed": lambda: ours(
                target, timestep, text, return_dict=False, condition_latents=[condition], condition_source_ids=[1.0]
            ),
            "wan (b)": lambda: wan(latent, timestep, text, return_dict=False),
        }
        times = interleaved(contenders, repeats=args.repeats, warmup=args.warmup, device=device)

    stats = {name: summary(values) for name, values in times.items()}
    ratio_a = stats["ours (a)"]["median_s"] / stats["wan (a)"]["median_s"]
    ratio_b = stats["ours (b) packed"]["median_s"] / stats["wan (b)"]["median_s"]
    paired_a = paired_ratio(times["ours (a)"], times["wan (a)"])
    paired_b = paired_ratio(times["ours (b) packed"], times["wan (b)"])
    rows = []
    for label, ours_key, wan_key, tokens, ratio, paired in (
        ("(a) no conditions", "ours (a)", "wan (a)", n_full, ratio_a, paired_a),
        ("(b) packed, 1 cond + target", "ours (b) packed", "wan (b)", n_packed, ratio_b, paired_b),
    ):
        rows.append(
            (
                label,
                tokens,
                stats[ours_key]["median_s"],
                stats[wan_key]["median_s"],
                f"{ratio:.3f}",
                f"{paired:.3f}",
                f"{stats[ours_key]['iqr_s']:.3f} / {stats[wan_key]['iqr_s']:.3f}",
            )
        )
    print_table(("comparison", "tokens", "ours s/fwd", "wan s/fwd", "ours/wan", "paired", "IQR s ours / wan"), rows)
    print("\nours/wan = ratio of the medians; paired = median of the per-round ratios (robust to drifting load)")
    print(f"(a) max |ours - wan| on the same input: {max_diff:.3g}")
    ok = ratio_a <= TARGET and ratio_b <= TARGET
    print(
        f"RESULT transformer_ratio={ratio_a:.3f} packed_ratio={ratio_b:.3f} (target <= {TARGET}) "
        f"{'PASS' if ok else 'ABOVE TARGET'}"
    )
    write_json(
        args.json,
        {
            "benchmark": "transformer",
            "config": config,
            "latent_full": list(full),
            "latent_half": list(half),
            "text_len": args.text_len,
            "tokens": n_full,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "times_s": times,
            "stats": stats,
            "max_abs_diff_no_conditions": max_diff,
            "transformer_ratio": ratio_a,
            "packed_ratio": ratio_b,
            "transformer_ratio_paired": paired_a,
            "packed_ratio_paired": paired_b,
            "target": TARGET,
        },
        device,
        dtype,
    )


if __name__ == "__main__":
    main()
