"""Single-file checkpoints (formats.py): every format written from the tiny expert's weights, loaded, and compared with
the unquantized expert; refusals; config recognition; the pipeline's `high_noise_ckpt=` and the CLI flags.

Measured rel-L2 of one forward against the float32 expert (`benchmarks/bench_formats.py --size tiny`): fp32
layouts 0 (the loaded weights equal the source bit for bit), fp16 2.6e-4, bf16 2.1e-3, plain e4m3fn 4.8e-3, scaled
e4m3fn 5.0e-3, scaled e5m2 9.8e-3, GGUF Q8_0 6.5e-4, Q4_0 1.2e-2; the asserted bounds below are looser.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from bernini_diffusers import BerniniTransformer3DModel
from bernini_diffusers.constants import WAN21_T2V_1_3B_TRANSFORMER_CONFIG, WAN22_A14B_TRANSFORMER_CONFIG
from bernini_diffusers.formats import (
    CheckpointFormat,
    TensorEntry,
    bits_per_weight,
    detect_format,
    infer_config,
    load_transformer,
    model_keys,
)
from bernini_diffusers.hub_export.convert import expected_tensors, expert_skeleton
from bernini_diffusers.memory import apply_memory_profile, parameter_bytes
from bernini_diffusers.testing import wan_key
from bernini_diffusers.tiny import TINY_TRANSFORMER_CONFIG, tiny_transformer

CONFIG = dict(TINY_TRANSFORMER_CONFIG)
Q = gguf.GGMLQuantizationType

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def tiny():
    model = tiny_transformer()
    generator = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(1, 16, 2, 8, 8, generator=generator),
        torch.tensor([700]),
        torch.randn(1, 6, CONFIG["text_dim"], generator=generator),
    )
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return model, inputs, state, _forward(model, inputs)


def _forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        x, t, e = inputs
        return model(x.to(model.dtype), t, e.to(model.dtype)).sample.float()


def _with_weights(state: dict[str, torch.Tensor]) -> BerniniTransformer3DModel:
    """The tiny expert holding `state` (float32), for references."""
    model = expert_skeleton(CONFIG)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def _linear_weight(key: str, tensor: torch.Tensor) -> bool:
    # What ComfyUI's float8 files quantize: the 2-D weights of the blocks' Linear layers.
    return key.startswith("blocks.") and key.endswith(".weight") and tensor.ndim == 2


# ------------------------------------------------------------------------------------------------ plain layouts


def test_wan_key_table_inverts_diffusers_conversion(tiny):
    _, _, state, _ = tiny
    converted = convert_wan_transformer_to_diffusers({wan_key(k): k for k in state})
    assert {k: v for k, v in converted.items()} == {k: k for k in state}


def test_diffusers_keys_under_comfyui_prefix(tiny, tmp_path):
    """ComfyUI's prefix over diffusers' own names is stripped, not run through Wan's renames (norm2/norm3 swap)."""
    path = tmp_path / "prefixed.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in tiny[2].items()}, str(path))
    fmt = detect_format(path)
    assert fmt.layout == "diffusers"
    assert model_keys(fmt) == {k: f"model.diffusion_model.{k}" for k in tiny[2]}


