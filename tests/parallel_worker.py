"""One process of the parallel tests, launched by tests/test_parallel.py with `torchrun --standalone`.

Every rank builds the same tiny pipeline, computes the single-process result of each case first, then enables each
parallel layout the world size allows and runs the cases again. It writes what it measured (max |parallel - single|
per case, sequence lengths seen by the first block, forwards it ran, whether it decoded, its ranks) to
OUT/rank<r>.json; the test process makes the assertions. Run by hand:

    torchrun --standalone --nproc-per-node 4 tests/parallel_worker.py OUT [--device cuda --dtype bf16 --backend fa2]

The phases with sharded weights (`shard_weights=True`) follow, each on a fresh pipeline; `--sharded_only` runs just
the multi-node one (tests/test_parallel.py launches it as two torchrun "nodes").
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
# Phases with the experts' weights sharded across each data group (a fresh pipeline each: sharding stays), and their
# cases: r2v has 3 forwards per step, so on 2 branch groups one group pads with a gather-only pass, and on 4 groups
# t2v leaves two groups with gather-only passes alone; rv2v's sequences are odd (Ulysses padding); rv2v_windows runs
# 3 windows per step.
SHARDED_CASES = ("t2v", "v2v", "r2v", "rv2v")
SHARDED_PHASES = {
    (2, 1): SHARDED_CASES,
    (1, 2): SHARDED_CASES,
    (2, 2): (*SHARDED_CASES, "rv2v_windows"),
    (1, 4): ("t2v", "r2v"),
}
# What the multi-node launch (2 nodes x 2 processes) runs: Ulysses inside a node, branches and shards across nodes.
MULTI_NODE_PHASES = {(2, 2): SHARDED_CASES}


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


def sharded_phases(args, device, all_cases: dict, reference: dict, whole_bytes: dict, world: int) -> list[dict]:
    """Each sharded layout the world allows on a fresh pipeline: parity with one process, forwards, local bytes."""
    from bernini_diffusers.parallel import is_sharded, local_parameter_bytes

    phases = []
    for (ulysses, branch), names in (MULTI_NODE_PHASES if args.sharded_only else SHARDED_PHASES).items():
        if world % (ulysses * branch):
            continue
        pipe = make_pipeline(args, device)
        state = pipe.enable_parallelism(ulysses_degree=ulysses, branch_degree=branch, shard_weights=True)
        probe = Probe(pipe)
        phase = {
            "ulysses_degree": ulysses,
            "branch_degree": branch,
            "shard_degree": state.shard_degree,
            "branch_rank": state.branch_rank,
            "local_bytes": {name: local_parameter_bytes(getattr(pipe, name)) for name in whole_bytes},
            "text_encoder_sharded": is_sharded(pipe.text_encoder),
            "cases": {},
        }
        for name in names:
            probe.reset()
            out = run(pipe, all_cases[name])
            diff = (out - reference[name]).abs().max().item()
            phase["cases"][name] = {"max_abs_diff": diff, "forwards": probe.forwards}
        frames = run_decoded(pipe, all_cases["t2v"])
        phase["decoded"] = frames is not None
        try:
            pipe.enable_parallelism(ulysses_degree=ulysses, branch_degree=branch, shard_weights=True)
        except ValueError as err:
            phase["enable_again"] = str(err)
        for profile in ("fp8", "group_offload"):
            try:
                pipe.enable_memory_profile(profile, device)
            except ValueError as err:
                phase[f"{profile}_after"] = str(err)
        phases.append(phase)
    return phases


# Sharded experts with a memory profile (`_shard_weights` + `_apply_sharded_profile`, as `--shard_weights
# --memory_profile ...` runs them): (profile, ulysses, branch, cases). fp8 is compared with one process running the
# fp8 profile; on 4 branch groups t2v leaves groups 2 and 3 with gather-only passes alone, which must place the
# expert too.
SHARDED_PROFILE_PHASES = [
    ("fp8", 2, 2, ("t2v", "rv2v")),
    ("fp8+expert_offload", 1, 2, ("r2v",)),
    ("expert_offload", 2, 1, ("v2v",)),
    ("expert_offload", 1, 4, ("t2v",)),
]


def sharded_profile_phases(args, device, all_cases: dict, reference: dict, world: int) -> list[dict]:
    """Each profile of SHARDED_PROFILE_PHASES on a fresh sharded pipeline: parity, storage, and the expert placement.

    On the CPU an expert is always where it runs, so a placement would never move anything; `device_of` is made to
    report the experts' shards elsewhere, so every forward and gather-only pass moves the expert (through FSDP2's
    `module.to`) after offloading the other one, as on a GPU, and the outputs must not change. The events recorded
    are ("activate", expert) when a placement starts and ("to", expert) for each move of an expert."""
    from bernini_diffusers import parallel
    from bernini_diffusers.memory import get_memory_profile

    fp8_pipe = make_pipeline(args, device)
    fp8_pipe.enable_memory_profile("fp8", device)
    phases = []
    for name, ulysses, branch, names in SHARDED_PROFILE_PHASES:
        if world % (ulysses * branch):
            continue
        profile = get_memory_profile(name)
        pipe = make_pipeline(args, device)
        experts = {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
        name_of = {id(e): n for n, e in experts.items()}
        events: list[tuple[str, str]] = []
        originals = (parallel.device_of, parallel.place_sharded_module)
        if profile.placement == "expert_offload":

            def device_of(model, inner=originals[0]):
                return torch.device("meta") if id(model) in name_of else inner(model)

            def place_sharded_module(model, device, offload_others, inner=originals[1]):
                def recorded(active):
                    events.append(("activate", name_of[id(active)]))
                    offload_others(active)

                return inner(model, device, recorded)

            for expert_name, expert in experts.items():
                expert.to = lambda *a, expert_name=expert_name, inner=expert.to, **k: (
                    events.append(("to", expert_name)), inner(*a, **k))[1]  # fmt: skip
            parallel.device_of, parallel.place_sharded_module = device_of, place_sharded_module
        try:
            pipe._shard_weights(ulysses, branch, profile)
            pipe._apply_sharded_profile(profile, device)
            phase = {
                "profile": name, "ulysses_degree": ulysses, "branch_degree": branch, "cases": {},
                "branch_rank": pipe.parallel_state.branch_rank,
                "dtypes": sorted({str(p.dtype) for p in pipe.transformer.parameters()}),
                "fp8_dtypes": sorted({str(p.dtype) for p in fp8_pipe.transformer.parameters()}),
                "local_bytes": parallel.local_parameter_bytes(pipe.transformer),
                "whole_bytes": parallel.local_parameter_bytes(fp8_pipe.transformer if profile.fp8 else
                                                              make_pipeline(args, device).transformer),
                "first_pre_hook": [type(h).__name__ for h in pipe.transformer._forward_pre_hooks.values()][:1],
                "accelerate_hook": hasattr(pipe.transformer, "_hf_hook"),
            }  # fmt: skip
            for case in names:
                expected = run(fp8_pipe, all_cases[case]) if profile.fp8 else reference[case]
                events.clear()
                out = run(pipe, all_cases[case])
                phase["cases"][case] = {"max_abs_diff": (out - expected).abs().max().item(), "events": list(events)}
            # after a call diffusers puts its offload hooks back (`maybe_free_model_hooks`): still ours in front
            phase["after_call"] = {
                name: [hasattr(c, "_hf_hook"), [type(h).__name__ for h in c._forward_pre_hooks.values()][:1]]
                for name, c in (("transformer", pipe.transformer), ("text_encoder", pipe.text_encoder))
            }
        finally:
            parallel.device_of, parallel.place_sharded_module = originals
        phases.append(phase)
    # The other order: expert_offload applied to the whole pipeline, then `enable_parallelism(shard_weights=True)`;
    # and the fp8 profile asked of a pipeline already sharded (refused: it is chosen with the sharding).
    pipe = make_pipeline(args, device)
    pipe.enable_memory_profile("expert_offload", device)
    pipe.enable_parallelism(ulysses_degree=1, branch_degree=2, shard_weights=True)
    order = {
        "profile": "expert_offload first", "cases": {},
        "first_pre_hook": [type(h).__name__ for h in pipe.transformer._forward_pre_hooks.values()][:1],
        "accelerate_hook": hasattr(pipe.transformer, "_hf_hook"),
    }  # fmt: skip
    order["cases"]["r2v"] = {"max_abs_diff": (run(pipe, all_cases["r2v"]) - reference["r2v"]).abs().max().item()}
    try:
        pipe.enable_memory_profile("fp8", device)
    except ValueError as err:
        order["fp8_after"] = str(err)
    phases.append(order)
    # A turbo LoRA loaded into sharded experts (as `--turbo_lora` with `--shard_weights` does): peft's adapters stay
    # whole on every rank around the gathered base weights, so the output is one process's with the same LoRA.
    from test_acceleration import lightning_lora

    loras = (lightning_lora(1), lightning_lora(2))
    single = make_pipeline(args, device)
    single.load_turbo_lora(*loras)
    pipe = make_pipeline(args, device)
    pipe.enable_parallelism(ulysses_degree=1, branch_degree=2, shard_weights=True)
    pipe.load_turbo_lora(*loras)
    lora = run(pipe, all_cases["t2v"]) - run(single, all_cases["t2v"])
    phases.append({"profile": "turbo LoRA", "cases": {"t2v": {"max_abs_diff": lora.abs().max().item()}}})
    return phases


# Per-rank loading (`from_pretrained_sharded`): (expert files, dtype, ulysses, branch, case), each against
# `from_pretrained` of the same files in one process.
SHARDED_LOADS = [
    ("diffusers", "fp32", 2, 2, "rv2v"),
    ("original", "fp32", 2, 2, "t2v"),
    ("diffusers", "bf16", 1, 2, "r2v"),
]
# (expert files, dtype, ulysses, branch, case, memory profile) loaded sharded with a profile, each against
# `from_pretrained(..., memory_profile=...)` of the same files in one process (bf16 files: fp8 rounds from them).
SHARDED_PROFILE_LOADS = [
    ("diffusers", "bf16", 1, 2, "t2v", "fp8"),
    ("original", "fp32", 2, 2, "r2v", "fp8+expert_offload"),
]


def sharded_loads(out: Path, all_cases: dict, rank: int) -> list[dict]:
    """Each process reads only its shards of tiny experts saved in both layouts; outputs equal the whole load's."""
    import torch.distributed as dist

    from bernini_diffusers import BerniniPipeline
    from bernini_diffusers.parallel import local_parameter_bytes
    from bernini_diffusers.testing import save_tiny_original_checkpoints, save_tiny_pretrained

    root = out / "models"
    if rank == 0:
        save_tiny_pretrained(root / "diffusers", layout="diffusers")
        save_tiny_original_checkpoints(root / "original")
    dist.barrier()
    results = []
    for files, dtype, ulysses, branch, case, profile in [(*load, None) for load in SHARDED_LOADS] + SHARDED_PROFILE_LOADS:
        kwargs = {"dtype": DTYPES[dtype]}
        if files == "original":
            kwargs.update(high_noise_ckpt=root / "original" / "bernini_renderer_high",
                          low_noise_ckpt=root / "original" / "bernini_renderer_low")  # fmt: skip
        if profile is not None:
            kwargs.update(memory_profile=profile, device="cpu")
        whole = BerniniPipeline.from_pretrained(root / "diffusers", **kwargs)
        whole.set_progress_bar_config(disable=True)
        expected = run(whole, all_cases[case])
        pipe = BerniniPipeline.from_pretrained_sharded(root / "diffusers", ulysses, branch, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        results.append({
            "files": files, "dtype": dtype, "ulysses_degree": ulysses, "branch_degree": branch, "case": case,
            "profile": profile, "applied": list(map(str, getattr(pipe, "_memory_profile", None) or ())),
            "max_abs_diff": (run(pipe, all_cases[case]) - expected).abs().max().item(),
            "local_bytes": local_parameter_bytes(pipe.transformer),
            "whole_bytes": local_parameter_bytes(whole.transformer),
            "dtypes": sorted({str(p.dtype) for p in pipe.transformer.parameters()}),
            "expected_dtypes": sorted({str(p.dtype) for p in whole.transformer.parameters()}),
        })  # fmt: skip
    return results


def make_pipeline(args, device):
    pipe = tiny_pipeline(torch_dtype=DTYPES[args.dtype]).to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.backend:
        pipe.set_attention_backend(args.backend)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES)
    parser.add_argument("--backend", default=None, help="attention backend (sdpa, fa2, fa3)")
    parser.add_argument("--sharded_only", action="store_true", help="only the sharded phases (the multi-node test)")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(args.device, int(os.environ["LOCAL_RANK"])) if args.device == "cuda" else torch.device("cpu")

    from bernini_diffusers.parallel import local_parameter_bytes

    pipe = make_pipeline(args, device)
    all_cases = cases()
    whole_bytes = {name: local_parameter_bytes(getattr(pipe, name)) for name in ("transformer", "transformer_2",
                                                                                    "text_encoder")}  # fmt: skip
    if args.sharded_only:
        all_cases = {name: all_cases[name] for name in {n for names in MULTI_NODE_PHASES.values() for n in names}}
    reference = {name: run(pipe, case) for name, case in all_cases.items()}
    report: dict = {
        "rank": rank,
        "world_size": world,
        "phases": [],
        "whole_bytes": whole_bytes,
        "block_bytes": local_parameter_bytes(pipe.transformer.blocks[0]),
    }
    if args.sharded_only:
        report["sharded_phases"] = sharded_phases(args, device, all_cases, reference, whole_bytes, world)
        write_report(args.out, rank, report)
        return
    reference_frames = run_decoded(pipe, all_cases["t2v"])
    probe = Probe(pipe)

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
    report["sharded_phases"] = sharded_phases(args, device, all_cases, reference, whole_bytes, world)
    report["sharded_profile_phases"] = sharded_profile_phases(args, device, all_cases, reference, world)
    if args.device == "cpu" and world == 4:
        report["sharded_loads"] = sharded_loads(args.out, all_cases, rank)
    write_report(args.out, rank, report)


def write_report(out: Path, rank: int, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.rename(out / f"rank{rank}.json")


if __name__ == "__main__":
    main()
