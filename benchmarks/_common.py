"""Shared helpers of the benchmark scripts: arguments, timing, interleaving, tables and the JSON report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bernini_diffusers.testing import cast_like_from_pretrained, get_tiny_components

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def base_parser(description: str, *, repeats: int, warmup: int) -> argparse.ArgumentParser:
    """The arguments every script takes: device, dtype, repeats, warmup, seed, threads and --json."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="torch device to run on")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the transformer weights")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed iterations of each contender")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed iterations of each contender first")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed for weights and inputs")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON here")
    return parser


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Apply seed and thread settings; return the device and dtype the arguments name."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda was given but CUDA is not available")
    if args.repeats < 1 or args.warmup < 0:
        sys.exit("--repeats must be >= 1 and --warmup >= 0")
    return device, DTYPES[args.dtype]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of `fn`, synchronised on CUDA before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(
    contenders: dict[str, Callable[[], object]], *, repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Run the contenders in turn (A, B, A, B, ...): `warmup` untimed rounds, then `repeats` timed ones."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(time_once(fn, device))
    return times


def summary(times: Sequence[float]) -> dict[str, float]:
    """Median, min, max and the interquartile range of a list of seconds."""
    ordered = sorted(times)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4)
    else:
        q1, q3 = ordered[0], ordered[-1]
    return {
        "median_s": statistics.median(ordered),
        "min_s": ordered[0],
        "max_s": ordered[-1],
        "iqr_s": q3 - q1,
        "n": len(ordered),
    }


def paired_ratio(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """Median of the per-round ratios ours_i / theirs_i: each pair ran back to back, so slow drifts cancel."""
    return statistics.median(a / b for a, b in zip(ours, theirs))


def cast_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a diffusers model to `device` and `dtype` the way `from_pretrained(torch_dtype=...)` leaves it:
    the modules in `_keep_in_fp32_modules` (RoPE, time embedder, norms, ...) stay float32."""
    return cast_like_from_pretrained(model.to(device), dtype)


def tiny_components(device: torch.device, dtype: torch.dtype) -> dict:
    """The tiny two-expert components, with both experts cast as `from_pretrained(torch_dtype=dtype)` and on `device`."""
    components = get_tiny_components(two_experts=True)
    for name in ("transformer", "transformer_2"):
        cast_model(components[name], device, dtype)
    return components


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], fmt: Callable[[object], str] | None = None
) -> None:
    """A plain fixed-width table; `fmt` writes each cell (default: floats to 4 decimals)."""
    fmt = fmt or _fmt
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    print("  ".join(h.ljust(w) for h, w in zip(cells[0], widths)))
    print(line)
    for row in cells[1:]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def load() -> str:
    """The 1-minute load average, where the platform has one (other processes skew CPU timings)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    import diffusers

    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_header(title: str, device: torch.device, dtype: torch.dtype) -> None:
    env = environment(device, dtype)
    where = env.get("gpu", f"{env['cpu_count']} CPU cores, {env['torch_threads']} torch threads")
    print(f"{title}")
    print(
        f"device={env['device']} ({where})  dtype={env['dtype']}  torch {env['torch']}  diffusers {env['diffusers']}  "
        f"load(1 min)={load()}"
    )
    print()


def write_json(path: Path | None, payload: dict[str, object], device: torch.device, dtype: torch.dtype) -> None:
    if path is None:
        return
    payload = {**payload, "environment": environment(device, dtype), "load_1min_at_end": load()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