@pytest.mark.parametrize(
    "layout, dtype",
    [("diffusers", torch.float32), ("official", torch.bfloat16), ("wan", torch.float16), ("comfyui", torch.bfloat16)],
)
def test_float_layouts_load_exactly(tiny, tmp_path, caplog, layout, dtype):
    model, inputs, state, reference = tiny
    rename = {
        "diffusers": lambda k: k,
        "official": lambda k: f"ema.diff_dec.transformer.{k}",
        "wan": wan_key,
        "comfyui": lambda k: f"model.diffusion_model.{wan_key(k)}",
    }[layout]
    path = tmp_path / "expert.safetensors"
    save_file({rename(k): v.to(dtype) for k, v in state.items()}, str(path))
    fmt = detect_format(path)
    assert (fmt.layout, fmt.quantization, fmt.container) == (layout, "none", "safetensors")
    assert fmt.bytes_per_parameter == dtype.itemsize
    with caplog.at_level("INFO", logger="bernini_diffusers.formats"):
        loaded = BerniniTransformer3DModel.from_single_file(str(path), config=CONFIG)
    assert sum(fmt.name in r.getMessage() for r in caplog.records) == 1  # the format, named in one log line
    # Exact: the file's values, upcast to float32 (the default dtype), give the same output as the expert rounded alike.
    expected = _forward(_with_weights({k: v.to(dtype) for k, v in state.items()}), inputs)
    assert torch.equal(_forward(loaded, inputs), expected)
    assert _rel(_forward(loaded, inputs), reference) < {torch.float32: 1e-12, torch.float16: 1e-3}.get(dtype, 1e-2)
    assert parameter_bytes(loaded) == parameter_bytes(model)  # float32 in memory
    if layout != "comfyui":
        return
    # `dtype` loads in that dtype, the float32 modules kept as diffusers' from_pretrained keeps them
    half = BerniniTransformer3DModel.from_single_file(str(path), config=CONFIG, dtype=torch.bfloat16)
    assert half.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert half.scale_shift_table.dtype == torch.float32


def test_official_file_with_both_experts_needs_a_choice(tiny, tmp_path):
    _, inputs, state, reference = tiny
    low = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path / "merged.safetensors"
    tensors = {f"ema.diff_dec.transformer.{k}": v for k, v in state.items()}
    tensors.update({f"ema.diff_dec.transformer_2.{k}": v for k, v in low.items()})
    tensors.update({f"diff_dec.transformer.{k}": v + 5 for k, v in state.items()})  # raw twins: never used
    save_file(tensors, str(path))
    assert detect_format(path).experts == ("transformer", "transformer_2")
    with pytest.raises(ValueError, match="holds both experts"):
        BerniniTransformer3DModel.from_single_file(str(path), config=CONFIG)
    high = BerniniTransformer3DModel.from_single_file(str(path), config=CONFIG, subfolder="transformer")
    assert torch.equal(_forward(high, inputs), reference)
    second = BerniniTransformer3DModel.from_single_file(str(path), config=CONFIG, subfolder="transformer_2")
    assert torch.equal(_forward(second, inputs), _forward(_with_weights(low), inputs))


def test_official_shard_folder_and_index(tiny, tmp_path):
    from bernini_diffusers.testing import save_original_checkpoint

    model, inputs, _, reference = tiny
    folder = save_original_checkpoint(tmp_path / "high", model, "transformer", num_shards=2)
    assert detect_format(folder).files == detect_format(next(Path(folder).glob("*.index.json"))).files
    for path in (folder,):
        assert detect_format(path).layout == "official"
        loaded = load_transformer(path, CONFIG)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
        assert _rel(_forward(loaded, inputs), reference) < 1e-6


# ------------------------------------------------------------------------------------------------ float8


def _scaled(state, fp8=torch.float8_e4m3fn, legacy=False, per_channel=False, prefix=""):
    """A scaled-float8 file's tensors, written with the documented formula: scale = amax / fp8 max, stored =
    fp8(weight / scale), weight = float(stored) * scale; ComfyUI's current format or the older one."""
    tensors, dequantized = {}, {}
    for key, value in state.items():
        name = prefix + wan_key(key)
        if not _linear_weight(key, value):
            tensors[name] = dequantized[key] = value
            continue
        amax = value.abs().amax(dim=1, keepdim=True) if per_channel else value.abs().max()
        scale = (amax.float() / torch.finfo(fp8).max).to(torch.float32)
        stored = (value.float() / scale).to(fp8)
        layer = name[: -len(".weight")]
        tensors[name] = stored
        dequantized[key] = stored.float() * scale
        if legacy:
            tensors[f"{layer}.scale_weight"] = scale.reshape(-1)  # (1,), or (out,) per channel
            tensors[f"{layer}.scale_input"] = torch.ones(1)
        else:
            tensors[f"{layer}.weight_scale"] = scale.reshape(scale.shape[0], 1) if per_channel else scale.reshape(())
            marker = json.dumps({"format": str(fp8).split(".")[1]}).encode()
            tensors[f"{layer}.comfy_quant"] = torch.tensor(list(marker), dtype=torch.uint8)
    if legacy:
        tensors[prefix + "scaled_fp8"] = torch.empty(2, dtype=fp8)  # 2 elements: a diffusion model's marker
    return tensors, dequantized


