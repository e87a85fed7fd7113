"""Single-file checkpoint formats: bytes, output error and load time of each format `formats.py` reads.

Part 1 (no weights): one Wan2.2-A14B expert is built on the meta device and its file size is computed per format,
the way the community files store it: the 2-D weights of the 40 blocks (the Linear layers, 95 % of the parameters)
in the format, every other tensor (patch embedding, condition embedder, norms, modulation, output head) in bf16 (GGUF
files keep those in F32/F16; this bf16 estimate undercounts them by a few hundred MB). Exact byte counts of that
rule, not measurements.

Part 2 (runs): a small expert (`--size`: medium, the default, 8 heads x 128, ffn 4096, 2 layers: 42.9M parameters, 78 %
of them in the blocks' Linear weights; or tiny, 1.7M, where the embedders dominate) is written in every format from
the same float32 weights, then each file is loaded with
`BerniniTransformer3DModel.from_single_file` (median of `--repeats` loads) and run once; the table gives the stored
bytes against the bf16 file, the weights' bytes in memory after the load (float32 unless kept quantized), and the
rel-L2 of one forward against the float32 expert. K-quant GGUF rows are absent: the `gguf` package quantizes
F16/BF16/Q8_0/Q4_0/Q5_0 but has no K-quant quantizer (tests/test_formats.py checks K-quant dequantization instead).

Run: python benchmarks/bench_formats.py [--size medium|tiny] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import gguf
import torch
from _common import base_parser, print_header, print_table, setup, write_json
from safetensors.torch import save_file

from bernini_diffusers import BerniniTransformer3DModel
from bernini_diffusers.constants import WAN22_A14B_TRANSFORMER_CONFIG
from bernini_diffusers.formats import bits_per_weight, detect_format
from bernini_diffusers.hub_export.convert import expert_skeleton
from bernini_diffusers.memory import parameter_bytes
from bernini_diffusers.tiny import TINY_TRANSFORMER_CONFIG

MEDIUM = dict(TINY_TRANSFORMER_CONFIG, num_attention_heads=8, ffn_dim=4096, text_dim=512, freq_dim=256)
A14B_FORMATS = [
    ("bf16 / fp16 (Comfy-Org fp16, official shards)", "BF16"),
    ("fp32", "F32"),
    ("float8 e4m3fn, plain or scaled (+ 4 B per layer)", "F8_E4M3"),
    ("GGUF Q8_0", "Q8_0"),
    ("GGUF Q6_K", "Q6_K"),
    ("GGUF Q5_K (Q5_K_M mostly)", "Q5_K"),
    ("GGUF Q4_K (Q4_K_M mostly)", "Q4_K"),
    ("GGUF Q4_0", "Q4_0"),
    ("GGUF Q3_K", "Q3_K"),
]


def _block_linear(key: str, shape) -> bool:
    return key.startswith("blocks.") and key.endswith(".weight") and len(shape) == 2


def a14b_sizes() -> list[dict]:
    model = expert_skeleton(WAN22_A14B_TRANSFORMER_CONFIG)
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    total = sum(torch.Size(s).numel() for s in shapes.values())
    quantized = sum(torch.Size(s).numel() for k, s in shapes.items() if _block_linear(k, s))
    bf16 = total * 2
    rows = []
    for name, storage in A14B_FORMATS:
        layers = sum(1 for k, s in shapes.items() if _block_linear(k, s))
        scales = 4 * layers if storage.startswith("F8") else 0
        size = quantized * bits_per_weight(storage) / 8 + (total - quantized) * 2 + scales
        if storage == "F32":
            size = total * 4
        rows.append({
            "format": name, "bits/weight": f"{bits_per_weight(storage):g}", "GB per expert": f"{size / 1e9:.1f}",
            "GiB": f"{size / 2**30:.1f}", "vs bf16": f"{size / bf16:.3f}", "two experts GB": f"{2 * size / 1e9:.1f}",
        })  # fmt: skip
    print(f"one A14B expert: {total:,} parameters, {quantized / total:.1%} of them in the blocks' Linear weights")
    return rows


# ------------------------------------------------------------------------------------------------ part 2


def _linear(key: str, tensor: torch.Tensor) -> bool:
    return _block_linear(key, tensor.shape)


def _comfy_quant(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def write_formats(state: dict[str, torch.Tensor], folder: Path) -> dict[str, Path]:
    files = {}

    def save(name, tensors):
        files[name] = folder / name
        save_file(tensors, str(files[name]))

    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        save(f"{label}.safetensors", {f"model.diffusion_model.{k}": v.to(dtype) for k, v in state.items()})
    save("fp8_e4m3fn_plain.safetensors", {k: v.to(torch.float8_e4m3fn) if _linear(k, v) else v.to(torch.bfloat16)
                                          for k, v in state.items()})  # fmt: skip
    for fp8, label in ((torch.float8_e4m3fn, "e4m3fn"), (torch.float8_e5m2, "e5m2")):
        tensors = {}
        for key, value in state.items():
            if not _linear(key, value):
                tensors[key] = value.to(torch.bfloat16)
                continue
            scale = value.abs().max().float() / torch.finfo(fp8).max
            tensors[key] = (value / scale).to(fp8)
            tensors[key[: -len(".weight")] + ".weight_scale"] = scale.reshape(())
            tensors[key[: -len(".weight")] + ".comfy_quant"] = _comfy_quant(f"float8_{label}")
        save(f"fp8_{label}_scaled.safetensors", tensors)
    for quant in ("BF16", "Q8_0", "Q5_0", "Q4_0"):
        path = folder / f"{quant}.gguf"
        writer = gguf.GGUFWriter(str(path), "wan")
        kind = gguf.GGMLQuantizationType[quant]
        block = gguf.GGML_QUANT_SIZES[kind][0]
        for key, value in state.items():
            array = value.float().numpy()
            if _linear(key, value) and array.shape[1] % block == 0:
                writer.add_tensor(key, gguf.quants.quantize(array, kind), raw_dtype=kind)
            else:
                writer.add_tensor(key, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        files[path.name] = path
    return files


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], repeats=3, warmup=0)
    parser.add_argument("--size", choices=("tiny", "medium"), default="medium")
    args = parser.parse_args()
    device, dtype = setup(args)
    print_header("single-file formats", device, dtype)

    rows = a14b_sizes()
    print("\nPart 1: file size of one Wan2.2-A14B expert per format (exact, from the meta-device model)")
    print_table(list(rows[0]), [list(r.values()) for r in rows])

    config = dict(TINY_TRANSFORMER_CONFIG if args.size == "tiny" else MEDIUM)
    model = BerniniTransformer3DModel(**config).eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(args.seed)
    inputs = (torch.randn(1, 16, 2, 16, 16, generator=generator), torch.tensor([700]),
              torch.randn(1, 8, config["text_dim"], generator=generator))  # fmt: skip
    with torch.no_grad():
        reference = model(*inputs).sample.double()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        files = write_formats(state, Path(tmp))
        bf16_bytes = files["bf16.safetensors"].stat().st_size
        for name, path in files.items():
            fmt = detect_format(path)
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                loaded = BerniniTransformer3DModel.from_single_file(str(path), config=config)
                seconds.append(time.perf_counter() - start)
            with torch.no_grad():
                out = loaded(*inputs).sample.double()
            results.append({
                "file": name, "detected": f"{fmt.quantization} {fmt.main_storage}",
                "stored vs bf16": f"{path.stat().st_size / bf16_bytes:.3f}",
                "in memory vs fp32": f"{parameter_bytes(loaded) / parameter_bytes(model):.3f}",
                "rel-L2": f"{((out - reference).norm() / reference.norm()).item():.2e}",
                "load s": f"{statistics.median(seconds):.3f}",
                "load vs bf16": None,
            })  # fmt: skip
    base = next(float(r["load s"]) for r in results if r["file"] == "bf16.safetensors")
    for row in results:
        row["load vs bf16"] = f"{float(row['load s']) / base:.2f}"
    print(f"\nPart 2: {args.size} expert ({sum(t.numel() for t in state.values()):,} parameters), CPU, "
          f"median of {args.repeats} loads")  # fmt: skip
    print_table(list(results[0]), [list(r.values()) for r in results])
    write_json(args.json, {"a14b": rows, "runs": results}, device, dtype)


if __name__ == "__main__":
    main()
