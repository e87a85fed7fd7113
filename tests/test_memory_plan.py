"""The memory plan (`BerniniPipeline.estimate_memory`, `bernini generate --plan`): made from configs and meta tensors,
with no weights and no network; its figures move the right way with the size, the profile, the format and the shard
degree. How close it is to a measured run is `benchmarks/bench_low_ram.py`'s (a medium model, peak RSS per profile)."""

import pytest
import torch

from bernini_diffusers import BerniniPipeline, cli, memory_plan
from bernini_diffusers.constants import WAN22_A14B_TRANSFORMER_CONFIG, CHECKPOINT_FORMATS
from bernini_diffusers.memory_plan import ModelConfigs, estimate_memory, expert_bytes, model_configs
from bernini_diffusers.testing import save_tiny_pretrained
from bernini_diffusers.tiny import tiny_model_configs

T2V = dict(task_type="t2v", num_frames=9, height=64, width=96)


def _plan(profile="resident", fmt=None, device="cuda", model=None, **call):
    model = tiny_model_configs() if model is None else model
    return BerniniPipeline.estimate_memory(
        model, profile, fmt, device=device, gpu_memory=24, ram=32, **{**T2V, **call}
    )


def _ram(plan):
    """The plan's host RAM without this process's own resident set (measured, so it moves between plans)."""
    return plan.ram_bytes - plan.parts["this process"]


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight read fails the test: the plan is made from configs alone."""

    def refuse(*args, **kwargs):
        raise AssertionError("a memory plan read weights")

    import safetensors.torch
    from diffusers import ModelMixin

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(refuse))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_tiny_plan_needs_no_weights(no_weights):
    plan = _plan()
    assert plan.gpu_bytes > 0 and plan.ram_bytes > plan.parts["this process"]
    assert plan.fits is True and "fits" in str(plan) and "peak host RAM" in str(plan)
    tiny = tiny_model_configs()
    assert plan.parts["expert (bf16)"] == expert_bytes(tiny.transformer, "bf16").total


def test_real_configs_are_known_without_files(no_weights):
    expert = expert_bytes(WAN22_A14B_TRANSFORMER_CONFIG, "bf16")
    assert 14.0e9 < expert.parameters < 14.6e9  # each A14B expert: ~14.3B parameters
    small = expert_bytes(model_configs("1.3B").transformer, "bf16")
    assert 1.3e9 < small.parameters < 1.5e9
    assert model_configs("ByteDance/Bernini-R-Diffusers").num_experts == 2
    assert model_configs("ByteDance/Bernini-R-1.3B-Diffusers").num_experts == 1
    with pytest.raises(ValueError, match="`model`='someone/other'"):
        model_configs("someone/other")


def test_a_model_folder_is_read_from_its_configs(tmp_path):
    folder = save_tiny_pretrained(tmp_path / "tiny", layout="diffusers")
    configs = model_configs(folder)
    tiny = tiny_model_configs()
    assert configs.num_experts == 2
    assert expert_bytes(configs.transformer).total == expert_bytes(tiny.transformer).total


def test_estimates_move_the_right_way():
    small, large = _plan(height=64, width=96), _plan(height=256, width=384)
    assert large.tokens == 16 * small.tokens
    assert large.gpu_bytes > small.gpu_bytes and large.ram_bytes > small.ram_bytes
    a14b = dict(model="A14B", num_frames=81, height=480, width=848)
    size = dict(num_frames=81, height=480, width=848, task_type="t2v")
    resident, offload, group, low_ram = (_plan(p, **a14b) for p in ("resident", "expert_offload", "group_offload", "low_ram"))
    assert resident.gpu_bytes > offload.gpu_bytes > group.gpu_bytes
    assert _ram(low_ram) < _ram(offload) == _ram(resident)
    # low_ram holds one component at a time: about one expert, against two experts and the text encoder
    expert = resident.parts["expert (bf16)"]
    assert _ram(low_ram) < 1.2 * expert < _ram(resident) - expert
    sizes = [expert_bytes(WAN22_A14B_TRANSFORMER_CONFIG, f).total for f in ("fp32", "bf16", "Q8_0", "fp8", "Q4_K")]
    assert sizes == sorted(sizes, reverse=True)
    fp8, q4 = _plan("low_ram", "fp8", **a14b), _plan("low_ram", "Q4_K", **a14b)
    assert low_ram.ram_bytes > fp8.ram_bytes > q4.ram_bytes and low_ram.gpu_bytes > fp8.gpu_bytes > q4.gpu_bytes
    # the fp8 profile on a bf16 file: the device holds float8, the load holds the bf16 file and the float8 copies
    fp8_profile = _plan("fp8", **a14b)
    fp8_expert = fp8_profile.parts["expert (fp8)"]
    assert fp8_profile.gpu_bytes < resident.gpu_bytes and _ram(fp8_profile) == _ram(resident) + 2 * fp8_expert
    fp8_low_ram = _plan("fp8+low_ram", **a14b)
    assert _ram(fp8_low_ram) == _ram(low_ram) + fp8_expert
    # FSDP: each rank holds 1/N of each expert plus a gathered block
    sharded = BerniniPipeline.estimate_memory("A14B", "resident", device="cuda", shard_degree=4, **size)
    assert sharded.gpu_bytes < resident.gpu_bytes - expert
    # ... read row by row: the host holds no expert (resident), or both experts' shards (expert_offload); fp8 shards
    # are half the bf16 ones; expert_offload leaves the device one expert's shards at a time
    shard = {p: _plan(p, shard_degree=4, **a14b) for p in ("resident", "expert_offload", "fp8", "fp8+expert_offload")}
    assert _ram(shard["resident"]) == _ram(resident) - 2 * expert  # the text encoder and the VAE
    assert _ram(shard["expert_offload"]) - _ram(shard["resident"]) >= 2 * (expert // 4)
    assert shard["fp8"].gpu_bytes < shard["resident"].gpu_bytes and _ram(shard["fp8+expert_offload"]) < _ram(
        shard["expert_offload"])  # fmt: skip
    assert shard["expert_offload"].gpu_bytes < shard["resident"].gpu_bytes
    with pytest.raises(ValueError, match="'group_offload' cannot be combined with sharded weights"):
        _plan("group_offload", shard_degree=2, **a14b)
    # a sharded GGUF expert is held dequantized (FSDP2 cannot shard packed blocks): priced as the bf16 one
    assert _plan("resident", "Q4_K", shard_degree=4, **a14b).gpu_bytes == shard["resident"].gpu_bytes
    with pytest.raises(ValueError, match="GGUF expert is already quantized"):
        _plan("fp8", "Q4_K", shard_degree=4, **a14b)
    # a v2v call also attends to the source video: twice the tokens
    v2v = _plan(**{**a14b, "task_type": "v2v", "video": "source.mp4"}, media_sizes={"video": (848, 480)})
    assert v2v.tokens == 2 * resident.tokens and v2v.gpu_bytes > resident.gpu_bytes


def test_on_the_cpu_everything_is_host_ram():
    plan = _plan(device="cpu")
    assert plan.gpu_bytes is None and plan.fits_gpu is None and "n/a" in str(plan)
    assert _ram(plan) > _ram(_plan(device="cuda")) - plan.parts["decoded video"]
    # diffusers' model offload on the CPU copies each component it moves to `cpu:0`: one more expert than resident
    offload = _plan("expert_offload", device="cpu")
    expert = next(v for k, v in plan.parts.items() if k.startswith("expert ("))
    assert _ram(offload) == _ram(plan) + expert
    assert _ram(_plan("expert_offload")) == _ram(_plan())


def test_fits_follows_the_memory_given():
    plan = _plan(model="A14B", num_frames=81, height=480, width=848)
    assert plan.fits_gpu is False and plan.fits_ram is False and "does NOT fit" in str(plan)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"checkpoint_format": "Q2_K"}, "`checkpoint_format`='Q2_K'"),
        ({"shard_degree": 0}, "`shard_degree`=0"),
        ({"gpu_memory": -1}, "`gpu_memory`=-1"),
        ({"memory_profile": "tiny"}, "`memory_profile`='tiny'"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate_memory(tiny_model_configs(), tokens=72, latent_grid=(3, 8, 12), **kwargs)
    assert "Q4_K" in CHECKPOINT_FORMATS


def test_cli_plan_prints_before_any_load(monkeypatch, capsys, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("--plan loaded the model")

    monkeypatch.setattr(cli, "load_pipeline", refuse)
    out = tmp_path / "out.mp4"
    argv = ["generate", "--model", "tiny", "--prompt", "a cat", "--output", str(out), "--plan"]
    assert cli.main([*argv, "--memory_profile", "low_ram", "--device", "cuda", "--gpu_memory", "24", "--ram", "32"]) == 0
    captured = capsys.readouterr()
    assert "memory plan: model tiny, profile low_ram" in captured.out and "fits" in captured.out
    assert "random weights" not in captured.err  # the tiny model's load note: nothing was loaded
    assert not out.exists()
    assert cli.main([*argv, "--checkpoint_format", "Q4_K", "--device", "cpu"]) == 0
    assert "experts Q4_K, device cpu" in capsys.readouterr().out


def test_model_configs_pass_through():
    configs = ModelConfigs(dict(WAN22_A14B_TRANSFORMER_CONFIG), 1, name="one")
    assert model_configs(configs) is configs
    assert memory_plan.GB == 1e9
