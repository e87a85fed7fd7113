"""Speed recipes: the step-cache presets on both experts, MagCache calibrated per expert and per mode, the few-step
LoRA recipe (Lightning key format), the opt-in SageAttention backend, and their command-line flags."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
from forward_counter import EXPERTS, FullForwards

from bernini_diffusers import attention, cli, options
from bernini_diffusers.acceleration import (
    CACHE_PRESETS,
    TURBO,
    MagCacheCalibration,
    calibrate_magcache,
)
from bernini_diffusers.guidance import Guidance
from bernini_diffusers.pipeline_bernini import BerniniPipeline
from bernini_diffusers.tasks import GuidanceMode
from bernini_diffusers.testing import get_tiny_components

# 8 steps at shift 5: timesteps 999, 971, 937, 892 on the high-noise expert, 833 ... on the low-noise one (4 + 4).
CALL = {
    "prompt": "a red ball", "task_type": "t2v", "num_frames": 1, "height": 32, "width": 32, "num_inference_steps": 8,
    "output_type": "latent",
}  # fmt: skip


@pytest.fixture(scope="module")
def pipe():
    """A two-expert tiny pipeline of its own: the tests add and remove caches and adapters on it."""
    pipe = BerniniPipeline(**get_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def clean(pipe):
    yield pipe
    pipe.disable_cache()


def run_counted(counter, pipe, **kwargs):
    """One call with `CALL` (and `kwargs`); returns its frames and the number of full forwards it ran."""
    counter.reset()
    out = pipe(**{**CALL, **kwargs}, generator=torch.Generator().manual_seed(0)).frames
    return out, counter.total


@pytest.fixture
def spy(pipe):
    counter = FullForwards(pipe)
    yield counter
    counter.remove()


@pytest.fixture(scope="module")
def uncached(pipe):
    """The uncached output of CALL and its forward count, computed once."""
    counter = FullForwards(pipe)
    try:
        return run_counted(counter, pipe)
    finally:
        counter.remove()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------------------ presets


def test_no_preset_leaves_the_default_output_bit_identical(clean, spy, uncached):
    pipe = clean
    assert not any(getattr(pipe, name).is_cache_enabled for name in EXPERTS)  # nothing is on by default
    reference, forwards = uncached
    pipe.enable_cache_preset("fbc-fast")
    cached, fewer = run_counted(spy, pipe)
    pipe.disable_cache()
    again, same = run_counted(spy, pipe)
    assert fewer < forwards and not torch.equal(cached, reference)
    assert torch.equal(again, reference) and same == forwards
    assert not any(getattr(pipe, name).is_cache_enabled for name in EXPERTS)


# The bounds are the figures of benchmarks/bench_cache.py with some margin (tiny model, t2v, 8 steps).
@pytest.mark.parametrize(
    ("name", "config_type", "max_forwards", "max_rel_l2"),
    [("fbc-safe", FirstBlockCacheConfig, 16, 1e-6), ("fbc-fast", FirstBlockCacheConfig, 8, 0.02),
     ("taylorseer", TaylorSeerCacheConfig, 12, 0.15)],
)  # fmt: skip
def test_preset_on_both_experts(clean, spy, uncached, name, config_type, max_forwards, max_rel_l2):
    pipe = clean
    reference, forwards = uncached
    assert forwards == 16  # 8 steps x 2 branches
    pipe.enable_cache_preset(name)
    configs = [getattr(pipe, expert)._cache_config for expert in EXPERTS]
    assert all(isinstance(c, config_type) for c in configs) and configs[0] is not configs[1]  # one config each
    out, cached = run_counted(spy, pipe)
    assert cached <= max_forwards and torch.isfinite(out).all()
    assert rel_l2(out, reference) <= max_rel_l2
    # A second preset replaces the first instead of failing on "caching has already been enabled".
    pipe.enable_cache_preset("fbc-safe")
    assert isinstance(pipe.transformer._cache_config, FirstBlockCacheConfig)


def test_preset_arguments_are_checked(clean):
    pipe = clean
    with pytest.raises(ValueError, match=r"`name`='teacache'.*fbc-safe, fbc-fast, taylorseer, magcache"):
        pipe.enable_cache_preset("teacache")
    with pytest.raises(ValueError, match="'magcache' needs `calibration`.*calibrate_magcache"):
        pipe.enable_cache_preset("magcache")
    calibration = MagCacheCalibration("t2v", 2, {"transformer": [1.0], "transformer_2": [1.0]})
    with pytest.raises(ValueError, match="'fbc-safe' takes no `calibration`"):
        pipe.enable_cache_preset("fbc-safe", calibration=calibration)
    assert not any(getattr(pipe, name).is_cache_enabled for name in EXPERTS)
    assert set(CACHE_PRESETS) == {"fbc-safe", "fbc-fast", "taylorseer", "magcache"}


# ------------------------------------------------------------------------------------------------ MagCache


def test_magcache_calibrated_per_expert(clean, spy, tmp_path):
    pipe = clean
    # 7 steps: 999, 967, 926 on the high-noise expert, 869 ... on the low-noise one: 3 + 4, tables of unequal length.
    call = {**CALL, "num_inference_steps": 7, "guidance_mode": "v2v_apg"}
    calibration = calibrate_magcache(pipe, {**call, "generator": torch.Generator().manual_seed(0)})
    assert calibration.guidance_mode == "v2v_apg" and calibration.num_inference_steps == 7
    assert {name: len(table) for name, table in calibration.ratios.items()} == {"transformer": 3, "transformer_2": 4}
    for name in EXPERTS:
        # one table per branch context, each as long as the expert's own steps; the expert-level table is their mean
        assert set(calibration.branch_ratios[name]) == {"uncond_vi", "cond_vi"}  # t2v: no media, combos named vi
        assert calibration.ratios[name][0] == 1.0 and all(0.5 < r < 2 for r in calibration.ratios[name])
        columns = zip(*calibration.branch_ratios[name].values())
        assert calibration.ratios[name] == pytest.approx([sum(c) / len(c) for c in columns])
    assert not any(getattr(pipe, name).is_cache_enabled for name in EXPERTS)  # calibration leaves no hook behind
    assert MagCacheCalibration.load(calibration.save(tmp_path / "mag.json")) == calibration

    reference, forwards = run_counted(spy, pipe, **{k: v for k, v in call.items() if k != "output_type"})
    pipe.enable_cache_preset("magcache", calibration=calibration)
    configs = {name: getattr(pipe, name)._cache_config for name in EXPERTS}
    assert all(isinstance(c, MagCacheConfig) for c in configs.values())
    assert {name: c.num_inference_steps for name, c in configs.items()} == {"transformer": 3, "transformer_2": 4}
    assert torch.equal(configs["transformer_2"].mag_ratios, torch.tensor(calibration.ratios["transformer_2"]))
    out, cached = run_counted(spy, pipe, **{k: v for k, v in call.items() if k != "output_type"})
    assert forwards == 14 and cached < forwards
    assert rel_l2(out, reference) <= 0.05  # measured 0.012 (benchmarks/bench_cache.py)


def test_diffusers_magcache_calibration_alone_misses_two_experts(clean, capsys):
    # The miscount calibrate_magcache works around: a config of the call's 3 steps on each expert never reaches its
    # end (the high-noise expert runs 2 of them, the low-noise one 1), so diffusers' calibration never reports.
    pipe = clean
    for name in EXPERTS:
        getattr(pipe, name).enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=3))
    pipe(**{**CALL, "num_inference_steps": 3}, generator=torch.Generator().manual_seed(0))
    assert "Calibration Complete" not in capsys.readouterr().out


def test_calibration_arguments_are_checked(clean):
    pipe = clean
    with pytest.raises(ValueError, match="callback_on_step_end"):
        calibrate_magcache(pipe, {**CALL, "callback_on_step_end": lambda *a: a[-1]})
    pipe.enable_cache_preset("fbc-safe")
    with pytest.raises(ValueError, match="disable_cache"):
        calibrate_magcache(pipe, CALL)


# ------------------------------------------------------------------------------------------------ turbo LoRA

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="the LoRA loader needs peft")


def lightning_lora(seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """A LoRA in the key format of the Wan 2.2 Lightning / LightX2V files: `diffusion_model.blocks.N.self_attn.q`
    `.lora_down.weight` / `.lora_up.weight` / `.alpha`, on both tiny blocks' self-attention q and o and
    cross-attention k."""
    g = torch.Generator().manual_seed(seed)
    inner = 256  # the tiny experts: 2 heads x 128
    modules = {"self_attn.q": (inner, inner), "self_attn.o": (inner, inner), "cross_attn.k": (inner, inner)}
    state = {}
    for block in (0, 1):
        for module, (out_dim, in_dim) in modules.items():
            key = f"diffusion_model.blocks.{block}.{module}"
            state[f"{key}.lora_down.weight"] = torch.randn(rank, in_dim, generator=g) * 0.2
            state[f"{key}.lora_up.weight"] = torch.randn(out_dim, rank, generator=g) * 0.2
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    return state


def _lora_weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


@needs_peft
def test_turbo_lora_loads_into_both_experts_and_changes_output():
    pipe = BerniniPipeline(**get_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    call = {**CALL, **TURBO}
    reference = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    pipe.load_turbo_lora(lightning_lora(1), lightning_lora(2))
    for name in EXPERTS:
        model = getattr(pipe, name)
        assert "turbo" in model.peft_config and len(_lora_weights(model)) == 2 * 2 * 3
    high, low = _lora_weights(pipe.transformer), _lora_weights(pipe.transformer_2)
    assert not any(torch.equal(high[k], low[k]) for k in high)  # each expert got its own file
    turbo = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    assert torch.isfinite(turbo).all() and rel_l2(turbo, reference) > 1e-3
    pipe.unload_lora_weights()
    assert torch.allclose(pipe(**call, generator=torch.Generator().manual_seed(0)).frames, reference, atol=1e-5)


@needs_peft
def test_turbo_lora_needs_two_experts():
    pipe = BerniniPipeline(**get_tiny_components(two_experts=False))
    with pytest.raises(ValueError, match="load_turbo_lora needs both experts.*transformer_2=NoneType"):
        pipe.load_turbo_lora(lightning_lora(1), lightning_lora(2))


@pytest.mark.parametrize("mode", list(GuidanceMode), ids=lambda m: m.value)
def test_turbo_settings_reduce_every_mode_to_its_conditional_branch(mode):
    # Guidance weights 1 (and APG's eta 1, no clamp, no momentum): the result is the last branch, F(all conditions, +).
    g = torch.Generator().manual_seed(0)
    guidance = Guidance(mode, eta=TURBO["eta"], momentum=TURBO["momentum"], norm_threshold=TURBO["norm_threshold"])
    links = len(guidance.spec.weights)
    latents = torch.randn(1, 16, 2, 4, 6, generator=g)
    outputs = [torch.randn(1, 16, 2, 4, 6, generator=g) for _ in range(links + 1)]
    weights = [TURBO[name] for name in guidance.spec.weights]
    result = guidance(latents, outputs, weights, torch.tensor(0.7))
    assert torch.allclose(result.float(), outputs[-1], atol=1e-5)
    assert TURBO["num_inference_steps"] == 4 and TURBO["omega_scale"] == 1.0 and TURBO["flow_shift"] == 5.0


def test_turbo_fills_only_the_flags_left_unset():
    parser = cli.build_parser()
    args = parser.parse_args(["generate", "--model", "tiny", "--prompt", "x", "--turbo_lora", "hi", "lo"])
    options.resolve_size_defaults(args)
    assert args.num_inference_steps == 4 and args.omega_txt == 1.0 and args.omega_scale == 1.0
    assert args.eta == 1.0 and args.norm_threshold == [0.0] and args.flow_shift == 5.0
    given = parser.parse_args(["generate", "--model", "tiny", "--prompt", "x", "--turbo_lora", "hi", "lo",
                               "--num_inference_steps", "6", "--omega_txt", "2.5", "--eta", "0.7"])  # fmt: skip
    options.resolve_size_defaults(given)
    assert given.num_inference_steps == 6 and given.omega_txt == 2.5 and given.eta == 0.7 and given.omega_img == 1.0
    plain = parser.parse_args(["generate", "--model", "tiny", "--prompt", "x"])
    options.resolve_size_defaults(plain)
    assert plain.omega_txt == 4.0 and plain.eta == 0.5 and plain.norm_threshold == [50.0, 50.0, 50.0]


@needs_peft
def test_load_pipeline_applies_turbo_and_cache_flags(tmp_path):
    from safetensors.torch import save_file

    paths = []
    for seed, name in ((1, "high.safetensors"), (2, "low.safetensors")):
        save_file(lightning_lora(seed), tmp_path / name)
        paths.append(str(tmp_path / name))
    parser = cli.build_parser()
    args = parser.parse_args(["generate", "--model", "tiny", "--prompt", "x", "--device", "cpu", "--turbo_lora",
                              *paths, "--cache_preset", "taylorseer"])  # fmt: skip
    pipe = options.load_pipeline(args)
    for name in EXPERTS:
        model = getattr(pipe, name)
        assert "turbo" in model.peft_config and isinstance(model._cache_config, TaylorSeerCacheConfig)
    missing = parser.parse_args(["generate", "--model", "tiny", "--prompt", "x", "--device", "cpu", "--turbo_lora",
                                 str(tmp_path / "nope.safetensors"), paths[1]])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="turbo_lora.*nope.safetensors"):
        options.check_environment(missing)  # before the model loads
    with pytest.raises(FileNotFoundError, match="`high`.*nope.safetensors"):
        options.load_pipeline(missing)
    with pytest.raises(SystemExit):  # MagCache needs a calibration: not offered on the command line
        parser.parse_args(["generate", "--model", "tiny", "--prompt", "x", "--cache_preset", "magcache"])


# ------------------------------------------------------------------------------------------------ SageAttention


@pytest.fixture
def fresh_attention(monkeypatch):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    monkeypatch.setattr(attention, "_LOGGED", set())
    active = _AttentionBackendRegistry._active_backend
    yield monkeypatch
    _AttentionBackendRegistry.set_active_backend(active)


def test_sage_without_cuda_or_sageattention_is_refused(fresh_attention):
    monkeypatch = fresh_attention
    monkeypatch.setattr(attention, "_cuda_capability", lambda: None)
    with pytest.raises(RuntimeError, match="'sage'.*lossy.*needs a CUDA GPU.*pip install \"sageattention"):
        attention.resolve_attention_backend("sage")
    monkeypatch.setattr(attention, "_cuda_capability", lambda: (9, 0))
    monkeypatch.setattr(attention, "_module_importable", lambda name: False)
    with pytest.raises(ImportError, match="'sage' needs sageattention, which does not import"):
        attention.resolve_attention_backend("sage")
    # The command line turns it into a usage error that names the flag, before any weight is read.
    args = cli.build_parser().parse_args(["generate", "--model", "tiny", "--prompt", "x", "--attention_backend", "sage"])
    monkeypatch.setattr(attention, "_cuda_capability", lambda: None)
    with pytest.raises(ValueError, match="`attention_backend`='sage'.*CUDA"):
        options.check_environment(args)


def test_auto_never_picks_sage(fresh_attention):
    monkeypatch = fresh_attention
    for capability in ((9, 0), (8, 0)):
        monkeypatch.setattr(attention, "_cuda_capability", lambda capability=capability: capability)
        monkeypatch.setattr(attention, "_module_importable", lambda name: name == "sageattention")
        assert attention.available_backends()["sage"] is True
        assert attention.resolve_attention_backend("auto", torch.bfloat16) == "sdpa"
        assert attention.resolve_attention_backend("sage") == "sage"
    assert attention.LOSSY_BACKENDS == ("sage",)


def test_sage_is_checked_when_chosen_not_at_import(fresh_attention):
    # Without CUDA the answer comes before any attempt to import sageattention (whose build may not even load here);
    # the module list of available backends is computed on demand, never when bernini_diffusers is imported.
    monkeypatch = fresh_attention
    monkeypatch.setattr(attention, "_cuda_capability", lambda: None)

    def no_import(name):
        raise AssertionError(f"{name} was imported")

    monkeypatch.setattr(attention, "_module_importable", no_import)
    assert isinstance(attention._unusable("sage"), RuntimeError)
    assert attention.resolve_attention_backend("auto") == "sdpa"
