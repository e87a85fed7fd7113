"""Long videos with temporal context windows: time per output frame and the denoising loop's peak memory from 2 to
8 windows, on the CPU with the tiny model.

Each row is one v2v edit (the task's default guidance, `v2v_apg`: 2 forwards per window and step) of an in-memory
source video whose length gives exactly that many windows of `--context_frames` frames overlapping by
`--context_overlap` (17 and 4 by default: windows of 5 latent frames, a stride of 4): 17 + 16 x (n - 1) frames for
n windows. The clip length comes from `windows.plan_windows`, the script checks that it plans n windows, and the
forwards counted on the experts must be n x 2 per step. The row "1 (plain)" is a plain call (`context_frames=None`)
at one window's length, the baseline a window costs; the optional last row runs the longest clip as ONE window (a
plain call at its full length, within the tiny experts' RoPE table) to show what attention over the whole clip
costs instead.

Time: a forward pre-hook on the experts stamps the first forward of a call and `callback_on_step_end` the end of each
step, so seconds per step cover the denoising loop only (no media, text or VAE encoding; `output_type="latent"`, so
no decode). Milliseconds per output frame are those seconds per step over the clip's frames. The rows are timed in
the main process after the memory runs, interleaved (row 1, row 2, ..., row 1, ...) so that a change in the machine's
load hits every row: `--warmup` untimed rounds, then `--repeats` timed ones; each row reports the median.

Memory, Linux only: first, each row runs in its own forked child process (`--warmup` calls, then `--repeats` measured
ones, the median reported), which measures its own peak resident set (`VmHWM` in /proc/self/status). Writing "5" to
/proc/self/clear_refs resets that mark to the current resident set; the child does so before each call, and again right
before its first transformer forward, after reading the peak of the part before (media, text and VAE encoding). After
the call, `VmHWM` minus the resident set at the second reset is the loop's own peak ("loop peak"): what denoising the
clip needs on top of what the call already holds (the source frames, their latents, the weights). "call peak" is the
whole call's peak resident set, libraries and weights included, and "+ call" that peak above the resident set before the
call. glibc's malloc would otherwise keep freed memory: its mmap threshold grows to the largest block freed, so later
large tensors come from a heap it rarely trims, and smaller ones reuse heap chunks that earlier calls left, so a peak
would depend on what came before (in trials with a 128 KiB threshold, one row's loop peak varied by 2.5 MB from call to
call). Each child therefore calls `mallopt(M_MMAP_THRESHOLD, 4096)` (which also stops that growth) and
`mallopt(M_TRIM_THRESHOLD, 4096)`, as starting it with `MALLOC_MMAP_THRESHOLD_=4096 MALLOC_TRIM_THRESHOLD_=4096` would:
every buffer of a page or more is its own mapping, given back to the kernel when freed, so the resident set follows the
live tensors (the calls then vary by less than 0.1 MB). Those extra mmap calls and page faults slow a call down, which
is why the timings come from the main process, where the allocator is left as it is.

The default is one torch thread: on a small shared CPU, tiny forwards on two threads lose more to the threads waiting
for each other than they gain. Nothing here is asserted on time.

Run: python benchmarks/bench_long.py [--windows 1,2,4,6,8] [--no_contrast] [--json out.json]
"""

from __future__ import annotations

import ctypes
import multiprocessing
import statistics
import sys
import time

import numpy as np
import torch
from _common import base_parser, print_header, print_table, setup, tiny_components, write_json

from bernini_diffusers import BerniniPipeline, windows
from bernini_diffusers.constants import TEMPORAL_FACTOR
from bernini_diffusers.guidance import GUIDANCE_SPECS
from bernini_diffusers.tasks import TASKS, TaskType

TASK = TaskType.V2V
BRANCHES = GUIDANCE_SPECS[TASKS[TASK].default_guidance_mode].forwards_per_step
MALLOC_THRESHOLD = 4096  # one page: every buffer of a page or more is its own mapping
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MB = 1e6


