"""Regional torch.compile (`BerniniPipeline.compile`) against eager on the tiny pipeline: seconds per step, compile
time, graphs compiled over a full rv2v call, and the output difference.

Two pipelines with the same tiny weights run the same rv2v call (a 9-frame 48x32 source video and two reference
images, so the four branches none, V, VI-, VI+ run three packed lengths on both experts). One is compiled with
`pipe.compile(...)`. Its first call compiles: the graphs compiled in it (torch._dynamo's `unique_graphs`; every block
of both experts runs the same `WanTransformerBlock.forward`, so recompiles = graphs - 1) and its extra wall time are
reported (inductor's on-disk caches are off unless --warm_cache), then the graphs a second call adds (expected 0).
After that the two pipelines run interleaved, and the seconds per step are the median of the step-to-step times of
those calls (a callback stamps each step's end).
On a CPU the figures are informational: inductor's CPU code and a tiny model say little about a GPU at the real size.

Run: python benchmarks/bench_compile.py [--steps 40] [--repeats 1] [--warmup 1] [--mode M] [--backend inductor]
     [--dynamic true|false|none] [--warm_cache] [--json out.json]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config
from _common import base_parser, print_header, print_table, setup, synchronize, tiny_components, write_json
from torch._dynamo.utils import counters

from bernini_diffusers import BerniniPipeline
from bernini_diffusers.testing import make_test_image, make_test_video

DYNAMIC = {"true": True, "false": False, "none": None}


class StepClock:
    """`callback_on_step_end` that stamps the end of each step; `step_seconds` are the times between stamps."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, pipe, step, timestep, callback_kwargs):
        synchronize(pipe._execution_device)
        self.stamps.append(time.perf_counter())
        return {}

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], repeats=1, warmup=1)
    parser.add_argument("--steps", type=int, default=40, help="denoising steps per rv2v call (the official 40)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: torch's)")
    parser.add_argument("--dynamic", default="true", choices=sorted(DYNAMIC), help="torch.compile dynamic")
    parser.add_argument(
        "--warm_cache", action="store_true",
        help="let inductor reuse its on-disk caches from earlier runs (default: off: the compile time is a cold one)",
    )  # fmt: skip
    args = parser.parse_args()
    device, dtype = setup(args)
    # Inductor keeps compiled graphs on disk across processes; a warm cache would hide the compile time.
    torch._inductor.config.force_disable_caches = not args.warm_cache
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (the seconds per step are taken between steps)")

    pipes = {}
    for name in ("eager", "compiled"):
        pipes[name] = BerniniPipeline(**tiny_components(device, dtype)).to(device)
        pipes[name].set_progress_bar_config(disable=True)

    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    media = {
        "task_type": "rv2v",
        "video": str(make_test_video(root / "source.mp4", num_frames=9, width=48, height=32, seed=1)),
        "images": [
            str(make_test_image(root / "ref_a.png", width=32, height=32, seed=2)),
            str(make_test_image(root / "ref_b.png", width=40, height=60, seed=3)),
        ],
    }

    def call(pipe, clock=None) -> torch.Tensor:
        return pipe(
            "A small boat drifts on a calm lake.", num_inference_steps=args.steps, output_type="latent",
            generator=torch.Generator().manual_seed(args.seed), callback_on_step_end=clock, **media,
        ).frames  # fmt: skip

    def timed(pipe) -> tuple[float, list[float], torch.Tensor]:
        clock = StepClock()
        synchronize(device)
        start = time.perf_counter()
        out = call(pipe, clock)
        synchronize(device)
        return time.perf_counter() - start, clock.step_seconds(), out

    settings = {"dynamic": DYNAMIC[args.dynamic], "fullgraph": True, "mode": args.mode, "backend": args.backend}
    print_header("bench_compile: regional torch.compile vs eager (tiny pipeline, rv2v)", device, dtype)

    # The packed lengths the blocks see, from one eager call (also the warm-up of the eager pipeline).
    lengths: set[int] = set()
    hook = pipes["eager"].transformer.blocks[0].register_forward_pre_hook(lambda m, a: lengths.add(a[0].shape[1]))
    eager_first_s, _, eager_out = timed(pipes["eager"])
    hook.remove()

    torch._dynamo.reset()
    counters.clear()
    start = time.perf_counter()
    pipes["compiled"].compile(**settings)
    compile_call_s = time.perf_counter() - start
    first_s, _, compiled_out = timed(pipes["compiled"])
    graphs_first = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    second_s, _, _ = timed(pipes["compiled"])
    graphs_second = counters["stats"]["unique_graphs"] - graphs_first

    for _ in range(args.warmup - 1):
        call(pipes["eager"])
        call(pipes["compiled"])
    calls = {"eager": [], "compiled": []}
    steps = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        for name, pipe in pipes.items():
            seconds, per_step, _ = timed(pipe)
            calls[name].append(seconds)
            steps[name].extend(per_step)
    tmp.cleanup()

    eager_step, compiled_step = statistics.median(steps["eager"]), statistics.median(steps["compiled"])
    eager_call, compiled_call = statistics.median(calls["eager"]), statistics.median(calls["compiled"])
    compile_overhead = first_s - compiled_call
    diff = (compiled_out - eager_out).abs().max().item()
    print(
        f"rv2v, {args.steps} steps, 4 branches per step, block sequence lengths {sorted(lengths)}; "
        f"pipe.compile({', '.join(f'{k}={v!r}' for k, v in settings.items())})\n"
    )
    print_table(
        ("", "eager", "compiled", "compiled/eager"),
        [
            ("s/step (median)", eager_step, compiled_step, compiled_step / eager_step),
            ("s/call (median)", eager_call, compiled_call, compiled_call / eager_call),
            ("first call s", eager_first_s, first_s, first_s / eager_first_s),
        ],
    )
    print()
    print(f"pipe.compile() itself: {compile_call_s:.3f} s; compile time (first call - median compiled call): "
          f"{compile_overhead:.1f} s")  # fmt: skip
    print(f"graphs compiled in the first {args.steps}-step call: {graphs_first} (recompiles: {graphs_first - 1}); "
          f"in the second call: {graphs_second}; graph breaks: {breaks}")  # fmt: skip
    print(f"max |compiled - eager| on the final latents: {diff:.3g}")
    print(
        f"RESULT step_ratio={compiled_step / eager_step:.3f} call_ratio={compiled_call / eager_call:.3f} "
        f"compile_s={compile_overhead:.1f} graphs={graphs_first} recompiles={graphs_first - 1} "
        f"second_call_graphs={graphs_second} max_abs_diff={diff:.3g} (informational on CPU)"
    )
    write_json(
        args.json,
        {
            "benchmark": "compile", "steps": args.steps, "settings": {**settings, "backend": str(args.backend)},
            "warm_cache": args.warm_cache,
            "sequence_lengths": sorted(lengths), "eager_step_s": steps["eager"], "compiled_step_s": steps["compiled"],
            "eager_call_s": calls["eager"], "compiled_call_s": calls["compiled"], "eager_first_call_s": eager_first_s,
            "compiled_first_call_s": first_s, "compiled_second_call_s": second_s, "compile_s": compile_overhead,
            "graphs_first_call": graphs_first, "recompiles_first_call": graphs_first - 1,
            "graphs_second_call": graphs_second, "graph_breaks": breaks, "max_abs_diff": diff,
        },
        device,
        dtype,
    )  # fmt: skip


if __name__ == "__main__":
    main()
