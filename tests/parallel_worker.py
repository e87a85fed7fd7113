"""One process of the parallel tests, launched by tests/test_parallel.py with `torchrun --standalone`.

Every rank builds the same tiny pipeline, computes the single-process result of each case first, then enables each
parallel layout the world size allows and runs the cases again. It writes what it measured (max |parallel - single|
per case, sequence lengths seen by the first block, forwards it ran, whether it decoded, its ranks) to
OUT/rank<r>.json; the test process makes the assertions. Run by hand:

    torchrun --standalone --nproc-per-node 4 tests/parallel_worker.py OUT [--device cuda --dtype bf16 --backend fa2]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from bernini_diffusers.testing import tiny_pipeline

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SMALL = dict(num_frames=5, height=32, width=48, num_inference_steps=3, output_type="latent")
# One step to decoded frames: enough to see which ranks decode.
DECODED = {**SMALL, "num_inference_steps": 1, "output_type": "np"}
# (ulysses_degree, branch_degree) of each phase; the data degree is what the world size leaves.
PHASES = [(2, 1), (1, 2), (2, 2), (1, 1)]


def _image(width: int, height: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def cases() -> dict[str, dict]:
    """t2v, v2v, r2v and rv2v on in-memory media. Token counts per stream: target 12, video 12, the 48x48 reference
    9 and the 32x32 one 4, so r2v's I branch (25) and rv2v's VI branch (33) are odd and get padded under U=2.

    The `_windows` cases edit a 13-frame source (4 latent frames) in context windows of 5 frames overlapping by 4:
    3 windows of 2 latent frames, each a sequence of its own (the same token counts per window)."""
    video = np.random.default_rng(1).integers(0, 256, (5, 32, 48, 3), dtype=np.uint8)  # decoded frames at 16 fps
    long_video = np.random.default_rng(2).integers(0, 256, (13, 32, 48, 3), dtype=np.uint8)
    odd, even = _image(48, 48, seed=4), _image(32, 32, seed=5)
    windows = dict(context_frames=5, context_overlap=4)
    return {
        "t2v": dict(prompt="a red ball rolls", task_type="t2v"),
        "v2v": dict(prompt="make it snow", task_type="v2v", video=video),
        "r2v": dict(prompt="image0 meets image1", task_type="r2v", images=[odd, even]),
        "rv2v": dict(prompt="put image0 on the table", task_type="rv2v", video=video, images=[odd]),
        "v2v_windows": dict(prompt="make it snow", task_type="v2v", video=long_video, **windows),
        "rv2v_windows": dict(prompt="put image0 on the table", task_type="rv2v", video=long_video, images=[odd], **windows),
    }


def run(pipe, case: dict, seed: int = 42) -> torch.Tensor:
    return pipe(**case, **SMALL, generator=torch.Generator("cpu").manual_seed(seed)).frames.float().cpu()


def run_decoded(pipe, case: dict) -> np.ndarray | None:
    return pipe(**case, **DECODED, generator=torch.Generator("cpu").manual_seed(42)).frames


def processors(pipe) -> list[str]:
    return sorted({type(m.processor).__name__ for m in pipe.transformer.modules() if hasattr(m, "processor")})


class Probe:
    """Counts expert forwards and records the sequence length the first block of each expert receives."""

    def __init__(self, pipe):
        self.forwards, self.lengths = 0, []
        self.handles = []
        for model in (pipe.transformer, pipe.transformer_2):
            self.handles.append(model.register_forward_pre_hook(self._count))
            self.handles.append(model.blocks[0].register_forward_pre_hook(self._length(model)))

    def _count(self, module, args):
        self.forwards += 1

    def _length(self, model):
        def hook(module, args):
            full = model.sequence_parallel.length if model.sequence_parallel is not None else args[0].shape[1]
            self.lengths.append([args[0].shape[1], full])

        return hook

    def reset(self):
        self.forwards, self.lengths = 0, []


def layer_check(pipe) -> dict:
    """ParaAttention style: one self-attention on an odd sequence, each rank's slice against the whole one."""
    model = pipe.transformer
    attn, sequence = model.blocks[0].attn1, model.sequence_parallel
    device, dtype = model.device, model.dtype
    g = torch.Generator("cpu").manual_seed(5)
    latent = torch.zeros(1, 16, 1, 2, 26)  # 1 x 1 x 13 patches: 13 tokens, odd
    rope = model.rope(latent.to(device))
    hidden = torch.randn(1, 13, attn.inner_dim, generator=g).to(device, dtype)
    with torch.no_grad():
        whole = attn.processor.replaced(attn, hidden, None, None, rope)  # diffusers' own processor, one process
        local_hidden, local_rope = sequence.split(hidden, rope)
        local = attn.processor(attn, local_hidden, None, None, local_rope)
        gathered = sequence.gather(local)
    chunk = local.shape[1]
    start = min(sequence.rank * chunk, 13)
    valid = min(13 - start, chunk)
    return {
        "local_tokens": chunk,
        "valid_tokens": valid,
        "slice_max_abs_diff": (local[:, :valid] - whole[:, start : start + valid]).abs().max().item() if valid else 0.0,
        "gathered_max_abs_diff": (gathered - whole).abs().max().item(),
        "gathered_shape": list(gathered.shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES)
    parser.add_argument("--backend", default=None, help="attention backend (sdpa, fa2, fa3)")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(args.device, int(os.environ["LOCAL_RANK"])) if args.device == "cuda" else torch.device("cpu")

    pipe = tiny_pipeline(torch_dtype=DTYPES[args.dtype]).to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.backend:
        pipe.set_attention_backend(args.backend)
    all_cases = cases()
    reference = {name: run(pipe, case) for name, case in all_cases.items()}
    reference_frames = run_decoded(pipe, all_cases["t2v"])
    probe = Probe(pipe)
    report: dict = {"rank": rank, "world_size": world, "phases": []}

    for ulysses, branch in PHASES:
        if world % (ulysses * branch):
            continue
        state = pipe.enable_parallelism(ulysses_degree=ulysses, branch_degree=branch)
        phase = {
            "ulysses_degree": ulysses,
            "branch_degree": branch,
            "state": {
                "data_degree": state.data_degree,
                "data_rank": state.data_rank,
                "branch_rank": state.branch_rank,
                "ulysses_rank": state.ulysses_rank,
                "is_writer": state.is_writer,
                "pipe_is_writer": pipe.is_writer,
                "engine": state.engine,
            },
            "assigned": state.assign_cases(list(range(10))),
            "broadcast_object": state.broadcast_object(f"from rank {rank}"),
            "processors": processors(pipe),
            "cases": {},
        }
        if ulysses * branch > 1:
            for name, case in all_cases.items():
                probe.reset()
                out = run(pipe, case)
                phase["cases"][name] = {
                    "max_abs_diff": (out - reference[name]).abs().max().item(),
                    "forwards": probe.forwards,
                    "lengths": probe.lengths,
                }
            # Each rank passes its own seed (42 on the data group's first rank): that rank's noise is used everywhere.
            first = state.layout.data_groups()[state.data_rank][0]
            out = run(pipe, all_cases["t2v"], seed=42 + rank - first)
            phase["own_seed_max_abs_diff"] = (out - reference["t2v"]).abs().max().item()
            # Only the writer decodes (docs/design.md#parallel-layout); its frames are the single process's.
            frames = run_decoded(pipe, all_cases["t2v"])
            phase["decoded"] = None if frames is None else float(np.abs(frames - reference_frames).max())
        if branch > 1:
            # One forward for two branch groups: group 1 idles and still receives the output.
            calls = []

            def only_forward(calls=calls) -> torch.Tensor:
                calls.append(1)
                return torch.full((2, 3), 7.0, device=device)

            outs = state.run_branches([only_forward], like=torch.zeros(2, 3, device=device))
            phase["idle_exchange"] = {"calls": len(calls), "outputs": [o.cpu().tolist() for o in outs]}
        if ulysses > 1:
            phase["layer"] = layer_check(pipe)
        report["phases"].append(phase)

    pipe.disable_parallelism()
    probe.reset()
    again = run(pipe, all_cases["r2v"])
    report["after_disable"] = {
        "max_abs_diff": (again - reference["r2v"]).abs().max().item(),
        "lengths": probe.lengths,
        "processors": processors(pipe),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.rename(args.out / f"rank{rank}.json")


if __name__ == "__main__":
    main()