def clip_frames(num_windows: int, context_frames: int, context_overlap: int) -> int:
    """Frames of the longest clip that the given settings cut into exactly `num_windows` windows (checked): the
    windows then advance by exactly `context_frames - context_overlap` and every overlap is the requested one."""
    window = windows.latent_frames(context_frames)
    overlap = context_overlap // TEMPORAL_FACTOR
    latent = window + (num_windows - 1) * (window - overlap)
    planned = len(windows.plan_windows(latent, window, overlap))
    if planned != num_windows:
        raise RuntimeError(f"{latent} latent frames plan {planned} windows, not {num_windows}")
    return (latent - 1) * TEMPORAL_FACTOR + 1


def source_video(frames: int, height: int, width: int) -> np.ndarray:
    """A `[T, H, W, 3]` uint8 clip of a random image drifting in brightness; a longer clip extends a shorter one."""
    base = np.random.default_rng(1).random((height, width, 3))
    drift = 0.2 * np.sin(np.arange(frames) / 8.0)[:, None, None, None]
    return (np.clip(base[None] + drift, 0, 1) * 255).astype(np.uint8)


def _status_bytes() -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident since start or the last reset) of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024
    return values


def _reset_peak() -> int:
    """Reset the kernel's peak-resident mark (VmHWM) to the current resident set; return that resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes()["VmRSS"]


def _return_freed_memory() -> bool:
    """Make glibc give buffers above MALLOC_THRESHOLD back to the kernel when freed (see the module docstring)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MALLOC_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, MALLOC_THRESHOLD)
    )


class _Probe:
    """Hooks on the tiny pipeline's experts and steps: counts forwards, stamps the first one and each step's end, and
    (with `memory`) resets the peak-resident mark right before the first forward after reading the peak until then."""

    def __init__(self, pipe: BerniniPipeline, memory: bool) -> None:
        self.memory = memory
        self.forwards, self.first, self.step_ends = 0, None, []
        self.before_loop_hwm = self.loop_base = 0
        for expert in (pipe.transformer, pipe.transformer_2):
            expert.register_forward_pre_hook(self.on_forward)

    def on_forward(self, module, args) -> None:
        if self.first is None:
            if self.memory:
                self.before_loop_hwm = _status_bytes()["VmHWM"]
                self.loop_base = _reset_peak()
            self.first = time.perf_counter()
        self.forwards += 1

    def on_step_end(self, pipeline, i, t, kwargs) -> dict:
        self.step_ends.append(time.perf_counter())
        return {}

    def start(self) -> None:
        self.forwards, self.first = 0, None
        self.step_ends.clear()


def _pipeline() -> BerniniPipeline:
    pipe = BerniniPipeline(**tiny_components(torch.device("cpu"), torch.float32))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe: BerniniPipeline, probe: _Probe, row: dict, video: np.ndarray, settings: dict) -> dict:
    """One v2v call of the row, `output_type="latent"`; the loop's seconds per step and forwards per step."""
    probe.start()
    latents = pipe(
        "a red car",
        task_type=TASK.value,
        video=video,
        num_frames=row["frames"],
        num_inference_steps=settings["steps"],
        context_frames=row["context_frames"],
        context_overlap=settings["context_overlap"],
        output_type="latent",
        callback_on_step_end=probe.on_step_end,
        generator=torch.Generator().manual_seed(settings["seed"]),
    ).frames
    return {
        "s_per_step": (probe.step_ends[-1] - probe.first) / settings["steps"],
        "forwards_per_step": probe.forwards / settings["steps"],
        "latent_frames": latents.shape[2],
    }


