"""Memory profiles (`BerniniPipeline.enable_memory_profile`, `--memory_profile`): each is on when asked, the offload
profiles leave the output bit for bit unchanged, fp8 stores the experts in float8 and moves the output by a measured,
bounded amount. Run on the CPU, which stands in for the accelerator (the hooks run; nothing moves)."""

import argparse
import re

import pytest
import torch

from bernini_diffusers import memory, options, tiny
from bernini_diffusers.memory import (
    FP8_STORAGE_DTYPE,
    MEMORY_PROFILES,
    full_precision_parameters,
    parameter_bytes,
)
from bernini_diffusers.testing import tiny_pipeline

# A v2v call reads a video (VAE encode), runs both experts over a packed sequence and decodes (VAE decode): every
# component passes through the profile's hooks.
CALL = dict(prompt="a red car", task_type="v2v", num_frames=5, height=32, width=48, num_inference_steps=2)
# fp8 on the tiny model, this call: the final latents move by rel-L2 2.07e-3 against the float32 run (measured on the
# CPU); the bound leaves room for other platforms while still catching an fp8 path that breaks the model.
FP8_REL_L2_BOUND = 2e-2


def _run(pipe, media_dir):
    """The final latents and the frames decoded from them (decoded frames are clipped to [0, 1], so a difference is
    measured on the latents)."""
    pipe.set_progress_bar_config(disable=True)
    video = str(media_dir / "source.mp4")
    latents = pipe(**CALL, video=video, output_type="latent", generator=torch.Generator().manual_seed(42)).frames
    return latents, pipe.decode_latents(latents, "pt")


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _hooks(module, name):
    return [m for m in module.modules() if name in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})]


@pytest.fixture(scope="module")
def plain(media_dir):
    """Today's call, without a profile: latents and decoded frames."""
    return _run(tiny_pipeline(), media_dir)


@pytest.fixture(scope="module")
def fp8_run(media_dir):
    pipe = tiny_pipeline()
    pipe.enable_memory_profile("fp8", "cpu")
    return _run(pipe, media_dir)


def test_unknown_profile_lists_the_names():
    with pytest.raises(ValueError, match="'fp4'.*resident, expert_offload, group_offload, fp8, fp8\\+expert_offload"):
        tiny_pipeline().enable_memory_profile("fp4")
    assert len(MEMORY_PROFILES) == 9


def test_no_profile_and_resident_are_todays_call(plain, media_dir):
    """Nothing is applied by default, and `resident` is `pipe.to(device)`: the output is bit for bit the same."""
    pipe = tiny_pipeline()
    assert getattr(pipe, "_memory_profile", None) is None and memory._foreign_hooks(pipe) == []
    profile = pipe.enable_memory_profile("resident")  # no CUDA here: the default device is the CPU
    assert (profile.placement, profile.fp8) == ("resident", False)
    assert pipe._memory_profile == ("resident", torch.device("cpu"))
    assert memory._foreign_hooks(pipe) == []
    assert _equal(_run(pipe, media_dir), plain)


def test_expert_offload_is_diffusers_model_offload_and_exact(plain, media_dir):
    pipe = tiny_pipeline()
    pipe.enable_memory_profile("expert_offload", "cpu")
    assert {id(h.model) for h in pipe._all_hooks} == {
        id(c) for c in (pipe.text_encoder, pipe.transformer, pipe.transformer_2, pipe.vae)
    }
    assert _equal(_run(pipe, media_dir), plain)


def test_group_offload_hooks_every_component_and_is_exact(plain, media_dir):
    pipe = tiny_pipeline()
    pipe.enable_memory_profile("group_offload", "cpu")
    for expert in (pipe.transformer, pipe.transformer_2):
        # block level: one group per transformer block, plus the top level for the embeddings and the head
        hooked = _hooks(expert, "group_offloading")
        assert expert in hooked and all(block in hooked for block in expert.blocks)
        assert pipe.transformer.blocks[0].attn1 not in hooked
    # the text encoder's blocks are nested under `encoder`: it moves as one group
    assert _hooks(pipe.text_encoder, "group_offloading") == [pipe.text_encoder]
    # leaf level for the VAE: its encode/decode never go through a top-level forward
    vae_hooked = _hooks(pipe.vae, "group_offloading")
    assert any(isinstance(m, torch.nn.Conv3d) for m in vae_hooked)
    assert pipe._execution_device == torch.device("cpu")
    assert _equal(_run(pipe, media_dir), plain)


