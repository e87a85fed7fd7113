"""The `low_ram` profile with single-file expert checkpoints (`high_noise_ckpt`/`low_noise_ckpt`, docs/checkpoints.md):
each expert is built from its file by `formats`, released after its steps and built again from the file for the next
phase; the output equals the same experts loaded resident, bit for bit."""

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import save_file
from test_formats import _scaled, _write_gguf
from test_low_ram import _call, _one_expert_at_a_time, _weights

from bernini_diffusers import BerniniPipeline
from bernini_diffusers.testing import save_tiny_pretrained
from bernini_diffusers.tiny import tiny_transformer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("low_ram_ckpt")
    base = save_tiny_pretrained(root / "wan_base", layout="wan")
    state = {k: v.detach().clone().contiguous() for k, v in tiny_transformer().state_dict().items()}
    high = root / "high_fp8_scaled.safetensors"
    save_file(_scaled(state, prefix="model.diffusion_model.")[0], str(high))
    low = root / "low.gguf"
    _write_gguf(low, state, Q.Q8_0)
    return base, high, low


def test_low_ram_rebuilds_checkpoint_experts(checkpoints, media_dir):
    base, high, low = checkpoints
    resident = BerniniPipeline.from_pretrained(base, high_noise_ckpt=high, low_noise_ckpt=low)
    pipe = BerniniPipeline.from_pretrained(
        base, high_noise_ckpt=high, low_noise_ckpt=low, memory_profile="low_ram", device="cpu"
    )
    store = pipe._low_ram
    assert store.loaded() == [] and store.loads == {"text_encoder": 1, "transformer": 1, "transformer_2": 1}
    assert _weights(pipe.transformer) == _weights(pipe.transformer_2) == 0
    reference = _call(resident, media_dir, output_type="latent")
    # each forward ran with its expert alone in memory, each expert built again from its file once per call
    loads = _one_expert_at_a_time(pipe, media_dir, reference)
    assert loads == [{"text_encoder": 1 + call, "transformer": 1 + call, "transformer_2": 1 + call} for call in (1, 2)]
    assert pipe.transformer_2.blocks[0].attn1.to_q.weight.quant_type == Q.Q8_0  # GGUF stays quantized
    assert pipe.transformer.config._name_or_path == str(high)


def test_fp8_low_ram_refuses_checkpoints_before_reading(checkpoints, monkeypatch):
    from bernini_diffusers import low_ram

    base, high, low = checkpoints
    monkeypatch.setattr(low_ram, "load_checkpoint_expert", lambda *a, **k: pytest.fail("a checkpoint was read"))
    with pytest.raises(ValueError, match="'fp8\\+low_ram' does not take `high_noise_ckpt`"):
        BerniniPipeline.from_pretrained(
            base, high_noise_ckpt=high, low_noise_ckpt=low, memory_profile="fp8+low_ram", device="cpu"
        )


@pytest.mark.parametrize("source", ["folder", "checkpoints"])
def test_low_ram_group_offload_equals_low_ram(checkpoints, media_dir, source):
    """`low_ram+group_offload`: each expert read to the host runs under diffusers' block-level group offload (on this
    CPU-only machine its onload device is the CPU too); the output equals `low_ram`'s bit for bit."""
    from diffusers.hooks import HookRegistry

    base, high, low = checkpoints
    files = {} if source == "folder" else dict(high_noise_ckpt=high, low_noise_ckpt=low)
    folder = save_tiny_pretrained(base.parent / "diffusers", layout="diffusers") if source == "folder" else base
    plain = BerniniPipeline.from_pretrained(folder, **files, memory_profile="low_ram", device="cpu")
    pipe = BerniniPipeline.from_pretrained(folder, **files, memory_profile="low_ram+group_offload", device="cpu")
    assert pipe._memory_profile == ("low_ram+group_offload", torch.device("cpu"))
    for expert in (pipe.transformer, pipe.transformer_2):
        assert HookRegistry.check_if_exists_or_initialize(expert.blocks[0]).get_hook("group_offloading") is not None
    loads = _one_expert_at_a_time(pipe, media_dir, _call(plain, media_dir, output_type="latent"))
    assert [(n["transformer"], n["transformer_2"]) for n in loads] == [(1 + call, 1 + call) for call in (1, 2)]


def test_plan_prices_low_ram_group_offload():
    """The plan reads no weights: the real A14B at 480p, GPU as group offload's (an expert's non-block weights and a
    block at a time, not a whole expert), host RAM as low_ram's (one expert, not two)."""
    size = dict(task_type="t2v", num_frames=81, height=480, width=848, device="cuda", gpu_memory=80, ram=64)
    plan = {
        name: BerniniPipeline.estimate_memory("A14B", name, **size)
        for name in ("low_ram", "group_offload", "low_ram+group_offload")
    }
    assert plan["low_ram+group_offload"].gpu_bytes == plan["group_offload"].gpu_bytes < plan["low_ram"].gpu_bytes
    ram = {name: p.ram_bytes - p.parts["this process"] for name, p in plan.items()}
    assert ram["low_ram+group_offload"] == ram["low_ram"] < ram["group_offload"]