def _memory_child(row: dict, settings: dict, queue) -> None:
    """In a forked child: free memory back to the kernel, build, `warmup` calls, then `repeats` measured ones."""
    try:
        torch.set_num_threads(settings["threads"])
        malloc_tuned = _return_freed_memory()
        pipe = _pipeline()
        probe = _Probe(pipe, memory=True)
        video = source_video(row["frames"], settings["height"], settings["width"])
        for _ in range(settings["warmup"]):
            _call(pipe, probe, row, video, settings)
        calls = []
        for _ in range(settings["repeats"]):
            start_rss = _reset_peak()
            result = _call(pipe, probe, row, video, settings)
            loop_hwm = _status_bytes()["VmHWM"]
            calls.append({
                **result, "loop_peak_bytes": loop_hwm - probe.loop_base, "rss_before_call_bytes": start_rss,
                "call_peak_rss_bytes": max(probe.before_loop_hwm, loop_hwm),
                "rss_at_first_forward_bytes": probe.loop_base,
            })  # fmt: skip
        queue.put({"malloc_tuned": malloc_tuned, "calls": calls})
    except BaseException as error:  # the parent reports it; a child's traceback alone would leave it waiting
        queue.put({"error": f"{type(error).__name__}: {error}"})
        raise


def measure_memory(row: dict, settings: dict) -> dict:
    # A fresh forked child per row, so that each peak is its own and the allocator settings stay out of the timings.
    # The parent must not have run torch's thread pool before forking (a child would deadlock in OpenMP), so the
    # parent times the rows only after every child has run.
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_memory_child, args=(row, settings, queue))
    child.start()
    result = queue.get()
    child.join()
    if "error" in result or child.exitcode != 0:
        sys.exit(f"bench_long: the row {row['label']!r} failed: {result.get('error', f'exit code {child.exitcode}')}")
    return result


def measure_times(rows: list[dict], settings: dict) -> list[list[dict]]:
    """Every row's calls interleaved (row 1, row 2, ..., row 1, ...) in this process: `warmup` untimed rounds, then
    `repeats` timed ones; per row, the timed calls' figures."""
    pipe = _pipeline()
    probe = _Probe(pipe, memory=False)
    videos = [source_video(row["frames"], settings["height"], settings["width"]) for row in rows]
    calls: list[list[dict]] = [[] for _ in rows]
    for round_index in range(settings["warmup"] + settings["repeats"]):
        for i, (row, video) in enumerate(zip(rows, videos)):
            result = _call(pipe, probe, row, video, settings)
            if round_index >= settings["warmup"]:
                calls[i].append(result)
    return calls


def _median_mb(calls: list[dict], key: str, minus: str | None = None) -> float:
    return statistics.median(c[key] - (c[minus] if minus else 0) for c in calls) / MB


