"""Print docs/memory.md's table: the memory plan (`BerniniPipeline.estimate_memory`) of the real A14B model, 81 frames
at 480p and 720p, for each memory profile and the experts in bf16, fp8 and GGUF Q4_K, on one GPU.

No weights are read: the figures come from the configs and meta-tensor passes (src/bernini_diffusers/memory_plan.py).

Run: python scripts/memory_table.py [--task_type t2v|v2v] [--model A14B|1.3B|FOLDER]
"""

from __future__ import annotations

import argparse

from bernini_diffusers import BerniniPipeline
from bernini_diffusers.memory import MEMORY_PROFILES

SIZES = {"480p": (480, 848), "720p": (720, 1280)}
FORMATS = ("bf16", "fp8", "Q4_K")


def rows(model: str, task_type: str) -> list[tuple[str, str, list]]:
    found = []
    for name, profile in MEMORY_PROFILES.items():
        # the fp8 profiles cast a bf16 file; the other profiles take each file format as it is
        formats = ("bf16",) if profile.fp8 else FORMATS
        for fmt in formats:
            plans = []
            for height, width in SIZES.values():
                call = dict(task_type=task_type, num_frames=81, height=height, width=width, max_image_size=width)
                if task_type != "t2v":
                    call.update(video="source.mp4", media_sizes={"video": (width, height)})
                plans.append(BerniniPipeline.estimate_memory(model, name, fmt, device="cuda", **call))
            found.append((name, fmt, plans))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="A14B")
    parser.add_argument("--task_type", default="t2v", choices=("t2v", "v2v"))
    args = parser.parse_args()
    table = rows(args.model, args.task_type)
    tokens = ", ".join(f"{size} {plans.tokens:,}" for size, plans in zip(SIZES, table[0][2]))
    print(f"{args.model}, {args.task_type}, 81 frames; tokens per forward: {tokens}. GB = 1e9 bytes.\n")
    header = "| profile | experts | " + " | ".join(f"{s} GPU | {s} host RAM" for s in SIZES) + " |"
    print(header)
    print("|---|---|" + "---:|---:|" * len(SIZES))
    for name, fmt, plans in table:
        stored = "fp8 (cast at load)" if MEMORY_PROFILES[name].fp8 else fmt
        cells = " | ".join(f"{p.gpu_bytes / 1e9:.1f} | {(p.ram_bytes - p.parts['this process']) / 1e9:.1f}" for p in plans)
        print(f"| `{name}` | {stored} | {cells} |")


if __name__ == "__main__":
    main()
