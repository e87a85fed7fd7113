"""Ulysses sequence parallelism on GPUs: one expert forward on one GPU (U=1) against the same forward on N GPUs (U=N).

The model has the 14B experts' width (40 heads x 128, ffn 13824, text 4096) with fewer layers (`--layers`, 4 by
default; the real experts have 40, and the time per layer is what scales). The input is a packed sequence of
`--streams` streams of `--frames x --height x --width` latent each: the default 21 x 60 x 106 is 480x848 at 81 frames,
33,390 tokens per stream, so `--streams 2` is a v2v branch (66,780 tokens). 33,390 is not a multiple of 4 or 8, so the
padding path is measured too. Both contenders use the same attention backend (`--attention_backend`, auto by
default), bf16 weights, the same seed and inputs; U=1 runs on rank 0 while the others wait. The script also prints
max |U=N - U=1| of the outputs.

Run:  torchrun --nproc-per-node 8 benchmarks/bench_parallel.py [--streams 2] [--layers 4] [--repeats 5]
Without CUDA GPUs (or without torchrun) it says what it needs and exits.

Weight sharding (`shard_weights`, FSDP2), on the CPU with gloo:

    python benchmarks/bench_parallel.py --shard 2 [--shard_layers 8] [--repeats 3]

writes a medium expert (the 1.3B model's width, 1536 x 12 heads, ffn 8960, `--shard_layers` blocks, bf16: about
0.75 GB at 8 blocks) in the diffusers layout, then launches `torchrun --nproc-per-node N` twice on it: every rank
loading the whole expert (`from_pretrained`, the unsharded layout) and every rank reading only its shards (the
`from_pretrained_sharded` path), the same with the shards stored in float8 (`memory_profile="fp8"`: gathered and
computed in bf16), plus the whole expert copied out of the memory map (as a load that converts leaves it). Each run
reports per rank its parameter bytes, the anonymous memory (RSS less mapped file pages) after the
load and after the forwards, the peak RSS, and the time of one forward under Ulysses N; the script prints
sharded / whole ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=21, help="latent frames per stream")
    parser.add_argument("--height", type=int, default=60, help="latent height")
    parser.add_argument("--width", type=int, default=106, help="latent width")
    parser.add_argument("--streams", type=int, default=2, help="streams in the packed sequence (conditions + target)")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (the 14B experts have 40)")
    parser.add_argument("--heads", type=int, default=40, help="attention heads (14B: 40, 1.3B: 12)")
    parser.add_argument("--attention_backend", default="auto", choices=["auto", "sdpa", "fa2", "fa3"])
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards of each contender")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards of each contender first")
    parser.add_argument("--shard", type=int, default=0, metavar="N",
                        help="measure weight sharding on the CPU with N processes instead (see above)")
    parser.add_argument("--shard_layers", type=int, default=8, help="blocks of the --shard expert")
    parser.add_argument("--shard_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shard_mode", choices=("whole", "copied", "sharded", "sharded_fp8"), default="whole", help=argparse.SUPPRESS)
    parser.add_argument("--shard_out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def build(args: argparse.Namespace, device: torch.device):
    from bernini_diffusers import BerniniTransformer3DModel
    from bernini_diffusers.attention import set_attention_backend
    from bernini_diffusers.testing import cast_like_from_pretrained

    torch.manual_seed(0)
    model = BerniniTransformer3DModel(
        num_attention_heads=args.heads, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
        freq_dim=256, ffn_dim=13824, num_layers=args.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    )
    # bf16 as from_pretrained(torch_dtype=torch.bfloat16) leaves it: RoPE, time embedder and norms stay float32
    model = cast_like_from_pretrained(model.to(device), torch.bfloat16).eval()
    backend = set_attention_backend(model, args.attention_backend)
    g = torch.Generator("cpu").manual_seed(1)
    shape = (1, 16, args.frames, args.height, args.width)
    streams = [torch.randn(shape, generator=g).to(device, torch.bfloat16) for _ in range(args.streams)]
    text = torch.randn(1, 512, 4096, generator=g).to(device, torch.bfloat16)
    inputs = dict(
        hidden_states=streams[-1],
        timestep=torch.tensor([900], device=device),
        encoder_hidden_states=text,
        condition_latents=streams[:-1] or None,
        condition_source_ids=[float(i + 1) for i in range(args.streams - 1)] or None,
        return_dict=False,
    )
    return model, inputs, backend


def timed(fn, repeats: int, warmup: int, together: bool = True) -> tuple[list[float], torch.Tensor]:
    """Seconds of each timed call of `fn` and its last output. `together`: every rank calls `fn`, so each call starts
    after a barrier; otherwise this rank runs alone."""
    import torch.distributed as dist

    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        if together:
            dist.barrier()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, out


SHARD_WIDTH = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, text_dim=4096, freq_dim=256)


def shard_driver(args: argparse.Namespace) -> int:
    """Write the medium expert, run the whole and the sharded load under torchrun, print the ratios."""
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    from bernini_diffusers import BerniniTransformer3DModel

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "transformer"
        torch.manual_seed(0)
        model = BerniniTransformer3DModel(
            in_channels=16, out_channels=16, num_layers=args.shard_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", **SHARD_WIDTH,
        ).to(torch.bfloat16)  # fmt: skip
        model.save_pretrained(folder)
        del model
        results = {}
        for mode in ("whole", "copied", "sharded", "sharded_fp8"):
            out = Path(tmp) / f"{mode}.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.shard}",
                       __file__, "--shard_worker", str(folder), "--shard_mode", mode, "--shard_out", str(out),
                       "--repeats", str(args.repeats), "--warmup", str(args.warmup)]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            subprocess.run(command, check=True, env=env)
            results[mode] = json.loads(out.read_text())
    whole, copied, sharded, fp8 = results["whole"], results["copied"], results["sharded"], results["sharded_fp8"]
    print(f"CPU, gloo, {args.shard} processes, Ulysses {args.shard}; expert of {args.shard_layers} blocks at the 1.3B "
          f"width, bf16, {whole['total_bytes'] / 1e9:.2f} GB; {whole['tokens']} tokens per forward")
    print("| per rank (max over ranks) | whole, memory-mapped | whole, copied | sharded (FSDP2) | sharded fp8 | "
          "sharded / whole mapped | sharded / whole copied | sharded fp8 / whole mapped |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [("parameter bytes", "param_bytes", 1e9, "GB"),
            ("anonymous memory added by the load", "load_anon", 1e9, "GB"),
            ("anonymous memory after the forwards", "forward_anon", 1e9, "GB"),
            ("peak RSS after the load (with mapped file pages)", "load_peak_rss", 1e9, "GB"),
            ("peak RSS after the forwards", "peak_rss", 1e9, "GB"),
            ("time per forward", "forward_s", 1, "s")]  # fmt: skip
    for label, key, scale, unit in rows:
        a, c, b, f = max(whole[key]), max(copied[key]), max(sharded[key]), max(fp8[key])
        print(f"| {label} | {a / scale:.3f} {unit} | {c / scale:.3f} {unit} | {b / scale:.3f} {unit} | "
              f"{f / scale:.3f} {unit} | {b / a:.3f} | {b / c:.3f} | {f / a:.3f} |")
    print(f"|sharded - whole| of the forward output's sum: {abs(sharded['checksum'] - whole['checksum']):.3e}; "
          f"sharded fp8 (weights rounded to float8): {abs(fp8['checksum'] - whole['checksum']):.3e}")
    return 0


def shard_worker(args: argparse.Namespace) -> int:
    """One rank: load the expert whole or by shards, measure bytes, RSS and the forward time, rank 0 writes JSON."""
    import json
    import resource
    from pathlib import Path

    import psutil
    import torch.distributed as dist

    from bernini_diffusers import BerniniTransformer3DModel
    from bernini_diffusers.memory import store_float8
    from bernini_diffusers.parallel import (
        UlyssesSequence,
        init_parallel_state,
        local_parameter_bytes,
        parallelize_model,
        shard_model,
    )
    from bernini_diffusers.sharded_load import _folder_plan, cast_skeleton, materialize_shards

    torch.set_num_threads(1)
    state = init_parallel_state(ulysses_degree=int(os.environ["WORLD_SIZE"]))
    # Anonymous memory (RSS less the file-backed pages): the memory-mapped safetensors pages count in RSS while
    # mapped but are the page cache, shared by every process of a node that reads the file.
    before = psutil.Process().memory_info()
    folder = Path(args.shard_worker)
    if args.shard_mode in ("whole", "copied"):
        model = BerniniTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
        if args.shard_mode == "copied":
            # Out of the memory map, as a load that converts leaves the weights (original checkpoints, a dtype cast)
            for param in model.parameters():
                param.data = param.data.clone()
    else:
        plan, model = _folder_plan(folder, "transformer")
        model = cast_skeleton(plan, model, torch.bfloat16)
        # sharded_fp8: the fp8 profile's layers stored in float8, gathered in bf16 (from_pretrained_sharded's fp8)
        compute = store_float8(model) if args.shard_mode == "sharded_fp8" else None
        shard_model(model, state.data_group, "cpu", param_dtype=compute)
        materialize_shards(plan, model, state.data_group, state.device, compute, torch_dtype=torch.bfloat16)
    loaded = psutil.Process().memory_info()
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # global sizes, DTensor or not
    parallelize_model(model, UlyssesSequence(state.ulysses_group, state.ulysses_degree, state.ulysses_rank))
    g = torch.Generator("cpu").manual_seed(1)
    latent = torch.randn(1, 16, 2, 16, 16, generator=g).to(torch.bfloat16)  # 128 tokens per stream
    inputs = dict(hidden_states=latent, timestep=torch.tensor([900]), condition_latents=[latent.clone()],
                  condition_source_ids=[1.0], return_dict=False,
                  encoder_hidden_states=torch.randn(1, 64, 4096, generator=g).to(torch.bfloat16))  # fmt: skip
    with torch.no_grad():
        for _ in range(args.warmup):
            model(**inputs)
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            start = time.perf_counter()
            out = model(**inputs)[0]
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    after = psutil.Process().memory_info()
    anonymous = [(m.rss - m.shared) - (before.rss - before.shared) for m in (loaded, after)]
    mine = [local_parameter_bytes(model), load_peak, peak, *anonymous, statistics.median(times)]
    gathered = [None] * state.world_size
    dist.all_gather_object(gathered, mine)
    if state.rank == 0:
        keys = ("param_bytes", "load_peak_rss", "peak_rss", "load_anon", "forward_anon", "forward_s")
        report = {key: [rank[i] for rank in gathered] for i, key in enumerate(keys)}
        report.update(total_bytes=total, tokens=2 * 128, checksum=out.float().sum().item())
        Path(args.shard_out).write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main() -> int:
    args = parse_args()
    if args.shard_worker:
        return shard_worker(args)
    if args.shard:
        return shard_driver(args)
    if not torch.cuda.is_available():
        print("bench_parallel.py measures Ulysses on CUDA GPUs (one per process, at least 2); this machine has none.")
        return 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        print("bench_parallel.py compares 1 GPU with N: launch it with `torchrun --nproc-per-node N` (N >= 2, "
              f"N <= {torch.cuda.device_count()} here).", file=sys.stderr)
        return 2

    import torch.distributed as dist

    from bernini_diffusers.parallel import (
        UlyssesSequence,
        check_ulysses_degree,
        init_parallel_state,
        parallelize_model,
    )
    from bernini_diffusers.transformer_bernini import num_tokens

    try:
        check_ulysses_degree(args.heads, world, f"the benchmark model (--heads {args.heads})")
    except ValueError as err:  # U is the process count here: say which counts to launch
        print(f"{err} Launch that many processes (torchrun --nproc-per-node).", file=sys.stderr)
        return 2
    state = init_parallel_state(ulysses_degree=world)
    model, inputs, backend = build(args, state.device)
    tokens = args.streams * num_tokens((args.frames, args.height, args.width))

    with torch.no_grad():
        # U=1: rank 0 alone, the others wait at the barrier after it.
        single_times, single = [], None
        if state.rank == 0:
            single_times, single = timed(lambda: model(**inputs)[0], args.repeats, args.warmup, together=False)
        dist.barrier()
        parallelize_model(model, UlyssesSequence(state.ulysses_group, world, state.ulysses_rank))
        parallel_times, parallel = timed(lambda: model(**inputs)[0], args.repeats, args.warmup)

    if state.rank == 0:
        one, many = statistics.median(single_times), statistics.median(parallel_times)
        print(f"{torch.cuda.get_device_name(state.device)} x {world}, bf16, attention {backend}, engine {state.engine}")
        print(f"{args.layers} layers x {args.heads} heads, {args.streams} streams, {tokens} tokens "
              f"(padded to {-(-tokens // world) * world})")
        print(f"U=1: {one:.4f} s/forward   U={world}: {many:.4f} s/forward   speed-up {one / many:.2f}x "
              f"(efficiency {one / many / world:.0%})")
        print(f"max |U={world} - U=1| = {(parallel.float() - single.float()).abs().max().item():.3e}")
        print(f"RESULT ulysses_speedup={one / many:.3f} gpus={world} tokens={tokens}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
