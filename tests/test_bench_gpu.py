"""benchmarks/bench_gpu.py: its CPU run at tiny size, its exit without CUDA, and its FLOP model."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bernini_diffusers.tiny import TINY_TRANSFORMER_CONFIG, tiny_transformer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
NO_CUDA_LINE = "bench_gpu: no CUDA device; nothing measured (run with --tiny for the CPU run of the same code)."


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its neighbour `_common`, as when run directly
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_gpu", None)
    sys.path.remove(str(SCRIPT.parent))


def test_tiny_run_writes_every_row(bench, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    threads = torch.get_num_threads()
    try:  # one thread: tiny matmuls only lose time to thread handoffs, above all on a busy machine
        status = bench.main(
            ["--tiny", "--steps", "1", "--cache_steps", "1", "--threads", "1", "--quiet", "--json", str(out)]
        )
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    report = json.loads(out.read_text())
    assert report["tiny"] is True
    assert report["config"]["num_layers"] == TINY_TRANSFORMER_CONFIG["num_layers"]
    assert set(report["flop_model"]) == {"t2v", "v2v_apg", "rv2v"}
    rows = report["rows"]
    assert {row["group"] for row in rows} == {"modes", "backends", "cache", "compile", "memory"}
    modes = {row["mode"]: row for row in rows if row["group"] == "modes"}
    assert set(modes) == {"t2v", "v2v_apg", "rv2v"}
    for mode, forwards in (("t2v", 2), ("v2v_apg", 2), ("rv2v", 4)):
        row = modes[mode]
        assert row["status"] == "ok", row["status"]
        # the forwards counted on the experts are the mode's distinct branches (every medium present)
        assert row["forwards_per_step"] == row["forwards_per_step_spec"] == forwards
        assert row["forwards_skipped"] == row["steps_skipped"] == 0
        assert row["forwards_skipped_per_step"] == [0] * row["steps"]
        assert len(row["step_seconds"]) == row["steps"] and row["s_per_step"] > 0
        assert 0 < row["attention_share"] < 1
        assert row["attention_s_per_step"] + row["rest_s_per_step"] == pytest.approx(row["s_per_step"])
        assert row["peak_gib"] is None  # no CUDA: no peak figure is made up
    backends = {row["backend"]: row for row in rows if row["group"] == "backends"}
    assert set(backends) >= {"fa2", "fa3", "_native_flash", "_native_cudnn"}
    for row in rows:
        assert row["status"] == "ok" or row["status"].startswith(("skipped: ", "error: ")), row
        if row["status"] != "ok":
            assert "s_per_step" not in row
    for name in ("compile", "memory", "cache"):
        statuses = [row["status"] for row in rows if row["group"] == name]
        assert statuses and all(s == "ok" or s.startswith("skipped: ") for s in statuses), statuses
    printed = capsys.readouterr().out
    assert "FLOP model at 480x848x81 (a model-based estimate, not a measurement)" in printed
    assert f"wrote {out}" in printed


def test_without_cuda_one_line_and_status_0(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    assert bench.main(["--json", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [NO_CUDA_LINE]
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_without_cuda_exit_status_of_the_script():
    done = subprocess.run([sys.executable, str(SCRIPT)], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [NO_CUDA_LINE]


def test_plan_estimates_the_default_run_under_budget(bench, capsys):
    assert bench.main(["--plan"]) == 0
    printed = capsys.readouterr().out
    rows = bench.plan_rows(bench.parse_args([]), {n: True for n in bench.PLAN_BACKENDS}, "fa3", bench.PLAN_CACHE_PRESETS)
    estimate = bench.estimate_seconds(rows, bench.flop_model())
    assert estimate < bench.BUDGET_S
    assert f"{len(rows)} rows; estimated run time on one H100: {estimate / 60:.1f} min" in printed


@pytest.mark.parametrize("streams", [[], [(1, 16, 3, 8, 12)], [(1, 16, 3, 8, 12), (1, 16, 1, 8, 12)]])
def test_flop_model_equals_torch_flop_counter(bench, streams):
    """On the tiny expert, with attention run as matmuls (math SDPA) so torch counts it, the model's count is exact."""
    model = tiny_transformer()
    target = (1, 16, 3, 8, 12)
    conditions = [torch.randn(shape) for shape in streams]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(
            torch.randn(target), torch.tensor([500]), torch.randn(1, 32, TINY_TRANSFORMER_CONFIG["text_dim"]),
            condition_latents=conditions or None, condition_source_ids=[float(i + 1) for i in range(len(streams))] or None,
        )  # fmt: skip
    tokens = [t * h * w // 4 for _, _, t, h, w in [*streams, target]]
    flops = bench.forward_flops(dict(TINY_TRANSFORMER_CONFIG), sum(tokens), tokens[-1], text_len=32)
    counted = counter.get_flop_counts()["Global"]
    assert flops["total"] == counter.get_total_flops()
    assert flops["attention"] == counted[torch.ops.aten.bmm]


def test_flop_model_ratios_at_480p(bench):
    model = bench.flop_model()
    assert model["t2v"]["ratio_to_wan_t2v"] == 1.0
    assert model["t2v"]["tokens_per_forward"] == [33390, 33390]  # 21 x 30 x 53 tokens, two CFG branches
    assert model["v2v_apg"]["tokens_per_forward"] == [66780, 66780]
    assert model["rv2v"]["tokens_per_forward"] == [33390, 66780, 69960, 69960]  # two 1590-token references
    # what the model gives: v2v_apg 3.06x and rv2v 5.33x plain t2v (the "about 3x" and "about 5.5x")
    assert model["v2v_apg"]["ratio_to_wan_t2v"] == pytest.approx(3.06, abs=0.01)
    assert model["rv2v"]["ratio_to_wan_t2v"] == pytest.approx(5.33, abs=0.01)
    assert model["t2v"]["estimated_s_per_40_steps"] == pytest.approx(326.9)
    assert model["rv2v"]["estimated_s_per_40_steps"] == pytest.approx(326.9 * model["rv2v"]["ratio_to_wan_t2v"])
    # stable: the reference count moves rv2v within 5-6x; v2v_apg has no references
    for references in (0, 1, 3, 4):
        varied = bench.flop_model(bench.Geometry(references=references))
        assert 5.0 < varied["rv2v"]["ratio_to_wan_t2v"] < 6.0
        assert varied["v2v_apg"]["ratio_to_wan_t2v"] == model["v2v_apg"]["ratio_to_wan_t2v"]


def test_a_deadline_skips_the_remaining_rows_and_the_json_says_so(bench, tmp_path):
    out, table = tmp_path / "gpu.json", tmp_path / "gpu.md"
    argv = ["--tiny", "--part", "1", "--threads", "1", "--quiet", "--deadline_s", "1e-9", "--json", str(out),
            "--markdown", str(table)]  # fmt: skip
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["complete"] is True and {row["group"] for row in report["rows"]} == {"modes", "backends", "compile"}
    assert all(row["status"].startswith("skipped: deadline of 1e-09 s reached") for row in report["rows"])
    assert table.read_text().count("skipped: deadline") == len(report["rows"])


def test_group_offload_is_skipped_when_the_host_cannot_pin_it(bench, monkeypatch):
    # torch's pinned allocator rounds each tensor up to a power of two: a 14B expert pins about 41 GiB
    assert bench.pinned_gib(bench.WAN22_A14B_CONFIG, torch.bfloat16) == pytest.approx(40.8, abs=0.1)
    row = bench.Row("memory", "t2v", "sdpa", 1, memory_profile="group_offload")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.psutil, "virtual_memory", lambda: type("Memory", (), {"available": 100 * 2**30}))
    reason = bench.host_shortfall(row, bench.WAN22_A14B_CONFIG, torch.bfloat16)
    assert reason.startswith("skipped: group_offload pins about 108 GiB of host memory") and "100 GiB is free" in reason
    monkeypatch.setattr(bench.psutil, "virtual_memory", lambda: type("Memory", (), {"available": 120 * 2**30}))
    assert bench.host_shortfall(row, bench.WAN22_A14B_CONFIG, torch.bfloat16) is None
    assert bench.host_shortfall(bench.Row("memory", "t2v", "sdpa", 1, memory_profile="fp8"), {}, torch.bfloat16) is None


def test_only_the_mode_rows_are_profiled(bench, tmp_path):
    out = tmp_path / "gpu.json"
    assert bench.main(["--tiny", "--groups", "modes,backends", "--backends", "sdpa", "--threads", "1", "--quiet",
                       "--json", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [row["attention_share"] is not None for row in rows] == [True, True, True, False]


@pytest.mark.parametrize("part", [1, 2])
def test_each_part_is_estimated_within_its_budget(bench, part):
    args = bench.parse_args(["--part", str(part)])
    assert args.groups == list(bench.PARTS[part])
    rows = bench.plan_rows(args, {n: True for n in bench.PLAN_BACKENDS}, "fa3", bench.PLAN_CACHE_PRESETS)
    assert bench.estimate_seconds(rows, bench.flop_model()) < bench.PART_BUDGET_S