@pytest.mark.parametrize(
    "kind, fp8, tolerance",
    [
        ("comfy", torch.float8_e4m3fn, 2e-2),
        pytest.param("comfy", torch.float8_e5m2, 4e-2, marks=pytest.mark.slow),
        pytest.param("comfy_per_channel", torch.float8_e4m3fn, 2e-2, marks=pytest.mark.slow),
        ("legacy", torch.float8_e4m3fn, 2e-2),
    ],
)
def test_scaled_float8_applies_scales_exactly(tiny, tmp_path, kind, fp8, tolerance):
    model, inputs, state, reference = tiny
    tensors, dequantized = _scaled(state, fp8, legacy=kind == "legacy", per_channel=kind.endswith("channel"),
                                   prefix="model.diffusion_model.")  # fmt: skip
    path = tmp_path / "scaled.safetensors"
    save_file(tensors, str(path))
    fmt = detect_format(path)
    assert fmt.quantization == ("scaled_float8_legacy" if kind == "legacy" else "scaled_float8")
    assert fmt.layout == "comfyui" and fmt.bytes_per_parameter < 2.1  # float8 blocks, the rest (40 %) in float32
    loaded = BerniniTransformer3DModel.from_single_file(str(path), config=CONFIG)
    # float(weight) x scale is exactly what the layers compute with
    assert torch.equal(loaded.blocks[0].attn1.to_q.weight, dequantized["blocks.0.attn1.to_q.weight"])
    out = _forward(loaded, inputs)
    assert torch.equal(out, _forward(_with_weights(dequantized), inputs))
    assert _rel(out, reference) < tolerance
    if kind != "comfy" or fp8 != torch.float8_e4m3fn:
        return
    # A loader that ignored the scales (float8 values upcast as they are) is far off: this is what must not happen.
    ignored = load_transformer(path, CONFIG, _ignore_scales=True)
    assert _rel(_forward(ignored, inputs), reference) > 0.5


def test_diffusers_own_single_file_loader_drops_the_scales(tiny, tmp_path):
    """The trap: diffusers' `from_single_file` reads a scaled file without error and without its scales."""
    model, inputs, state, reference = tiny
    path = tmp_path / "scaled.safetensors"
    save_file(_scaled(state)[0], str(path))
    config = tmp_path / "config"
    model.save_config(config)
    wrong = super(BerniniTransformer3DModel, BerniniTransformer3DModel).from_single_file(str(path), config=str(config))
    assert _rel(_forward(wrong, inputs), reference) > 0.5
    assert _rel(_forward(BerniniTransformer3DModel.from_single_file(str(path), config=str(config)), inputs),
                reference) < 2e-2  # fmt: skip


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_plain_float8(tiny, tmp_path, fp8):
    model, inputs, state, reference = tiny
    rounded = {k: v.to(fp8) if _linear_weight(k, v) else v for k, v in state.items()}
    path = tmp_path / "fp8.safetensors"
    save_file({wan_key(k): v for k, v in rounded.items()}, str(path))
    fmt = detect_format(path)
    assert (fmt.quantization, fmt.layout) == ("float8", "wan")
    assert fmt.main_storage == {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}[fp8]
    loaded = load_transformer(path, CONFIG, dtype=torch.bfloat16)
    expected = {k: v.float().to(torch.bfloat16).float() if _linear_weight(k, v) else v for k, v in rounded.items()}
    assert torch.equal(loaded.blocks[1].ffn.net[2].weight.float(), expected["blocks.1.ffn.net.2.weight"])
    out = _forward(load_transformer(path, CONFIG), inputs)
    assert torch.equal(out, _forward(_with_weights(rounded), inputs))  # fp8 -> float32 is exact
    assert _rel(out, reference) < (5e-2 if fp8 == torch.float8_e4m3fn else 1e-1)
    if fp8 == torch.float8_e4m3fn:
        # The `fp8` memory profile's storage (diffusers' layerwise casting, e4m3fn) holds exactly the file's values.
        loaded.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        assert loaded.blocks[1].ffn.net[2].weight.dtype == torch.float8_e4m3fn
        assert torch.equal(loaded.blocks[1].ffn.net[2].weight.view(torch.uint8),
                           rounded["blocks.1.ffn.net.2.weight"].view(torch.uint8))  # fmt: skip


