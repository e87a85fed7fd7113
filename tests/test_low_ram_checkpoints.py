"""The `low_ram` profile with single-file expert checkpoints (`high_noise_ckpt`/`low_noise_ckpt`, docs/checkpoints.md):
each expert is built from its file by `formats`, released after its steps and built again from the file for the next
phase; the output equals the same experts loaded resident, bit for bit."""

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import save_file
from test_formats import _scaled, _write_gguf
from test_low_ram import _call, _runs, _weights

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
    seen = []
    for expert in (pipe.transformer, pipe.transformer_2):
        expert.register_forward_hook(lambda *_: seen.append(tuple(store.loaded())))
    reference = _call(resident, media_dir, output_type="latent")
    for call in (1, 2):
        seen.clear()
        assert torch.equal(_call(pipe, media_dir, output_type="latent"), reference)
        # each forward ran with its expert alone in memory, each expert built again from its file once per call
        assert _runs(seen) == [("transformer",), ("transformer_2",)]
        assert store.loads == {"text_encoder": 1 + call, "transformer": 1 + call, "transformer_2": 1 + call}
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