def plan_rows(args) -> list[dict]:
    rows = []
    for n in args.windows:
        frames = clip_frames(n, args.context_frames, args.context_overlap)
        # One window is a plain call: with windows on, a clip no longer than a window is the same call bit for bit.
        rows.append({
            "label": "1 (plain)" if n == 1 else str(n), "windows": n, "frames": frames,
            "context_frames": None if n == 1 else args.context_frames,
        })  # fmt: skip
    if args.contrast:
        longest = max(rows, key=lambda r: r["frames"])
        rows.append({"label": f"{longest['windows']} as 1 window", "windows": 1, "frames": longest["frames"],
                     "context_frames": None})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], repeats=3, warmup=1)
    parser.set_defaults(threads=1)
    parser.add_argument(
        "--windows", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2, 4, 6, 8],
        help="comma-separated window counts, one row each; 1 is a plain call at one window's length",
    )  # fmt: skip
    parser.add_argument("--context_frames", type=int, default=17, help="window length in frames (4k+1)")
    parser.add_argument("--context_overlap", type=int, default=4, help="overlap of neighbours in frames (4k)")
    parser.add_argument("--height", type=int, default=64, help="source video height")
    parser.add_argument("--width", type=int, default=96, help="source video width")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per call")
    parser.add_argument(
        "--no_contrast", dest="contrast", action="store_false",
        help="leave out the row that runs the longest clip as one window",
    )  # fmt: skip
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    if device.type != "cpu" or dtype != torch.float32:
        sys.exit("bench_long runs on the CPU in fp32 (--device cpu --dtype fp32)")
    try:
        windows.check_context(args.context_frames, args.context_overlap)
    except ValueError as error:
        sys.exit(f"bench_long: {error}")
    if min(args.windows) < 1 or args.steps < 1:
        sys.exit(f"bench_long: --windows must be counts >= 1 (got {args.windows}) and --steps >= 1 (got {args.steps})")
    print_header(
        f"Long videos: v2v ({BRANCHES} forwards per window and step), windows of {args.context_frames} frames "
        f"overlapping by {args.context_overlap}, {args.height}x{args.width}, {args.steps} steps, "
        f"{args.warmup} warm-up + {args.repeats} timed calls per row",
        device,
        dtype,
    )
    settings = {
        "threads": torch.get_num_threads(), "height": args.height, "width": args.width, "steps": args.steps,
        "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed, "context_overlap": args.context_overlap,
    }  # fmt: skip
    rows = plan_rows(args)
    memory = [measure_memory(row, settings) for row in rows]
    times = measure_times(rows, settings)
    results = []
    for row, mem, calls in zip(rows, memory, times):
        for counted in (c["forwards_per_step"] for c in (*mem["calls"], *calls)):
            if counted != row["windows"] * BRANCHES:
                sys.exit(
                    f"bench_long: row {row['label']!r} ran {counted} forwards per step, not "
                    f"{row['windows']} x {BRANCHES}"
                )
        s_per_step = statistics.median(c["s_per_step"] for c in calls)
        results.append({
            **row, "latent_frames": calls[0]["latent_frames"], "forwards_per_step": row["windows"] * BRANCHES,
            "s_per_step": s_per_step, "ms_per_frame_step": 1e3 * s_per_step / row["frames"],
            "loop_peak_mb": _median_mb(mem["calls"], "loop_peak_bytes"),
            "call_peak_rss_mb": _median_mb(mem["calls"], "call_peak_rss_bytes"),
            "call_growth_mb": _median_mb(mem["calls"], "call_peak_rss_bytes", "rss_before_call_bytes"),
            "s_per_step_timed": [c["s_per_step"] for c in calls], "memory_run": mem,
        })  # fmt: skip
    # Ratios against the 2-window row (else the first windowed row): the claim is flat from 2 windows on.
    windowed = [r for r in results if r["context_frames"] is not None]
    base = next((r for r in windowed if r["windows"] == 2), windowed[0] if windowed else results[0])
    for r in results:
        r["per_frame_vs_base"] = r["ms_per_frame_step"] / base["ms_per_frame_step"]
        r["loop_peak_vs_base"] = r["loop_peak_mb"] / base["loop_peak_mb"]
    headers = ["windows", "frames", "latent", "fwd/step", "s/step", "ms/frame/step", f"vs {base['label']}",
               "loop peak MB", f"vs {base['label']}", "call peak MB", "+ call MB"]  # fmt: skip
    table = [[r["label"], r["frames"], r["latent_frames"], r["forwards_per_step"], r["s_per_step"],
              r["ms_per_frame_step"], f"{r['per_frame_vs_base']:.2f}", r["loop_peak_mb"],
              f"{r['loop_peak_vs_base']:.2f}", r["call_peak_rss_mb"], r["call_growth_mb"]]
             for r in results]  # fmt: skip
    print_table(headers, table)
    print()
    if not all(r["memory_run"]["malloc_tuned"] for r in results):
        print("note: glibc's mallopt was not available; freed buffers may stay resident and skew the peaks")
    last = max(windowed, key=lambda r: r["windows"]) if windowed else base
    print(
        f"RESULT per_frame_ratio_{last['windows']}w_vs_{base['windows']}w={last['per_frame_vs_base']:.2f} "
        f"loop_peak_ratio_{last['windows']}w_vs_{base['windows']}w={last['loop_peak_vs_base']:.2f}"
    )
    settings["context_frames"] = args.context_frames
    payload = {"task": TASK.value, "branches": BRANCHES, "settings": settings, "rows": results}
    write_json(args.json, payload, device, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