def test_fp8_stores_the_experts_in_float8(plain, fp8_run):
    pipe = tiny_pipeline()
    before = [parameter_bytes(e) for e in (pipe.transformer, pipe.transformer_2)]
    pipe.enable_memory_profile("fp8", "cpu")
    for expert, plain_bytes in zip((pipe.transformer, pipe.transformer_2), before):
        assert expert.blocks[0].attn1.to_q.weight.dtype == FP8_STORAGE_DTYPE
        assert expert.blocks[0].ffn.net[2].weight.dtype == FP8_STORAGE_DTYPE
        assert expert.dtype == torch.float32  # the compute dtype diffusers reports
        kept = full_precision_parameters(expert)
        # what stays in full precision: embeddings, norms, modulation tables, the head
        roots = {"patch_embedding", "condition_embedder", "scale_shift_table", "proj_out"}
        assert all(n.split(".")[0] in roots or "norm" in n or n.endswith("scale_shift_table") for n in kept)
        assert {"patch_embedding.weight", "proj_out.weight", "blocks.0.norm2.weight"} <= set(kept)
        assert all(expert.get_parameter(n).dtype == torch.float32 for n in kept)
        assert parameter_bytes(expert) < 0.6 * plain_bytes  # tiny: measured 0.51 (buffers and embeddings dominate)
    assert all(torch.isfinite(t).all() for t in fp8_run)
    rel = _rel_l2(fp8_run[0], plain[0])
    assert 0 < rel < FP8_REL_L2_BOUND, rel


@pytest.mark.parametrize("name", ["fp8+expert_offload", "fp8+group_offload"])
def test_fp8_combines_with_offload_exactly(name, fp8_run, media_dir):
    pipe = tiny_pipeline()
    pipe.enable_memory_profile(name, "cpu")
    assert pipe.transformer_2.blocks[1].attn2.to_k.weight.dtype == FP8_STORAGE_DTYPE
    assert _equal(_run(pipe, media_dir), fp8_run)


def test_one_profile_per_pipeline():
    pipe = tiny_pipeline()
    pipe.enable_memory_profile("fp8", "cpu")
    hooks = len(_hooks(pipe.transformer, "layerwise_casting"))
    pipe.enable_memory_profile("fp8", "cpu", vae_tiling=True)  # the same again: only tiling changes
    assert pipe.vae.use_tiling and len(_hooks(pipe.transformer, "layerwise_casting")) == hooks
    with pytest.raises(ValueError, match="already runs the profile 'fp8'.*load the pipeline again"):
        pipe.enable_memory_profile("group_offload", "cpu")
    by_hand = tiny_pipeline()
    by_hand.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="'fp8'.*model offload.*freshly loaded"):
        by_hand.enable_memory_profile("fp8", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="`device`='cuda': no CUDA device"):
            tiny_pipeline().enable_memory_profile("resident", "cuda")
    with pytest.raises(ValueError, match="`vae_tiling`=1"):
        tiny_pipeline().enable_memory_profile("resident", "cpu", vae_tiling=1)


def test_vae_tiling_is_off_unless_asked():
    pipe = tiny_pipeline()
    pipe.enable_memory_profile("resident", "cpu")
    assert not pipe.vae.use_tiling
    tiled = tiny_pipeline()
    tiled.enable_memory_profile("resident", "cpu", vae_tiling=True)
    assert tiled.vae.use_tiling


def test_single_expert_model_takes_fp8():
    pipe = tiny_pipeline(two_experts=False)
    pipe.enable_memory_profile("fp8+group_offload", "cpu")
    assert pipe.transformer.blocks[0].attn1.to_v.weight.dtype == FP8_STORAGE_DTYPE


# ------------------------------------------------------------------------------------------------ command line


def _args(*argv):
    parser = argparse.ArgumentParser()
    options.add_model_arguments(parser)
    return parser.parse_args(["--model", "tiny", "--device", "cpu", *argv])


@pytest.mark.parametrize("name", ["expert_offload", "group_offload", "fp8+expert_offload", "fp8+group_offload"])
def test_cli_refuses_offload_on_the_cpu_before_loading(name, monkeypatch):
    monkeypatch.setattr(tiny, "tiny_pipeline", lambda **kw: pytest.fail("the model must not load"))
    args = _args("--memory_profile", name)
    with pytest.raises(ValueError, match=f"`memory_profile`='{re.escape(name)}'.*device is cpu.*--device cuda"):
        options.check_environment(args)
    with pytest.raises(ValueError, match="`memory_profile`"):
        options.load_pipeline(args)


def test_cli_offload_flag_is_expert_offload():
    with pytest.raises(ValueError, match="`enable_model_cpu_offload`.*conflicts with `memory_profile`='fp8'"):
        options.check_environment(_args("--enable_model_cpu_offload", "--memory_profile", "fp8"))
    with pytest.raises(ValueError, match="`enable_model_cpu_offload` needs an accelerator"):
        options.check_environment(_args("--enable_model_cpu_offload", "--memory_profile", "expert_offload"))
    with pytest.raises(SystemExit):
        _args("--memory_profile", "fp4")


def test_cli_memory_profile_and_vae_tiling_reach_the_pipeline():
    pipe = options.load_pipeline(_args("--memory_profile", "fp8", "--vae_tiling"))
    assert pipe._memory_profile == ("fp8", torch.device("cpu")) and pipe.vae.use_tiling
    assert pipe.transformer.blocks[0].attn1.to_q.weight.dtype == FP8_STORAGE_DTYPE
    default = options.load_pipeline(_args())
    assert getattr(default, "_memory_profile", None) is None and not default.vae.use_tiling
    assert default.transformer.blocks[0].attn1.to_q.weight.dtype == torch.float32
