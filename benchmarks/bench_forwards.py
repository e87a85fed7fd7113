"""Transformer forwards per denoising step of every guidance mode, against the minimum of docs/design.md#modes.

Both experts' `forward` is wrapped with a counter and the count is read after every step (callback_on_step_end), so
each step's count is checked, not just the total. The media makes every combo distinct: task rv2v with a source video
and two reference images (none, V, I and VI are four different sequences); r2v_apg runs task r2v with the two images.
An extra row runs the rv2v mode on the text-only task t2v: its none, V and VI branches are then identical inputs and
must share one forward, leaving 2 per step.

Run: python benchmarks/bench_forwards.py [--steps 10] [--repeats 1] [--json out.json]
"""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path

import torch
from _common import base_parser, print_header, print_table, setup, synchronize, tiny_components, write_json

from bernini_diffusers import BerniniPipeline
from bernini_diffusers.guidance import GUIDANCE_SPECS
from bernini_diffusers.tasks import GuidanceMode
from bernini_diffusers.testing import make_test_image, make_test_video

# Forwards per run at 40 steps, i.e. per step x 40.
OFFICIAL_STEPS = 40
MINIMUM_FORWARDS = {"t2v": 2, "t2v_apg": 2, "v2v": 2, "v2v_apg": 2, "v2v_chain": 3, "r2v_apg": 3, "rv2v": 4}


class ForwardCounter:
    """Counts calls of the wrapped experts' forward; `per_step` holds the count of each finished step."""

    def __init__(self, experts):
        self.count = 0
        self.per_step: list[int] = []
        self._last = 0
        for expert in experts:
            if expert is not None:
                expert.forward = self._wrap(expert.forward)

    def _wrap(self, forward):
        @functools.wraps(forward)
        def counted(*args, **kwargs):
            self.count += 1
            return forward(*args, **kwargs)

        return counted

    def reset(self) -> None:
        self.count, self._last, self.per_step = 0, 0, []

    def on_step_end(self, pipe, step, timestep, callback_kwargs):
        self.per_step.append(self.count - self._last)
        self._last = self.count
        return {}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], repeats=1, warmup=0)
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per run (counts are per step)")
    args = parser.parse_args()
    device, dtype = setup(args)

    components = tiny_components(device, dtype)
    pipe = BerniniPipeline(**components).to(device)
    pipe.set_progress_bar_config(disable=True)
    counter = ForwardCounter((pipe.transformer, pipe.transformer_2))

    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    video = str(make_test_video(root / "source.mp4", num_frames=9, width=48, height=32, seed=1))
    refs = [
        str(make_test_image(root / "ref_a.png", width=32, height=32, seed=2)),
        str(make_test_image(root / "ref_b.png", width=48, height=32, seed=3)),
    ]
    media = {
        "rv2v": dict(task_type="rv2v", video=video, images=refs),
        "r2v": dict(task_type="r2v", images=refs, num_frames=9, height=32, width=48),
        "t2v": dict(task_type="t2v", num_frames=9, height=32, width=48),
    }
    cases = [(mode.value, "rv2v") for mode in GuidanceMode if mode is not GuidanceMode.R2V_APG]
    cases.insert([m for m, _ in cases].index("v2v_chain") + 1, ("r2v_apg", "r2v"))
    cases.append(("rv2v", "t2v"))  # text only: identical branches must share a forward

    print_header("bench_forwards: transformer forwards per step by guidance mode (tiny pipeline)", device, dtype)
    print(
        f"{args.steps} steps per run, {args.repeats} run(s) per mode after {args.warmup} warm-up run(s); "
        f"media: a 9-frame 48x32 video and two reference images\n"
    )

    rows, results, all_at_minimum = [], [], True
    for mode, task in cases:
        branches = GUIDANCE_SPECS[GuidanceMode(mode)].forwards_per_step
        call = functools.partial(
            pipe,
            "A small boat drifts on a calm lake.",
            guidance_mode=mode,
            num_inference_steps=args.steps,
            generator=torch.Generator().manual_seed(args.seed),
            output_type="latent",
            callback_on_step_end=counter.on_step_end,
            **media[task],
        )
        for _ in range(args.warmup):
            call()
        per_step_runs, seconds = [], []
        for _ in range(args.repeats):
            counter.reset()
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
            per_step_runs.append(list(counter.per_step))
        counts = sorted({c for run in per_step_runs for c in run})
        per_step = counts[0] if len(counts) == 1 else None  # None: the steps disagree
        expected = 2 if task == "t2v" else MINIMUM_FORWARDS[mode]
        at_minimum = per_step == expected
        all_at_minimum &= at_minimum
        label = mode if task != "t2v" else f"{mode} on text-only t2v"
        rows.append(
            (
                label,
                task,
                branches,
                per_step if per_step is not None else "/".join(map(str, counts)),
                expected,
                per_step * OFFICIAL_STEPS if per_step is not None else "-",
                expected * OFFICIAL_STEPS,
                f"{1000 * sorted(seconds)[len(seconds) // 2] / args.steps:.0f}",
                "yes" if at_minimum else "NO",
            )
        )
        results.append(
            {
                "mode": mode,
                "task": task,
                "branches": branches,
                "forwards_per_step": per_step,
                "per_step_counts": per_step_runs,
                "minimum_per_step": expected,
                "forwards_at_40_steps": None if per_step is None else per_step * OFFICIAL_STEPS,
                "minimum_at_40_steps": expected * OFFICIAL_STEPS,
                "seconds_per_run": seconds,
                "at_minimum": at_minimum,
            }
        )
    tmp.cleanup()

    print_table(
        ("guidance mode", "task", "branches", "fwd/step", "min (7.3)", "fwd @40", "min @40", "ms/step*", "at min"),
        rows,
    )
    print("\n* wall time of the whole call (media, VAE encode, text, steps) divided by the steps; tiny models")
    print(f"RESULT forwards_at_minimum={all_at_minimum}")
    write_json(
        args.json,
        {"benchmark": "forwards", "steps": args.steps, "repeats": args.repeats, "results": results,
         "forwards_at_minimum": all_at_minimum},
        device,
        dtype,
    )


if __name__ == "__main__":
    main()