# ------------------------------------------------------------------------------------------------ GGUF


def _write_gguf(path: Path, state, quant, k_blocks: bool = False, flatten: bool = False):
    """A GGUF file of `state` (Wan keys), its 2-D block weights in `quant`. The `gguf` package quantizes F16, BF16,
    Q8_0 and Q4_0 itself; it has no K-quant quantizer, so K-quant files get valid random blocks (small scales) and
    the reference is the package's own dequantization of the same bytes. With `flatten`, tensors of more than 4 dims
    are stored as city96's converter stores them: 2-D, their shape in `comfy.gguf.orig_shape.<name>`. Returns the
    float weights it encodes."""
    writer = gguf.GGUFWriter(str(path), "wan")
    encoded = {}
    rng = np.random.default_rng(0)
    block_size, type_size = gguf.GGML_QUANT_SIZES[quant]
    for key, value in state.items():
        array = value.float().numpy()
        if _linear_weight(key, value) and array.shape[1] % block_size == 0:
            if k_blocks:
                rows = array.shape[0] * array.shape[1] // block_size
                raw = rng.integers(0, 256, size=(rows, type_size), dtype=np.uint8)
                small = np.frombuffer(np.float16(2e-3).tobytes(), dtype=np.uint8)
                # the fp16 super-block scales: d (and dmin) first for Q4_K/Q5_K, d last for Q6_K
                for offset in ((type_size - 2,) if quant == Q.Q6_K else (0, 2)):
                    raw[:, offset : offset + 2] = small
                data = raw.reshape(array.shape[0], -1)
            else:
                data = gguf.quants.quantize(array, quant)
            writer.add_tensor(wan_key(key), data, raw_dtype=quant)
            encoded[key] = torch.from_numpy(gguf.quants.dequantize(data, quant).copy()).reshape(value.shape)
        elif flatten and array.ndim > 4:
            writer.add_tensor(wan_key(key), array.reshape(array.shape[0], -1))
            writer.add_array(f"comfy.gguf.orig_shape.{wan_key(key)}", list(array.shape))
            encoded[key] = value
        else:
            writer.add_tensor(wan_key(key), array)
            encoded[key] = value
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return encoded


@pytest.mark.parametrize(
    "quant, tolerance",
    [(Q.F16, 1e-3), (Q.BF16, 1e-2), (Q.Q8_0, 2e-2), (Q.Q4_0, 1.5e-1), (Q.Q4_K, None),
     pytest.param(Q.Q5_K, None, marks=pytest.mark.slow), (Q.Q6_K, None)],
)
def test_gguf_stays_quantized(tiny, tmp_path, quant, tolerance):
    model, inputs, state, reference = tiny
    path = tmp_path / "expert.gguf"
    encoded = _write_gguf(path, state, quant, k_blocks=tolerance is None)
    fmt = detect_format(path)
    assert (fmt.container, fmt.layout, fmt.quantization) == ("gguf", "wan", "gguf")
    loaded = BerniniTransformer3DModel.from_single_file(str(path), config=CONFIG)
    # bytes in memory: the block weights at the file's bits per weight (F16 is no quantization for diffusers: it
    # loads in the dtype); the time embedder, which diffusers keeps in float32, is dequantized at load (~2 %)
    assert parameter_bytes(loaded) == pytest.approx(fmt.loaded_bytes(torch.float32), rel=0.03)
    if quant != Q.F16:
        weight = loaded.blocks[0].attn1.to_q.weight
        assert weight.dtype == torch.uint8 and weight.quant_type == quant  # kept quantized in memory
        assert parameter_bytes(loaded) < parameter_bytes(model) * (0.55 if quant != Q.BF16 else 0.8)
    out = _forward(loaded, inputs)
    # per-layer dequantization at compute matches the `gguf` package's reference dequantization of the same bytes
    # (diffusers multiplies the block scales in float16, hence not to the last bit)
    assert _rel(out, _forward(_with_weights(encoded), inputs)) < 2e-3
    if tolerance is not None:
        assert _rel(out, reference) < tolerance


