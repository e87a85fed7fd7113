"""`BerniniPipeline.from_pretrained` through diffusers' own loader: quantization, dtype dicts, variants, `device_map`,
`low_cpu_mem_usage`, diffusers' logs, and the adapter for separate checkpoints and official config folders.

Everything is tiny and offline: a Wan-layout base (`save_tiny_pretrained`), original checkpoints of other weights
(`save_tiny_original_checkpoints`), their export (the diffusers layout of the same weights) and an official config
folder naming the base.
"""

import json
import logging

import pytest
import torch
from diffusers import PipelineQuantizationConfig

from bernini_diffusers import BerniniPipeline, BerniniTransformer3DModel
from bernini_diffusers.hub_export import export_pipeline
from bernini_diffusers.hub_export.convert import EXPERTS
from bernini_diffusers.loading import EXPERT_ENTRY
from bernini_diffusers.testing import save_tiny_original_checkpoints, save_tiny_pretrained, tiny_pipeline
from bernini_diffusers.tiny import get_tiny_components

SMALL = dict(num_frames=1, height=16, width=16, num_inference_steps=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    save_tiny_pretrained(root / "base", layout="wan")
    save_tiny_original_checkpoints(root / "Bernini-R")
    export_pipeline(root / "Bernini-R", root / "Bernini-R", root / "export", base=root / "base")
    config = root / "configs" / "bernini_renderer_wan22"
    config.mkdir(parents=True)
    (config / "config.json").write_text(
        json.dumps({"model_type": "bernini_renderer", "wan22_base": "../../base", "switch_dit_boundary": 0.875})
    )
    return root


def _latent(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe("a cat", task_type="t2v", generator=generator, output_type="latent", **SMALL).frames


def _int8_experts() -> PipelineQuantizationConfig:
    """torchao int8 weight-only for the two experts, in diffusers' shared form where diffusers accepts it."""
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    try:
        return PipelineQuantizationConfig(
            quant_backend="torchao",
            quant_kwargs={"quant_type": Int8WeightOnlyConfig()},
            components_to_quantize=list(EXPERTS),
        )
    except ValueError as err:
        # diffusers 0.42.1 with transformers 5 refuses the shared form for torchao ("signatures ... don't match"),
        # whatever the components; the per-component form is the same configuration.
        if "quant_mapping" not in str(err):
            raise
        return PipelineQuantizationConfig(quant_mapping={e: TorchAoConfig(Int8WeightOnlyConfig()) for e in EXPERTS})


def test_int8_weight_only_experts_quantized_at_load(folders):
    pytest.importorskip("torchao", reason="quantization needs torchao (the [test] extra)")
    from torchao.quantization import Int8Tensor

    config = _int8_experts()
    pipe = BerniniPipeline.from_pretrained(folders / "export", quantization_config=config)
    for expert in EXPERTS:
        model = getattr(pipe, expert)
        assert type(model) is BerniniTransformer3DModel
        assert isinstance(model.blocks[0].attn1.to_q.weight, Int8Tensor)
        assert isinstance(model.proj_out.weight, Int8Tensor)
    assert not isinstance(pipe.vae.decoder.conv_in.weight, Int8Tensor)  # only the experts
    assert not isinstance(pipe.text_encoder.shared.weight, Int8Tensor)
    assert pipe.quantization_config is config  # diffusers records it
    latent = _latent(pipe)
    assert latent.shape == (1, 16, 1, 2, 2) and torch.isfinite(latent).all()
    with pytest.raises(ValueError, match=r"quantization_config.*bernini export"):
        BerniniPipeline.from_pretrained(
            folders / "base",
            high_noise_ckpt=folders / "Bernini-R",
            low_noise_ckpt=folders / "Bernini-R",
            quantization_config=config,
        )


def test_dtype_per_component(folders):
    bf16, fp32 = torch.bfloat16, torch.float32
    pipe = BerniniPipeline.from_pretrained(folders / "export", dtype={"transformer": bf16, "transformer_2": bf16})
    assert pipe.transformer.dtype == pipe.transformer_2.dtype == bf16
    assert pipe.transformer.scale_shift_table.dtype == fp32  # diffusers keeps it in float32
    assert pipe.vae.dtype == fp32 and pipe.text_encoder.dtype == fp32  # diffusers' default for unnamed components
    # one dtype: the VAE stays in float32 by default ...
    pipe = BerniniPipeline.from_pretrained(folders / "export", dtype=bf16)
    assert (pipe.transformer.dtype, pipe.text_encoder.dtype, pipe.vae.dtype) == (bf16, bf16, fp32)
    # ... a dict is diffusers' own: its "default" covers the VAE too, and naming the VAE keeps it where asked
    pipe = BerniniPipeline.from_pretrained(folders / "export", dtype={"default": bf16})
    assert (pipe.transformer.dtype, pipe.text_encoder.dtype, pipe.vae.dtype) == (bf16, bf16, bf16)
    pipe = BerniniPipeline.from_pretrained(folders / "export", dtype={"default": bf16, "vae": fp32})
    assert (pipe.transformer.dtype, pipe.vae.dtype) == (bf16, fp32)
    # diffusers' deprecated name still works, with diffusers' warning
    with pytest.warns(FutureWarning, match="torch_dtype"):
        pipe = BerniniPipeline.from_pretrained(folders / "export", torch_dtype={"default": bf16, "vae": fp32})
    assert (pipe.transformer_2.dtype, pipe.vae.dtype) == (bf16, fp32)
    # the experts of original checkpoints follow the same dict
    pipe = BerniniPipeline.from_pretrained(
        folders / "base",
        high_noise_ckpt=folders / "Bernini-R",
        low_noise_ckpt=folders / "Bernini-R",
        dtype={"transformer_2": bf16},
    )
    assert (pipe.transformer.dtype, pipe.transformer_2.dtype) == (fp32, bf16)
    with pytest.raises(ValueError, match=r"`dtype`='bf16'.*torch\.dtype"):
        BerniniPipeline.from_pretrained(folders / "export", dtype="bf16")
    with pytest.raises(ValueError, match="`dtype` and `torch_dtype`"):
        BerniniPipeline.from_pretrained(folders / "export", dtype=bf16, torch_dtype=bf16)


def test_variant_and_diffusers_variant_error(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "transformer_2" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = BerniniPipeline.from_pretrained(tmp_path / "fp16", variant="fp16")
    assert torch.equal(loaded.transformer_2.proj_out.weight, pipe.transformer_2.proj_out.weight)
    with pytest.raises(ValueError, match="`variant=bf16`, but no such modeling files"):  # diffusers' own message
        BerniniPipeline.from_pretrained(tmp_path / "fp16", variant="bf16")


def test_device_map_and_low_cpu_mem_usage(folders):
    from diffusers import WanTransformer3DModel

    reference = BerniniPipeline.from_pretrained(folders / "export")
    pipe = BerniniPipeline.from_pretrained(folders / "export", device_map="cpu")
    assert pipe.hf_device_map == "cpu"  # diffusers' record of the placement
    assert all(p.device.type == "cpu" for p in pipe.transformer_2.parameters())
    balanced = BerniniPipeline.from_pretrained(folders / "export", device_map="balanced", low_cpu_mem_usage=True)
    assert balanced.hf_device_map is None  # no accelerator: diffusers places nothing
    for loaded in (pipe, balanced):
        for expert in EXPERTS:
            ours, theirs = getattr(loaded, expert).state_dict(), getattr(reference, expert).state_dict()
            assert all(torch.equal(ours[k], v) for k, v in theirs.items())
    # `low_cpu_mem_usage=False` reaches diffusers, which refuses it for every Wan transformer (they keep modules in
    # float32), exactly as for its own class
    message = "`low_cpu_mem_usage` cannot be False when `keep_in_fp32_modules` is True"
    with pytest.raises(ValueError, match=message):
        WanTransformer3DModel.from_pretrained(folders / "export" / "transformer", low_cpu_mem_usage=False)
    with pytest.raises(ValueError, match=message):
        BerniniPipeline.from_pretrained(folders / "export", low_cpu_mem_usage=False)
    with pytest.raises(ValueError, match="low_cpu_mem_usage"):  # diffusers' own check
        BerniniPipeline.from_pretrained(folders / "export", device_map="cpu", low_cpu_mem_usage=False)
    with pytest.raises(ValueError, match="balanced"):
        BerniniPipeline.from_pretrained(
            folders / "base", high_noise_ckpt=folders / "Bernini-R", low_noise_ckpt=folders / "Bernini-R",
            device_map="balanced",
        )  # fmt: skip


def test_per_component_logs_come_from_diffusers(folders, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("diffusers"), "propagate", True)  # diffusers' loggers stop at its root
    with caplog.at_level(logging.INFO, logger="diffusers"):
        BerniniPipeline.from_pretrained(folders / "base")
    records = [r for r in caplog.records if r.name == "diffusers.pipelines.pipeline_utils"]
    loaded = {r.getMessage().split(" from ")[0] for r in records}
    assert {
        "Loaded transformer as BerniniTransformer3DModel",
        "Loaded transformer_2 as BerniniTransformer3DModel",
        "Loaded vae as AutoencoderKLWan",
        "Loaded text_encoder as UMT5EncoderModel",
    } <= loaded


def test_index_reads_every_folder_as_bernini(folders):
    """`load_config` (what diffusers reads) turns Wan's and the export's expert entries into the Bernini class."""
    for folder in ("base", "export"):
        index = BerniniPipeline.load_config(folders / folder)
        assert index["_class_name"] == "BerniniPipeline"
        assert index["transformer"] == index["transformer_2"] == EXPERT_ENTRY
        assert index.get("expand_timesteps", False) is False  # Wan 2.2's setting, which the pipeline takes
    assert json.loads((folders / "export" / "model_index.json").read_text())["_class_name"][0] == "pipeline_bernini"


def test_checkpoints_and_config_folder_equal_the_diffusers_layout(folders):
    """The adapter's layouts build the same pipeline as the export of the same weights."""
    diffusers_layout = BerniniPipeline.from_pretrained(folders / "export")
    checkpoints = dict(high_noise_ckpt=folders / "Bernini-R", low_noise_ckpt=folders / "Bernini-R")
    on_base = BerniniPipeline.from_pretrained(folders / "base", **checkpoints)
    on_config = BerniniPipeline.from_pretrained(folders / "configs" / "bernini_renderer_wan22", **checkpoints)
    expected = _latent(diffusers_layout)
    for pipe in (on_base, on_config):
        assert type(pipe.transformer) is type(pipe.transformer_2) is BerniniTransformer3DModel
        assert pipe.config.boundary_ratio == 0.875
        for name in ("transformer", "transformer_2", "text_encoder", "vae"):
            ours, theirs = getattr(pipe, name).state_dict(), getattr(diffusers_layout, name).state_dict()
            assert ours.keys() == theirs.keys(), name
            assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours), name
        # The same weights, bit for bit; the computation may still differ in the last bits, since a memory-mapped
        # tensor and a copied one can sit at different alignments and take different vector kernels.
        torch.testing.assert_close(_latent(pipe), expected, rtol=0, atol=1e-5)
    assert on_config.config._name_or_path == str(folders / "configs" / "bernini_renderer_wan22")


def test_tiny_is_built_not_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder named "tiny" here
    with pytest.raises(FileNotFoundError, match=r"tiny\.tiny_pipeline\(\).*--model tiny"):
        BerniniPipeline.from_pretrained("tiny")


def test_a_saved_pipeline_without_the_high_noise_expert_loads(tmp_path):
    """diffusers' Wan 2.2 allows `transformer=None` with `boundary_ratio=1.0`; saving and loading keeps it so."""
    components = get_tiny_components()
    components.update(transformer=None, boundary_ratio=1.0)
    pipe = BerniniPipeline(**components)
    call = dict(task_type="t2v", num_frames=5, height=32, width=32, num_inference_steps=2, output_type="latent")
    expected = pipe("a cat", generator=torch.Generator("cpu").manual_seed(0), **call).frames
    pipe.save_pretrained(tmp_path)
    loaded = BerniniPipeline.from_pretrained(tmp_path)
    assert loaded.transformer is None and loaded.config.boundary_ratio == 1.0
    assert torch.equal(loaded("a cat", generator=torch.Generator("cpu").manual_seed(0), **call).frames, expected)
