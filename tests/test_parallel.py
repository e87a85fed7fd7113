"""Parallel inference: rank layout, case assignment and argument checks in this process; Ulysses, branch and data
parallelism in `torchrun` processes (gloo, CPU, fp32), each run compared with the single-process result."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bernini_diffusers import BerniniPipeline, BerniniPipelineOutput
from bernini_diffusers.parallel import ParallelLayout, assign_cases, check_ulysses_degree, divisors
from bernini_diffusers.testing import tiny_transformer

from torchrun_launch import TORCHRUN_VARS, finish, kill_tree, start, torchrun_command

WORKER = Path(__file__).with_name("parallel_worker.py")
CASES = ("t2v", "v2v", "r2v", "rv2v", "v2v_windows", "rv2v_windows")
# Distinct forwards per step of each case's default guidance mode (t2v_apg, v2v_apg, r2v_apg, rv2v).
FORWARDS_PER_STEP = {"t2v": 2, "v2v": 2, "r2v": 3, "rv2v": 4, "v2v_windows": 2, "rv2v_windows": 4}
# Context windows per step: each window deals out its own forwards (docs/design.md#long-videos).
WINDOWS = {"v2v_windows": 3, "rv2v_windows": 3}
STEPS = 3  # SMALL["num_inference_steps"] in the worker
ATOL = 1e-5


# ------------------------------------------------------------------------------------------------ in this process


@pytest.mark.parametrize("world, ulysses, branch", [(8, 4, 2), (8, 2, 2), (8, 8, 1), (8, 1, 4), (6, 3, 1), (1, 1, 1)])
def test_layout_groups_partition_the_world(world, ulysses, branch):
    layout = ParallelLayout(world, ulysses, branch)
    assert layout.data_degree == world // (ulysses * branch)
    for groups, size in (
        (layout.ulysses_groups(), ulysses),
        (layout.branch_groups(), branch),
        (layout.data_groups(), ulysses * branch),
    ):
        assert sorted(r for g in groups for r in g) == list(range(world))
        assert all(len(g) == size for g in groups)
    # Ulysses groups are consecutive ranks (one node's fast links), data groups consecutive blocks.
    assert all(g == list(range(g[0], g[0] + ulysses)) for g in layout.ulysses_groups())
    for rank in range(world):
        d, b, u = layout.coordinates(rank)
        assert layout.rank_of(d, b, u) == rank
        assert rank in layout.ulysses_groups()[rank // ulysses]
        assert rank in layout.data_groups()[d]


def test_layout_of_eight_gpus_as_documented():
    layout = ParallelLayout(8, ulysses_degree=4, branch_degree=2)
    assert layout.ulysses_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.branch_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.data_groups() == [list(range(8))]
    layout = ParallelLayout(8, ulysses_degree=2, branch_degree=2)
    assert layout.data_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.branch_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert [layout.coordinates(r) for r in (0, 3, 5)] == [(0, 0, 0), (0, 1, 1), (1, 0, 1)]


def test_layout_rejects_a_world_the_degrees_do_not_divide():
    with pytest.raises(ValueError, match=r"6 processes .* 4 x 1 = 4") as err:
        ParallelLayout(6, ulysses_degree=4)
    assert "4, 8, 12" in str(err.value)
    with pytest.raises(ValueError, match="branch_degree"):
        ParallelLayout(4, branch_degree=0)


@pytest.mark.parametrize("data_degree", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("num_cases", [0, 1, 5, 12])
def test_case_assignment_covers_every_case_exactly_once(num_cases, data_degree):
    cases = [f"case{i}.json" for i in range(num_cases)]
    shares = [assign_cases(cases, r, data_degree) for r in range(data_degree)]
    assert sorted(c for share in shares for c in share) == sorted(cases)
    assert sum(map(len, shares)) == num_cases  # no case twice
    for r, share in enumerate(shares):
        assert share == cases[r::data_degree]  # deterministic, order kept
    with pytest.raises(ValueError, match="data_rank"):
        assign_cases(cases, data_degree, data_degree)


def test_heads_must_divide_by_the_ulysses_degree(tiny_pipe_1p3b):
    # The 1.3B layout: one expert with 12 heads (head_dim 16 keeps it small; the check only reads the config).
    expert = tiny_transformer(num_attention_heads=12, attention_head_dim=16)
    pipe = BerniniPipeline(**{**tiny_pipe_1p3b.components, "transformer": expert}, boundary_ratio=None)
    for degree in (5, 8):
        with pytest.raises(ValueError) as err:
            pipe.enable_parallelism(ulysses_degree=degree)
        message = str(err.value)
        assert f"`ulysses_degree`={degree}" in message and "12 attention heads" in message
        assert "1, 2, 3, 4, 6, 12" in message
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())  # failed before any rendezvous
    assert divisors(40) == [1, 2, 4, 5, 8, 10, 20, 40]
    check_ulysses_degree(40, 8)


@pytest.mark.parametrize("kwargs, name", [
    ({"ulysses_degree": 0}, "ulysses_degree"),
    ({"ulysses_degree": "2"}, "ulysses_degree"),
    ({"ulysses_degree": True}, "ulysses_degree"),
    ({"branch_degree": 0}, "branch_degree"),
    ({"branch_degree": 1.5}, "branch_degree"),
])
def test_bad_degrees_raise_naming_the_argument(tiny_pipe, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`="):
        tiny_pipe.enable_parallelism(**kwargs)


def test_several_processes_need_torchrun(tiny_pipe, monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        tiny_pipe.enable_parallelism(ulysses_degree=2)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 4"):
        tiny_pipe.enable_parallelism(ulysses_degree=2, branch_degree=2)
    assert tiny_pipe.is_writer


def test_one_process_is_its_own_writer_and_unchanged(tiny_pipe, monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    kwargs = dict(task_type="t2v", num_frames=1, height=16, width=16, num_inference_steps=2, output_type="latent")
    before = tiny_pipe("x", generator=torch.Generator().manual_seed(0), **kwargs).frames
    state = tiny_pipe.enable_parallelism()
    try:
        assert (state.world_size, state.data_degree, state.engine, state.is_writer) == (1, 1, "none", True)
        assert state.assign_cases(["a", "b"]) == ["a", "b"]
        assert tiny_pipe.is_writer
        after = tiny_pipe("x", generator=torch.Generator().manual_seed(0), **kwargs).frames
    finally:
        tiny_pipe.disable_parallelism()
    assert torch.equal(before, after)


@pytest.mark.parametrize("kwargs, match", [
    ({"shard_weights": True}, r"`shard_weights`=True shards .* ulysses_degree x branch_degree"),
    ({"shard_weights": "yes", "ulysses_degree": 2}, r"`shard_weights`='yes' must be True or False"),
])
def test_shard_weights_needs_a_clip_of_several_ranks(tiny_pipe, monkeypatch, kwargs, match):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=match):
        tiny_pipe.enable_parallelism(**kwargs)
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())  # before any rendezvous


def test_cli_shard_weights_needs_a_clip_of_several_ranks(tmp_path, capsys, monkeypatch):
    from bernini_diffusers import cli

    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    code = cli.main(["generate", "--model", "tiny", "--prompt", "x", "--shard_weights", "--output", str(tmp_path / "x.mp4")])
    assert code == 2 and "--shard_weights" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "profile, match",
    [
        ("fp8", r"memory profile 'fp8' applied .* chosen at load: `BerniniPipeline.from_pretrained_sharded"),
        ("fp8+expert_offload", r"memory profile 'fp8\+expert_offload' applied .* chosen at load"),
        ("group_offload", r"memory profile 'group_offload' .* hooks move or read whole blocks"),
    ],
)
def test_shard_weights_refuses_a_profile_applied_before_it(monkeypatch, profile, match):
    """fp8 applied to a whole pipeline has casting hooks that would act on FSDP2's gathered weights; its sharded form
    is chosen at load. group_offload moves whole blocks. Both are refused before the process group is joined."""
    from bernini_diffusers.testing import tiny_pipeline

    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    pipe = tiny_pipeline()
    pipe.enable_memory_profile(profile, "cpu")
    with pytest.raises(ValueError, match=match):
        pipe.enable_parallelism(ulysses_degree=2, shard_weights=True)
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


@pytest.mark.parametrize("profile", ["group_offload", "low_ram", "fp8+group_offload"])
def test_sharded_loads_and_the_cli_refuse_profiles_that_move_whole_blocks(tmp_path, capsys, monkeypatch, profile):
    from bernini_diffusers import BerniniPipeline, cli

    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=re.escape(f"`memory_profile`={profile!r} cannot be combined with sharded")):
        BerniniPipeline.from_pretrained_sharded(tmp_path, 2, memory_profile=profile)
    argv = ["generate", "--model", "tiny", "--prompt", "x", "--ulysses", "2", "--shard_weights"]
    assert cli.main([*argv, "--memory_profile", profile, "--output", str(tmp_path / "x.mp4")]) == 2
    assert "cannot be combined with --shard_weights" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_plan_prices_the_shards(capsys, monkeypatch):
    from bernini_diffusers import cli

    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    argv = ["generate", "--model", "tiny", "--plan", "--prompt", "x", "--task_type", "t2v", "--device", "cpu"]
    assert cli.main(argv) == 0
    assert "shards" not in capsys.readouterr().out
    assert cli.main([*argv, "--shard_weights", "--ulysses", "2", "--branch_parallel", "2"]) == 0
    assert "4 shards" in capsys.readouterr().out  # a plan for a 4-process launch, made in one process


def test_sharded_weight_bytes_for_the_memory_plan():
    from bernini_diffusers.parallel import sharded_weight_bytes

    assert sharded_weight_bytes(1000) == sharded_weight_bytes(1000, 1, kept_bytes=10, gathered_bytes=50) == 1000
    assert sharded_weight_bytes(1000, 4, kept_bytes=10, gathered_bytes=50) == 248 + 10 + 50  # ceil(990 / 4)
    with pytest.raises(ValueError, match="shard_degree"):
        sharded_weight_bytes(1000, 0)


def test_a_process_that_does_not_write_cannot_save(tmp_path):
    out = BerniniPipelineOutput(frames=None, fps=16, output_type="np")  # what a non-writing rank gets back
    with pytest.raises(ValueError, match="is_writer"):
        out.save(tmp_path / "x.mp4")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ torchrun


def _launch(out: Path, nproc: int, *args: str, timeout: float = 300) -> list[dict]:
    """Run the worker under `torchrun --standalone` (a free port) and read every rank's report."""
    proc = start(torchrun_command(nproc, str(WORKER), str(out), *args), stdout=subprocess.PIPE,
                  stderr=subprocess.STDOUT)  # fmt: skip
    finish(proc, timeout)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(nproc)]