def test_bits_per_weight():
    assert (bits_per_weight("BF16"), bits_per_weight("F8_E4M3"), bits_per_weight("Q8_0")) == (16, 8, 8.5)
    assert (bits_per_weight("Q4_K"), bits_per_weight("Q6_K"), bits_per_weight("Q4_0")) == (4.5, 6.5625, 4.5)


# ------------------------------------------------------------------------------------------------ refusals


def _comfy_file(tmp_path, state, fmt_name: str, extra=None):
    tensors, _ = _scaled(state)
    for key in [k for k in tensors if k.endswith(".comfy_quant")]:
        tensors[key] = torch.tensor(list(json.dumps({"format": fmt_name}).encode()), dtype=torch.uint8)
    tensors.update(extra or {})
    path = tmp_path / f"{fmt_name}.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("fmt_name", ["nvfp4", "mxfp8", "int8_tensorwise", "float8_e4m3fnuz"])
def test_unsupported_comfy_quant_formats_are_refused(tiny, tmp_path, fmt_name):
    path = _comfy_file(tmp_path, tiny[2], fmt_name)
    with pytest.raises(ValueError, match=rf"comfy_quant format '{fmt_name}' \(layer 'blocks\.0\.") as err:
        BerniniTransformer3DModel.from_single_file(str(path), config=CONFIG)
    assert "refused rather than read as plain weights" in str(err.value)


