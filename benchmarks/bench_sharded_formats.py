"""Host memory and time of one rank's sharded read of a single-file expert against the whole load of the same file.

Writes a medium expert (the 1.3B model's width: 12 heads x 128, ffn 8960; `--layers` blocks, 4 by default: 185M
parameters) as three single files: Wan keys in bf16, ComfyUI scaled float8 (e4m3fn, per-tensor `weight_scale`) and
GGUF Q8_0 (F32 small tensors). For each file, two fresh processes load it:

- whole: `formats.load_transformer(file, config, dtype=bf16)`, what `from_pretrained(high_noise_ckpt=file)` does
  (a GGUF expert stays quantized, as diffusers keeps it);
- rows: rank 0 of `--ranks` N, as `from_pretrained_sharded` reads it: `formats.plan_file`, then its `Shard(0)` rows of
  every tensor through `formats.FileRows` into tensors of the shard's size, in bf16 (a GGUF expert dequantized).

Each touches every page it holds (a whole bf16 load of a bf16 file keeps the memory-mapped tensors, read lazily) and
reports the parameter bytes it holds, the growth of its RSS over the load (the mapped pages included; freed
temporaries handed back with `malloc_trim`), the peak of its RSS over the load and the load time; the script prints
rows / whole ratios. No torchrun: one rank's read is the same in a process of its own.

Run: python benchmarks/bench_sharded_formats.py [--ranks 4] [--layers 4]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMATS = ("wan_bf16", "comfy_scaled_fp8", "gguf_q8_0")


def config(layers: int) -> dict:
    from bernini_diffusers.tiny import TINY_TRANSFORMER_CONFIG

    return dict(TINY_TRANSFORMER_CONFIG, num_attention_heads=12, ffn_dim=8960, num_layers=layers, text_dim=4096,
                freq_dim=256)  # fmt: skip


def write_files(folder: Path, layers: int) -> dict[str, Path]:
    """The medium expert (random, seeded) in each format of `FORMATS`."""
    import gguf
    import torch
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors.torch import save_file

    from bernini_diffusers import BerniniTransformer3DModel

    torch.manual_seed(0)
    state = {k: v.detach().contiguous() for k, v in BerniniTransformer3DModel(**config(layers)).state_dict().items()}
    # Wan's names: diffusers' converter, run on the key set (new key -> old key) and inverted.
    probe = {k: k for k in _wan_names(state)}
    to_wan = {new: old for new, old in convert_wan_transformer_to_diffusers(probe).items()}
    paths = {name: folder / f"{name}.{'gguf' if name.startswith('gguf') else 'safetensors'}" for name in FORMATS}
    save_file({to_wan[k]: v.to(torch.bfloat16) for k, v in state.items()}, str(paths["wan_bf16"]))
    scaled = {}
    for key, value in state.items():
        name = "model.diffusion_model." + to_wan[key]
        if key.startswith("blocks.") and value.ndim == 2:
            scale = value.abs().max().float() / torch.finfo(torch.float8_e4m3fn).max
            scaled[name] = (value / scale).to(torch.float8_e4m3fn)
            layer = name.removesuffix(".weight")
            scaled[f"{layer}.weight_scale"] = scale.reshape(())
            scaled[f"{layer}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        else:
            scaled[name] = value
    save_file(scaled, str(paths["comfy_scaled_fp8"]))
    writer = gguf.GGUFWriter(str(paths["gguf_q8_0"]), "wan")
    for key, value in state.items():
        array = value.float().numpy()
        if key.startswith("blocks.") and value.ndim == 2:
            writer.add_tensor(to_wan[key], gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
        else:
            writer.add_tensor(to_wan[key], array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return paths


def _wan_names(state) -> list[str]:
    """Wan's original names of diffusers' keys."""
    from bernini_diffusers.testing import wan_key

    return [wan_key(key) for key in state]


def _status(field: str) -> int:
    """A field of /proc/self/status in bytes: VmRSS (resident now) or VmHWM (the peak of this process's address
    space; unlike `ru_maxrss` it does not carry the parent's peak over `execve`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(mode: str, path: Path, layers: int, ranks: int) -> dict:
    """One load in this process: `whole` or rank 0's `rows`; its bytes, memory and time."""
    import torch

    from bernini_diffusers.formats import FileRows, detect_format, load_transformer, plan_file

    torch.set_num_threads(1)
    plan_file(detect_format(path), config(layers))  # headers only: the imports both loads need, out of the timing
    before = _status("VmRSS")
    start = time.perf_counter()
    if mode == "whole":
        model = load_transformer(path, config(layers), dtype=torch.bfloat16)
        held = [p.data.as_subclass(torch.Tensor) for p in model.parameters()]  # a GGUF weight as its plain bytes
    else:
        plan, _ = plan_file(detect_format(path), config(layers))
        # All shards first, then their rows, as `materialize_shards` does (`to_empty`, then the reads).
        held = {
            name: torch.empty((min(-(-t.shape[0] // ranks), t.shape[0]), *t.shape[1:]),
                              dtype=plan.load_dtype(name, torch.bfloat16))  # FSDP2's Shard(0): rank 0's rows
            for name, t in plan.tensors.items()
        }  # fmt: skip
        with FileRows(plan, torch.bfloat16) as read:
            for name, shard in held.items():
                shard.copy_(read(name, 0, shard.shape[0]))
        held = list(held.values())
    for tensor in held:  # touch every page (a mapped tensor is read lazily; moving it to a GPU reads all of it)
        tensor.reshape(-1)[::1024].float().sum()
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - before
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what the allocator keeps of freed temporaries is not held memory
    return {
        "held_bytes": sum(t.numel() * t.element_size() for t in held),
        "rss_bytes": _status("VmRSS") - before,  # the file's mapped pages included
        "peak_rss_bytes": peak,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4, help="the shard degree N (rank 0's rows are read)")
    parser.add_argument("--layers", type=int, default=4, help="blocks of the medium expert")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.layers, args.ranks)))
        return
    with tempfile.TemporaryDirectory() as folder:
        paths = write_files(Path(folder), args.layers)
        print(f"medium expert, {args.layers} blocks; rank 0 of {args.ranks} against the whole load (bf16)")
        print(f"{'format':<18} {'held MiB':>17} {'RSS MiB':>17} {'peak RSS MiB':>17} {'seconds':>17}")
        for name in FORMATS:
            runs = {}
            for mode in ("whole", "rows"):
                command = [sys.executable, __file__, "--child", mode, str(paths[name]), "--layers", str(args.layers),
                           "--ranks", str(args.ranks)]  # fmt: skip
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                runs[mode] = json.loads(out.strip().splitlines()[-1])
            whole, rows = runs["whole"], runs["rows"]
            cells = []
            for key, unit in (("held_bytes", 2**20), ("rss_bytes", 2**20), ("peak_rss_bytes", 2**20),
                              ("seconds", 1)):  # fmt: skip
                cells.append(f"{rows[key] / unit:.0f}/{whole[key] / unit:.0f} ({rows[key] / whole[key]:.2f})"
                             if unit > 1 else f"{rows[key]:.1f}/{whole[key]:.1f} ({rows[key] / whole[key]:.2f})")
            print(f"{name:<18} " + " ".join(f"{c:>17}" for c in cells))
        print("cells: rows / whole (ratio)")


if __name__ == "__main__":
    main()
