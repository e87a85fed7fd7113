"""Peak memory of `bernini export` against the size of the checkpoint shards it converts.

The script writes, in a temporary folder, an original-layout checkpoint (`ema.diff_dec.transformer[_2].*` keys,
sharded safetensors with an index) of random weights for both experts of a transformer config scaled so the two
checkpoints hold at least 1 GB, and a base folder whose `transformer*/config.json` is that config (VAE, text encoder,
tokenizer and scheduler are the tiny ones). It then runs, each in its own process:

- a baseline that imports what the export imports (torch, diffusers, the package), and
- `python -m bernini_diffusers.cli export ...` on the checkpoint,

and reads each process's peak resident memory (`VmHWM` of /proc/self/status, written by the process as it exits:
`ru_maxrss` of a child would start from this script's own RSS, copied at fork). The export streams one tensor at a
time (plus the pages of the source shard it is reading), so its peak above the baseline should stay near one source
shard. Target: peak - baseline <= 1.5 x the largest source shard. Everything is deleted at the end. Linux only.

Run: python benchmarks/bench_export.py [--layers 8] [--dim 2048] [--shard_size 256MB] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import DTYPES, print_header, print_table, write_json
from huggingface_hub.serialization._base import parse_size_to_int

from bernini_diffusers.hub_export.convert import expected_tensors, expert_skeleton
from bernini_diffusers.loading import CHECKPOINT_FOLDERS
from bernini_diffusers.testing import TINY_TRANSFORMER_CONFIG, save_tiny_pretrained, write_random_original_checkpoint

TARGET = 1.5
BASELINE_IMPORTS = (
    "import accelerate, safetensors.torch, bernini_diffusers.cli, bernini_diffusers.loading, "
    "bernini_diffusers.hub_export.export, bernini_diffusers.pipeline_bernini"
)
# Runs `-c CODE` or a module as __main__, and writes the process's peak RSS (kB) to $BENCH_PEAK_FILE at exit.
MEASURED = """
import atexit, os, runpy, sys
def _report():
    peak = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:')).split()[1]
    open(os.environ['BENCH_PEAK_FILE'], 'w').write(peak)
atexit.register(_report)
if sys.argv[1] == '-c':
    exec(sys.argv[2])
else:
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks per expert")
    parser.add_argument("--dim", type=int, default=2048, help="model width (heads x 128)")
    parser.add_argument("--ffn_dim", type=int, default=8192, help="feed-forward width")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the random checkpoint")
    parser.add_argument("--shard_size", default="256MB", help="largest source shard (one tensor more at most)")
    parser.add_argument("--max_shard_size", default="10GB", help="--max_shard_size of the export")
    parser.add_argument("--min_total", default="1GB", help="refuse a config whose two checkpoints hold less")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON here")
    return parser.parse_args()


def run_measured(arguments: list[str], log: Path) -> tuple[float, int]:
    """Run `python -c CODE` or `python -m MODULE ARGS` (as `arguments`); return its wall time and peak RSS in bytes."""
    peak_file = log.with_suffix(".peak")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "BENCH_PEAK_FILE": str(peak_file)}
    start = time.perf_counter()
    with open(log, "wb") as out:
        result = subprocess.run(
            [sys.executable, "-c", MEASURED, *arguments], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(arguments[:3])} ... failed ({result.returncode}):\n{log.read_text()[-3000:]}")
    return seconds, int(peak_file.read_text()) * 1024


def gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def main() -> None:
    args = parse_args()
    dtype = DTYPES[args.dtype]
    if args.dim % 128:
        sys.exit("--dim must be a multiple of 128 (the heads are 128 wide)")
    if not Path("/proc/self/status").is_file():
        sys.exit("this benchmark reads peak memory from /proc/self/status (Linux)")
    # The tiny test config, widened and deepened to the requested size.
    config = {
        **TINY_TRANSFORMER_CONFIG, "num_attention_heads": args.dim // 128, "freq_dim": 256,
        "ffn_dim": args.ffn_dim, "num_layers": args.layers, "rope_max_seq_len": 1024,
    }  # fmt: skip
    per_expert = sum(torch.Size(shape).numel() for shape, _ in expected_tensors(expert_skeleton(config)).values())
    total = 2 * per_expert * dtype.itemsize
    if total < parse_size_to_int(args.min_total):
        sys.exit(f"the two checkpoints would hold {gib(total)} < --min_total {args.min_total}; add --layers")
    device = torch.device("cpu")
    print_header("bench_export: peak memory of `bernini export`", device, dtype)
    print(
        f"config: {args.layers} layers, dim {args.dim}, ffn {args.ffn_dim}: {per_expert / 1e6:.0f}M parameters per "
        f"expert, {args.dtype}; two checkpoints {gib(total)}"
    )

    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        tmp = Path(tmp)
        # 1. The base: tiny components, with the scaled config for both experts (their weights are never read).
        base = save_tiny_pretrained(tmp / "base", layout="wan")
        for expert in CHECKPOINT_FOLDERS:
            for weights in (base / expert).glob("*.safetensors*"):
                weights.unlink()
            (base / expert / "config.json").write_text(
                json.dumps({"_class_name": "WanTransformer3DModel", **config}, indent=2)
            )
        # 2. The original checkpoints, shard by shard.
        start = time.perf_counter()
        shards = []
        for seed, (expert, folder) in enumerate(CHECKPOINT_FOLDERS.items()):
            shards += write_random_original_checkpoint(
                tmp / "Bernini-R" / folder, config, expert, parse_size_to_int(args.shard_size), dtype, seed
            )
        largest = max(p.stat().st_size for p in shards)
        written = sum(p.stat().st_size for p in shards)
        print(
            f"checkpoint: {len(shards)} shards, {gib(written)}, largest shard {gib(largest)} "
            f"(written in {time.perf_counter() - start:.1f} s)"
        )

        # 3. Baseline, then the export, each in a fresh process.
        base_s, base_rss = run_measured(["-c", BASELINE_IMPORTS], tmp / "baseline.log")
        out = tmp / "out"
        command = [
            "bernini_diffusers.cli",
            "export",
            "--base",
            str(base),
            "--high_noise_ckpt",
            str(tmp / "Bernini-R" / CHECKPOINT_FOLDERS["transformer"]),
            "--low_noise_ckpt",
            str(tmp / "Bernini-R" / CHECKPOINT_FOLDERS["transformer_2"]),
            "--out",
            str(out),
            "--max_shard_size",
            args.max_shard_size,
        ]
        export_s, export_rss = run_measured(command, tmp / "export.log")
        outputs = sorted(out.glob("transformer*/*.safetensors"))
        largest_out = max(p.stat().st_size for p in outputs)

    above = export_rss - base_rss
    ratio = above / largest
    print()
    print_table(
        ["process", "peak RSS", "wall time"],
        [
            ("baseline (imports)", gib(base_rss), f"{base_s:.1f} s"),
            ("bernini export", gib(export_rss), f"{export_s:.1f} s ({written / 2**30 / export_s:.2f} GiB/s)"),
            ("export - baseline", gib(above), f"{ratio:.2f} x the largest source shard"),
        ],
    )
    print(f"\nsource shards: largest {gib(largest)}; output: {len(outputs)} shards, largest {gib(largest_out)}")
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"RESULT export_peak_above_baseline={ratio:.2f}x_largest_shard (target <= {TARGET}) {verdict}")
    payload = {
        "config": config,
        "checkpoint_bytes": written,
        "num_source_shards": len(shards),
        "largest_source_shard_bytes": largest,
        "largest_output_shard_bytes": largest_out,
        "baseline_peak_rss_bytes": base_rss,
        "export_peak_rss_bytes": export_rss,
        "export_seconds": export_s,
        "peak_above_baseline_over_largest_shard": ratio,
        "target": TARGET,
    }
    write_json(args.json, payload, device, dtype)  # adds the environment (dtype, CPUs, versions) and the load


if __name__ == "__main__":
    main()