@pytest.fixture(scope="module")
def cpu_reports(tmp_path_factory):
    """One launch of 4 CPU processes: phases U=2 (two data groups), B=2 (two data groups), U=2 x B=2, data only."""
    return _launch(tmp_path_factory.mktemp("parallel"), 4)


def _phase(report: dict, ulysses: int, branch: int) -> dict:
    return next(p for p in report["phases"] if (p["ulysses_degree"], p["branch_degree"]) == (ulysses, branch))


@pytest.mark.multiprocess
@pytest.mark.parametrize("ulysses, branch", [(2, 1), (2, 2)], ids=["U2", "U2xB2"])
@pytest.mark.parametrize("case", CASES)
def test_ulysses_equals_single_process(cpu_reports, case, ulysses, branch):
    for report in cpu_reports:
        result = _phase(report, ulysses, branch)["cases"][case]
        assert result["max_abs_diff"] <= ATOL, (report["rank"], result["max_abs_diff"])
        # Every forward's first block saw half of the (padded) sequence.
        assert result["lengths"] and all(local == -(-full // 2) for local, full in result["lengths"])
    odd = {full % 2 for _, full in _phase(cpu_reports[0], ulysses, branch)["cases"][case]["lengths"]}
    assert (1 in odd) == case.startswith(("r2v", "rv2v"))  # the references make odd sequences, so padding happened


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", CASES)
def test_branch_parallel_equals_single_process(cpu_reports, case):
    for report in cpu_reports:
        phase = _phase(report, 1, 2)
        result = phase["cases"][case]
        assert result["max_abs_diff"] <= ATOL, (report["rank"], result["max_abs_diff"])
        assert all(local == full for local, full in result["lengths"])  # whole sequences, no Ulysses
        # Round-robin: branch group b runs forwards b, b + 2, ...; together every forward once per step.
        mine = len(range(phase["state"]["branch_rank"], FORWARDS_PER_STEP[case], 2))
        assert result["forwards"] == STEPS * WINDOWS.get(case, 1) * mine


@pytest.mark.multiprocess
def test_ulysses_and_branch_together_split_the_forwards(cpu_reports):
    for report in cpu_reports:
        phase = _phase(report, 2, 2)
        mine = len(range(phase["state"]["branch_rank"], FORWARDS_PER_STEP["rv2v"], 2))
        assert phase["cases"]["rv2v"]["forwards"] == STEPS * mine


@pytest.mark.multiprocess
def test_an_idle_branch_group_still_receives_every_output(cpu_reports):
    for report in cpu_reports:
        for branch_phase in ((1, 2), (2, 2)):
            phase = _phase(report, *branch_phase)
            exchange = phase["idle_exchange"]
            assert exchange["calls"] == (1 if phase["state"]["branch_rank"] == 0 else 0)
            assert exchange["outputs"] == [[[7.0] * 3] * 2]


@pytest.mark.multiprocess
@pytest.mark.parametrize("ulysses, branch", [(2, 1), (2, 2)], ids=["U2", "U2xB2"])
def test_each_ranks_attention_slice_equals_the_single_process_attention(cpu_reports, ulysses, branch):
    valid = []
    for report in cpu_reports:
        layer = _phase(report, ulysses, branch)["layer"]
        assert layer["local_tokens"] == 7  # 13 tokens, padded to 14, split in two
        assert layer["slice_max_abs_diff"] <= 1e-6 and layer["gathered_max_abs_diff"] <= 1e-6
        assert layer["gathered_shape"] == [1, 13, 256]
        valid.append(layer["valid_tokens"])
    assert sorted(set(valid)) == [6, 7]  # the second slice ends with the padding


@pytest.mark.multiprocess
def test_ranks_writers_and_case_shares_follow_the_layout(cpu_reports):
    world = len(cpu_reports)
    for ulysses, branch in ((2, 1), (1, 2), (2, 2), (1, 1)):
        layout = ParallelLayout(world, ulysses, branch)
        shares = []
        for report in cpu_reports:
            rank, phase = report["rank"], _phase(report, ulysses, branch)
            state = phase["state"]
            data_rank, branch_rank, ulysses_rank = layout.coordinates(rank)
            coordinates = (state["data_rank"], state["branch_rank"], state["ulysses_rank"])
            assert coordinates == (data_rank, branch_rank, ulysses_rank)
            assert state["data_degree"] == layout.data_degree and state["engine"] == "torch"
            assert state["is_writer"] == state["pipe_is_writer"] == (branch_rank == 0 and ulysses_rank == 0)
            first = layout.data_groups()[data_rank][0]
            assert phase["broadcast_object"] == f"from rank {first}"
            assert phase["assigned"] == list(range(10))[data_rank::layout.data_degree]
            if state["is_writer"]:
                shares += phase["assigned"]
            expected = {"UlyssesAttnProcessor", "WanAttnProcessor"} if ulysses > 1 else {"WanAttnProcessor"}
            assert set(phase["processors"]) == expected
        assert sorted(shares) == list(range(10))  # the writers together cover every case once


@pytest.mark.multiprocess
def test_every_rank_of_a_data_group_uses_its_first_ranks_noise(cpu_reports):
    for report in cpu_reports:
        for ulysses, branch in ((2, 1), (1, 2), (2, 2)):
            assert _phase(report, ulysses, branch)["own_seed_max_abs_diff"] <= ATOL


@pytest.mark.multiprocess
def test_only_the_writer_decodes(cpu_reports):
    for report in cpu_reports:
        for ulysses, branch in ((2, 1), (1, 2), (2, 2)):
            phase = _phase(report, ulysses, branch)
            if phase["state"]["is_writer"]:
                assert phase["decoded"] is not None and phase["decoded"] <= ATOL, (report["rank"], phase["decoded"])
            else:
                assert phase["decoded"] is None, report["rank"]  # no VAE decode, no frames


@pytest.mark.multiprocess
def test_disable_parallelism_restores_single_process_runs(cpu_reports):
    for report in cpu_reports:
        after = report["after_disable"]
        assert after["max_abs_diff"] == 0.0
        assert after["processors"] == ["WanAttnProcessor"]
        assert all(local == full for local, full in after["lengths"])


def _sharded(report: dict, ulysses: int, branch: int) -> dict:
    return next(p for p in report["sharded_phases"] if (p["ulysses_degree"], p["branch_degree"]) == (ulysses, branch))


def _check_sharded_reports(reports: list[dict], phases: dict) -> None:
    """Sharded weights: every case equals one process, each branch group ran its round-robin share of the forwards
    (the others padded with gather-only passes), each rank holds 1 / (U x B) of each expert, only the writer decodes."""
    for report in reports:
        assert {(p["ulysses_degree"], p["branch_degree"]) for p in report["sharded_phases"]} == set(phases)
        for (ulysses, branch), cases in phases.items():
            phase = _sharded(report, ulysses, branch)
            degree = phase["shard_degree"]
            assert degree == ulysses * branch
            assert sorted(phase["cases"]) == sorted(cases)
            for case, result in phase["cases"].items():
                assert result["max_abs_diff"] <= ATOL, (report["rank"], ulysses, branch, case, result["max_abs_diff"])
                mine = len(range(phase["branch_rank"], FORWARDS_PER_STEP[case], branch))
                assert result["forwards"] == STEPS * WINDOWS.get(case, 1) * mine, (report["rank"], branch, case)
            assert phase["text_encoder_sharded"]  # every rank of the clip encodes the same prompts
            for name, whole in report["whole_bytes"].items():
                local = phase["local_bytes"][name]
                # FSDP2 splits every parameter on its first dimension: 1/N of the whole up to rounding, well under a
                # block's worth.
                assert abs(local - whole / degree) <= report["block_bytes"] / degree, (name, local, whole, degree)
            is_writer = phase["branch_rank"] == 0 and report["rank"] % ulysses == 0
            assert phase["decoded"] == is_writer
            assert "load the pipeline again" in phase["enable_again"]
            assert "fp8 storage of sharded experts is chosen at load" in phase["fp8_after"]
            assert "hooks move or read whole blocks" in phase["group_offload_after"]


@pytest.mark.multiprocess
def test_sharded_weights_equal_single_process_and_split_the_bytes(cpu_reports):
    from parallel_worker import SHARDED_PHASES

    _check_sharded_reports(cpu_reports, SHARDED_PHASES)
    # On 2 branch groups the 3 forwards of r2v leave group 1 with one forward and one gather-only pass per step;
    # on 4 groups the 2 forwards of t2v leave groups 2 and 3 with gather-only passes alone.
    assert [_sharded(r, 1, 4)["cases"]["t2v"]["forwards"] for r in cpu_reports] == [STEPS, STEPS, 0, 0]
    assert [_sharded(r, 1, 2)["cases"]["r2v"]["forwards"] for r in cpu_reports] == [2 * STEPS, STEPS] * 2


@pytest.mark.multiprocess
def test_each_rank_loads_only_its_shards(cpu_reports):
    """`from_pretrained_sharded` from the diffusers layout and from original checkpoints, fp32 and bf16, also with the
    fp8 profiles (shards stored in float8): outputs equal `from_pretrained` of the same files (with the same
    profile), each rank holds 1 / (U x B) of an expert, dtypes as the whole load's."""
    from parallel_worker import SHARDED_LOADS, SHARDED_PROFILE_LOADS

    expected = [(f, d, c, None) for f, d, _, _, c in SHARDED_LOADS] + [(f, d, c, p) for f, d, _, _, c, p in
                                                                       SHARDED_PROFILE_LOADS]  # fmt: skip
    for report in cpu_reports:
        loads = report["sharded_loads"]
        assert [(r["files"], r["dtype"], r["case"], r["profile"]) for r in loads] == expected
        for result in loads:
            assert result["applied"] == ([result["profile"], "cpu"] if result["profile"] else [])
            if result["profile"]:
                assert "torch.float8_e4m3fn" in result["dtypes"]
            # fp32, and bf16 without Ulysses: the same operations
            tolerance = ATOL if result["dtype"] == "fp32" and result["ulysses_degree"] > 1 else 0.0
            assert result["max_abs_diff"] <= tolerance, (report["rank"], result)
            degree = result["ulysses_degree"] * result["branch_degree"]
            assert abs(result["local_bytes"] - result["whole_bytes"] / degree) <= report["block_bytes"] / degree
            assert result["dtypes"] == result["expected_dtypes"]


@pytest.mark.multiprocess
def test_sharded_experts_take_fp8_storage_and_expert_offload(cpu_reports):
    """Sharded experts with the fp8 profiles store their shards in float8 (1 / N of the fp8 expert per rank) and equal
    one process running the fp8 profile; with expert_offload each forward, and each gather-only pass of an idle
    branch group, first offloads the other expert and then moves its own shards, in a hook that runs before FSDP2's
    all-gather (accelerate's, which would run after it, is gone), and the outputs do not change. A turbo LoRA loaded
    into sharded experts gives one process's output with that LoRA."""
    from parallel_worker import SHARDED_PROFILE_PHASES

    for report in cpu_reports:
        *phases, order, lora = report["sharded_profile_phases"]
        assert lora["profile"] == "turbo LoRA" and lora["cases"]["t2v"]["max_abs_diff"] <= ATOL
        # expert_offload applied before the sharding: the same placement; fp8 after it is refused
        assert order["profile"] == "expert_offload first" and order["cases"]["r2v"]["max_abs_diff"] <= ATOL
        assert order["first_pre_hook"] == ["ShardPlacement"] and order["accelerate_hook"] is False
        assert "'expert_offload'" in order["fp8_after"]  # the pipeline runs one profile already
        assert [(p["profile"], p["ulysses_degree"], p["branch_degree"]) for p in phases] == [
            (name, ulysses, branch) for name, ulysses, branch, _ in SHARDED_PROFILE_PHASES
        ]
        for phase in phases:
            branch, degree = phase["branch_degree"], phase["ulysses_degree"] * phase["branch_degree"]
            fp8, offload = phase["profile"].startswith("fp8"), phase["profile"].endswith("expert_offload")
            assert phase["dtypes"] == (phase["fp8_dtypes"] if fp8 else ["torch.float32"])
            assert abs(phase["local_bytes"] - phase["whole_bytes"] / degree) <= report["block_bytes"] / degree
            assert phase["accelerate_hook"] is False
            if offload:
                assert phase["first_pre_hook"] == ["ShardPlacement"]
                # diffusers reapplies its model offload after each call; the sharded components keep their placement
                assert phase["after_call"] == {name: [False, ["ShardPlacement"]] for name in ("transformer",
                                                                                            "text_encoder")}  # fmt: skip
            for case, result in phase["cases"].items():
                assert result["max_abs_diff"] <= ATOL, (report["rank"], phase["profile"], case, result)
                events = [tuple(event) for event in result["events"]]
                activations = [i for i, (kind, _) in enumerate(events) if kind == "activate"]
                if not offload:
                    assert events == []
                    continue
                # forwards plus gather-only passes: every slot of every step
                assert len(activations) == STEPS * -(-FORWARDS_PER_STEP[case] // branch), (report["rank"], case)
                for i in activations:
                    active = events[i][1]
                    other = "transformer_2" if active == "transformer" else "transformer"
                    assert events[i + 1 : i + 3] == [("to", other), ("to", active)], events[i : i + 3]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.multiprocess
def test_sharded_weights_across_two_nodes(tmp_path):
    """Two torchrun launchers side by side, each a "node" of 2 processes, meeting at a c10d rendezvous: Ulysses inside
    a node, the branch groups and the weight shards across the nodes."""
    from parallel_worker import MULTI_NODE_PHASES

    port = _free_port()
    # The rendezvous store lives in this process, not in one launcher: torchrun's agents poll the store after their
    # workers finish, and a launcher that hosted it would take it away from the other one when it exits first.
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    launchers = [
        start([
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
            "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-conf", "is_host=false", "--rdzv-id", "bernini-two-nodes", str(WORKER), str(tmp_path),
            "--sharded_only",
        ], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for node in (0, 1)
    ]  # fmt: skip
    try:
        for launcher in launchers:
            finish(launcher, timeout=300)
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                kill_tree(launcher)
        del store
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(4)]
    assert [r["world_size"] for r in reports] == [4] * 4
    _check_sharded_reports(reports, MULTI_NODE_PHASES)


@pytest.mark.multiprocess
def test_cli_batch_on_two_data_groups_killed_then_resumed_with_ulysses(tmp_path):
    """`torchrun -m bernini_diffusers.cli generate --inputs`: two data groups share a batch, a kill part-way leaves
    whole outputs only, and the restart (here as one Ulysses group) runs just the missing cases, each written once,
    with one process's results."""
    from PIL import Image

    from bernini_diffusers import cli

    entries = [{"task_type": "t2i", "prompt": f"a ball number {i}"} for i in range(6)]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    out = tmp_path / "out"
    fast = ["--model", "tiny", "--num_frames", "5", "--height", "32", "--width", "48", "--num_inference_steps", "2"]
    argv = ["generate", *fast, "--inputs", str(batch), "--output", f"{out}/"]
    names = [f"{i:04d}_t2i.png" for i in range(1, len(entries) + 1)]

    killed = start(torchrun_command(2, "-m", "bernini_diffusers.cli", *argv),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("[!.]*.png")) and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        kill_tree(killed)  # torchrun and both ranks, as a crash would
    # A kill during a write leaves a hidden temporary, never a partial output under the final name.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("[!.]*.png")}
    assert 1 <= len(before) < len(names), before  # killed part-way

    # The restart also shards the experts across the two ranks (--shard_weights), stored in float8.
    sharded = ["--ulysses", "2", "--shard_weights", "--memory_profile", "fp8"]
    resumed = start(torchrun_command(2, "-m", "bernini_diffusers.cli", *argv, *sharded),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    output = finish(resumed, timeout=300)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("[!.]*.png")}
    assert sorted(after) == names
    assert all(after[name] == stamp for name, stamp in before.items())  # finished cases were not redone
    assert not list(out.glob(".*tmp*"))
    printed = [Path(line).name for line in output.splitlines() if line.startswith(str(out))]
    assert sorted(printed) == sorted(set(names) - set(before)), output[-3000:]  # one writer, each case once

    # One case of each run against a single process: the restart's with the fp8 profile.
    picked = [sorted(before)[0], sorted(set(names) - set(before))[0]]
    for name, profile in zip(picked, ([], ["--memory_profile", "fp8"])):
        one = tmp_path / f"{name}.jsonl"
        one.write_text(json.dumps(entries[names.index(name)]) + "\n")
        single = tmp_path / f"single_{name}"
        assert cli.main(["generate", *fast, *profile, "--inputs", str(one), "--output", f"{single}/"]) == 0
        with Image.open(out / name) as a, Image.open(single / "0001_t2i.png") as b:
            diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()
        assert diff <= 1, (name, diff)  # Ulysses sums in another order: at most one step of rounding


# ------------------------------------------------------------------------------------------------ GPUs


def _gpu_backends() -> list:
    from bernini_diffusers.attention import available_backends

    usable = available_backends() if torch.cuda.is_available() else {}
    return [
        pytest.param("sdpa", "fp32", 1e-4, id="sdpa-fp32"),
        pytest.param("fa2", "bf16", 5e-2, id="fa2-bf16", marks=pytest.mark.skipif(
            not usable.get("fa2"), reason="needs flash-attn on a CUDA GPU")),
        pytest.param("fa3", "bf16", 5e-2, id="fa3-bf16", marks=pytest.mark.skipif(
            not usable.get("fa3"), reason="needs flash_attn_interface on a Hopper GPU")),
    ]


@pytest.mark.gpu
@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA GPUs")
@pytest.mark.parametrize("backend, dtype, atol", _gpu_backends())
def test_gpu_ulysses_and_branch_parallel_equal_one_gpu(tmp_path, backend, dtype, atol):
    reports = _launch(tmp_path, 2, "--device", "cuda", "--dtype", dtype, "--backend", backend)
    for report in reports:
        for ulysses, branch in ((2, 1), (1, 2)):
            phase = _phase(report, ulysses, branch)
            assert phase["state"]["engine"] in ("torch", "xfuser")
            for case in CASES:
                assert phase["cases"][case]["max_abs_diff"] <= atol, (report["rank"], ulysses, branch, case)
        layer = _phase(report, 2, 1)["layer"]
        assert layer["slice_max_abs_diff"] <= atol and layer["gathered_max_abs_diff"] <= atol