def test_other_quantizations_are_refused(tiny, tmp_path):
    state = tiny[2]
    cases = {
        # optimum-quanto: int8 data and scales beside the weight
        "quanto": ({"blocks.0.attn1.to_q.weight._data": torch.zeros(4, 4, dtype=torch.int8),
                    "blocks.0.attn1.to_q.input_scale": torch.ones(())}, "optimum-quanto"),
        "nvfp4": ({"blocks.0.attn1.to_q.weight_scale_2": torch.ones(())}, "nvfp4"),
        "int8": ({"blocks.0.attn1.to_q.weight": torch.zeros(256, 256, dtype=torch.int8)}, "I8 tensors"),
        "mxfp8": ({"blocks.0.attn1.to_q.weight": torch.zeros(256, 256, dtype=torch.float8_e4m3fn),
                   "blocks.0.attn1.to_q.weight_scale": torch.zeros(256, 8, dtype=torch.uint8)}, "U8 weight scale"),
    }  # fmt: skip
    for name, (extra, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({**state, **extra}, str(path))
        with pytest.raises(ValueError, match=rf"{message}.*layer 'blocks\.0\.attn1\.to_q"):
            detect_format(path)


def test_pickles_are_refused_unopened(tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for name in ("expert.pt", "expert.bin", "expert.ckpt", "expert.safetensors"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(Payload()))
        with pytest.raises(ValueError, match="pickle|neither a safetensors nor a GGUF"):
            BerniniTransformer3DModel.from_single_file(str(path), config=CONFIG)
    torch.save({"a": torch.zeros(1)}, tmp_path / "zipped.safetensors")
    with pytest.raises(ValueError, match="pickle checkpoint"):
        detect_format(tmp_path / "zipped.safetensors")
    assert not marker.exists()


def test_missing_and_unexpected_keys_are_named(tiny, tmp_path):
    state = dict(tiny[2])
    del state["blocks.1.attn2.to_k.bias"]
    state["blocks.0.extra.weight"] = torch.zeros(2)
    path = tmp_path / "keys.safetensors"
    save_file({wan_key(k): v for k, v in state.items()}, str(path))
    with pytest.raises(ValueError, match=r"1 missing key\(s\): blocks\.1\.attn2\.to_k\.bias.*1 unexpected key\(s\): "
                                         r"blocks\.0\.extra\.weight"):  # fmt: skip
        load_transformer(path, CONFIG)
    other = dict(CONFIG, ffn_dim=32)
    save_file(tiny[2], str(path))
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.net\.0\.proj\.weight: shape \[64, 256\], the config "):
        load_transformer(path, other)


# ------------------------------------------------------------------------------------------------ configs


def _fake_format(config, layout="comfyui") -> CheckpointFormat:
    """A format whose entries have the shapes of `config`'s expert (meta tensors: no weights, no file)."""
    expected = expected_tensors(expert_skeleton(config))
    name = {"comfyui": lambda k: "model.diffusion_model." + wan_key(k), "official": lambda k: "ema.diff_dec."
            "transformer_2." + k}[layout]  # fmt: skip
    weights = {name(k): TensorEntry(Path("x"), name(k), "F8_E4M3", shape, 0) for k, (shape, _) in expected.items()}
    return CheckpointFormat("fake", (Path("x"),), "safetensors", layout, "float8", weights,
                            experts=("transformer_2",) if layout == "official" else ())  # fmt: skip


def test_configs_recognised_from_shapes():
    a14b = _fake_format(WAN22_A14B_TRANSFORMER_CONFIG)
    assert infer_config(a14b) == WAN22_A14B_TRANSFORMER_CONFIG
    assert a14b.parameters == pytest.approx(14.29e9, rel=1e-3)  # one A14B expert
    assert infer_config(_fake_format(WAN21_T2V_1_3B_TRANSFORMER_CONFIG, "official"), "transformer_2") == (
        WAN21_T2V_1_3B_TRANSFORMER_CONFIG
    )
    with pytest.raises(ValueError, match=r"dim 256, 2 layers, ffn 64.*pass `config`"):
        infer_config(_fake_format(CONFIG))


def test_tiny_file_without_config_is_an_error(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(tiny[2], str(path))
    with pytest.raises(ValueError, match="match no known config"):
        BerniniTransformer3DModel.from_single_file(str(path))
    with pytest.raises(ValueError, match=r"unsupported arguments: \['original_config'\]"):
        BerniniTransformer3DModel.from_single_file(str(path), original_config="x.yaml")


# ------------------------------------------------------------------------------------------------ pipeline and CLI


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from bernini_diffusers.testing import save_tiny_pretrained

    root = tmp_path_factory.mktemp("formats_base")
    return save_tiny_pretrained(root / "wan_base", layout="wan"), save_tiny_pretrained(
        root / "base_1p3b", layout="wan", two_experts=False
    )


def test_pipeline_takes_single_file_checkpoints(tiny, tmp_path, base):
    from bernini_diffusers import BerniniPipeline

    two, one = base
    model, inputs, state, reference = tiny
    scaled = tmp_path / "high_fp8_scaled.safetensors"
    save_file(_scaled(state, prefix="model.diffusion_model.")[0], str(scaled))
    low = tmp_path / "low.gguf"
    encoded = _write_gguf(low, state, Q.Q8_0)
    pipe = BerniniPipeline.from_pretrained(two, high_noise_ckpt=scaled, low_noise_ckpt=low)
    assert _rel(_forward(pipe.transformer, inputs), reference) < 2e-2
    assert pipe.transformer_2.blocks[0].attn1.to_q.weight.quant_type == Q.Q8_0
    assert _rel(_forward(pipe.transformer_2, inputs), _forward(_with_weights(encoded), inputs)) < 2e-3
    # a one-expert base (the 1.3B) takes `high_noise_ckpt` alone; a two-expert one refuses it
    single = BerniniPipeline.from_pretrained(one, high_noise_ckpt=scaled)
    assert single.transformer_2 is None and _rel(_forward(single.transformer, inputs), reference) < 2e-2
    with pytest.raises(ValueError, match="must be given together"):
        BerniniPipeline.from_pretrained(two, high_noise_ckpt=scaled)
    with pytest.raises(ValueError, match="has one expert"):
        BerniniPipeline.from_pretrained(one, high_noise_ckpt=scaled, low_noise_ckpt=low)


def test_cli_flags_take_single_files(tiny, tmp_path, base):
    from bernini_diffusers import cli

    two, _ = base
    path = tmp_path / "expert_bf16.safetensors"
    save_file({f"model.diffusion_model.{wan_key(k)}": v.to(torch.bfloat16) for k, v in tiny[2].items()}, str(path))
    out = tmp_path / "out.png"
    common = ["--task_type", "t2i", "--prompt", "a cat", "--height", "32", "--width", "48", "--num_inference_steps",
              "2", "--seed", "1", "--output", str(out)]  # fmt: skip
    assert cli.main(["generate", "--model", str(two), "--high_noise_ckpt", str(path), "--low_noise_ckpt", str(path),
                     *common]) == 0  # fmt: skip
    assert out.is_file()


def test_hub_files_are_fetched_with_huggingface_hub(tiny, tmp_path, monkeypatch):
    from bernini_diffusers import formats

    path = tmp_path / "expert.safetensors"
    save_file(tiny[2], str(path))
    calls = []

    def download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename, revision, kwargs.get("local_files_only")))
        return str(path)

    monkeypatch.setattr(formats.huggingface_hub, "hf_hub_download", download)
    loaded = BerniniTransformer3DModel.from_single_file("owner/repo@v1/split_files/expert.safetensors", config=CONFIG,
                                                        local_files_only=True)  # fmt: skip
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in tiny[2].items())
    formats.fetch_single_file("https://huggingface.co/owner/repo/blob/main/a/b.gguf", {}, "x")
    assert calls == [("owner/repo", "split_files/expert.safetensors", "v1", True), ("owner/repo", "a/b.gguf", "main", None)]
    with pytest.raises(ValueError, match="pickle"):  # refused before any download
        formats.fetch_single_file("owner/repo/model.ckpt", {}, "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        formats.fetch_single_file("./missing.safetensors", {}, "x")
    assert len(calls) == 2


@pytest.mark.parametrize(
    "legacy, fp8", [(False, torch.float8_e4m3fn), pytest.param(True, torch.float8_e5m2, marks=pytest.mark.slow)]
)
def test_keep_float8_is_bit_identical_at_half_the_bytes(tiny, tmp_path, legacy, fp8):
    """`keep_float8`: the float8 weights stay float8 in memory, each layer computes with float(w) x scale in `dtype`
    (a diffusers hook), and the output equals the default (dequantize at load) bit for bit."""
    model, inputs, state, _ = tiny
    path = tmp_path / "scaled.safetensors"
    save_file(_scaled(state, fp8, legacy=legacy)[0], str(path))
    plain = load_transformer(path, CONFIG, dtype=torch.bfloat16)
    kept = BerniniTransformer3DModel.from_single_file(str(path), config=CONFIG, dtype=torch.bfloat16, keep_float8=True)
    assert kept.blocks[0].attn1.to_q.weight.dtype == fp8
    linear = sum(v.numel() for k, v in state.items() if _linear_weight(k, v))
    assert parameter_bytes(plain) - parameter_bytes(kept) == linear  # 2 bytes -> 1 byte per Linear weight
    assert torch.equal(_forward(kept, inputs), _forward(plain, inputs))
    assert kept.blocks[0].attn1.to_q.weight.dtype == fp8  # restored after the forward
    pipe = SimpleNamespace(transformer=kept, transformer_2=None, components={"transformer": kept})
    with pytest.raises(ValueError, match="already store float8"):
        apply_memory_profile(pipe, "fp8", "cpu")
