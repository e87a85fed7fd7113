"""The `low_ram` memory profile: host RAM holds one large component at a time, each read from its file when it runs.

`BerniniPipeline.from_pretrained(..., memory_profile="low_ram")` loads through here (docs/memory.md, docs/design.md):

- the text encoder and the VAE load as usual; each expert is loaded once by diffusers' own `from_pretrained` (so its
  dtypes, `_keep_in_fp32_modules` and checks are diffusers'), then **released**: every parameter and buffer its files
  hold is replaced by an empty tensor of the same dtype on the same device, so the module keeps its config, dtype,
  device and hooks but no weights;
- an expert of a single-file checkpoint (`high_noise_ckpt`/`low_noise_ckpt`: fp16/bf16, fp8, scaled fp8, GGUF) is
  built by `loading.load_checkpoint_expert` (`formats`) and released the same way; loading it builds it again from
  its file and moves the new model's tensors into the module (`LowRamStore.add_rebuilt`);
- a forward pre-hook on each expert **loads** it before its first forward of a phase: the text encoder and the other
  expert are released first, then the expert's tensors are read back from its safetensors files (memory-mapped,
  straight to the compute device) and cast to the dtypes recorded at load: the same values diffusers' load gives;
- a pre-hook on the text encoder loads it back (releasing the experts) when the next call encodes, and one on the
  VAE's decoder releases the experts before decoding. The VAE (0.5 GB at full size) stays loaded: it also encodes
  the source media before the first expert runs.

So a call reads each expert once (high-noise steps, then low-noise steps), and host RAM peaks at the larger of the
text encoder and one expert, plus the VAE. Nothing in the denoising loop changes; the output equals the resident
run's bit for bit.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.hooks import apply_group_offloading
from safetensors import safe_open

from .loading import load_checkpoint_expert, select_weights
from .memory import EXPERT_BLOCKS_PER_GROUP, FP8_STORAGE_DTYPE
from .transformer_bernini import BerniniTransformer3DModel

logger = logging.getLogger(__name__)

LOW_RAM = "low_ram"


@dataclass
class _Stored:
    """One component whose weights live in files: where, and the dtype of every tensor the files fill."""

    name: str
    module: torch.nn.Module
    files: list[Path]
    # file key -> (the module's tensor names it fills (tied weights: several), dtype, shape)
    tensors: dict[str, tuple[list[str], torch.dtype, torch.Size]] = field(default_factory=dict)
    loaded: bool = True
    # An expert of a single-file checkpoint: builds it again from its file (its tensors replace the released ones)
    rebuild: Callable[[], torch.nn.Module] | None = None
    # Where its tensors are read to, if not the store's device (`low_ram+group_offload`: the host; the groups onload)
    device: torch.device | None = None


class LowRamStore:
    """The components a `low_ram` pipeline reads from their files, and which of them is in memory now."""

    def __init__(self, device: torch.device):
        self.device = device
        self.components: dict[str, _Stored] = {}
        self.loads = {}  # component name -> times read from its files (for tests and logs)
        self.via: dict[str, torch.dtype | None] = {}

    def add(
        self, name: str, module: torch.nn.Module, files: list[Path], release: bool, via: torch.dtype | None = None
    ) -> None:
        """Manage `module` (already loaded from `files`): record its tensors' dtypes, hook it, release it if asked.
        `via`: the dtype float8 tensors were cast from at load (a file's tensor goes through it first, so a read
        rounds as the load did)."""
        self.via[name] = via
        keys = set()
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                keys.update(f.keys())
        names: dict[int, list[str]] = {}
        owners: dict[int, torch.Tensor] = {}
        for tensor_name, tensor in [
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        ]:
            names.setdefault(id(tensor), []).append(tensor_name)
            owners[id(tensor)] = tensor
        stored = _Stored(name, module, list(files))
        for key_id, tensor_names in names.items():
            in_file = [n for n in tensor_names if n in keys]
            if in_file:  # non-persistent buffers (RoPE tables) are not in the files: they stay
                tensor = owners[key_id]
                stored.tensors[in_file[0]] = (tensor_names, tensor.dtype, tensor.shape)
        self.components[name] = stored
        self.loads[name] = 1
        if release:
            self.release(name)

    def add_rebuilt(self, name: str, module: torch.nn.Module, rebuild: Callable[[], torch.nn.Module]) -> None:
        """Manage `module`, an expert that `rebuild()` built from a single-file checkpoint (`formats`), and release it.
        Each load runs `rebuild()` again (memory-mapped safetensors, or diffusers' GGUF load of the file) and moves
        the new model's tensors into `module`: GGUF weights stay quantized, scaled float8 is dequantized as at load."""
        self.via[name] = None
        stored = _Stored(name, module, [], rebuild=rebuild)
        for tensor_name, tensor in module.state_dict(keep_vars=True).items():  # non-persistent buffers stay
            stored.tensors[tensor_name] = ([tensor_name], tensor.dtype, tensor.shape)
        self.components[name] = stored
        self.loads[name] = 1
        self.release(name)

    def _load_rebuilt(self, stored: _Stored) -> None:
        fresh = stored.rebuild().to(stored.device or self.device)
        for tensor_name, (_, _, shape) in stored.tensors.items():
            parameter = _is_parameter(fresh, tensor_name)
            value = fresh.get_parameter(tensor_name) if parameter else fresh.get_buffer(tensor_name)
            if value.shape != shape:
                raise ValueError(
                    f"low_ram: {stored.name}'s checkpoint holds {tensor_name} of shape {tuple(value.shape)}, but the "
                    f"model loaded from it had {tuple(shape)}; the file changed since the load."
                )
            owner_name, _, leaf = tensor_name.rpartition(".")
            owner = stored.module.get_submodule(owner_name) if owner_name else stored.module
            tensors = owner._parameters if leaf in owner._parameters else owner._buffers
            if type(value) in (torch.Tensor, torch.nn.Parameter):
                tensors[leaf].data = value.data  # the same objects: group offload's hooks hold them
            else:  # the object itself: a GGUF weight is a parameter subclass carrying its quant type
                tensors[leaf] = value

    def release(self, name: str) -> None:
        stored = self.components.get(name)
        if stored is None or not stored.loaded:
            return
        for tensor_names, dtype, _ in stored.tensors.values():
            tensor = stored.module.get_parameter(tensor_names[0]) if _is_parameter(stored.module, tensor_names[0]) \
                else stored.module.get_buffer(tensor_names[0])
            # An empty tensor of the same dtype and device: the module keeps what `.dtype` and `.device` read.
            tensor.data = torch.empty(0, dtype=dtype, device=tensor.device)
        stored.loaded = False
        logger.info("low_ram: released %s", name)

    def load(self, name: str) -> None:
        stored = self.components[name]
        if stored.loaded:
            return
        if stored.rebuild is not None:
            self._load_rebuilt(stored)
        wanted = stored.tensors
        read_to = stored.device or self.device
        for path in stored.files:
            device = str(read_to) if read_to.type != "cpu" else "cpu"
            with safe_open(str(path), framework="pt", device=device) as f:
                for key in f.keys():
                    if key not in wanted:
                        continue
                    tensor_names, dtype, shape = wanted[key]
                    value = f.get_tensor(key)
                    if self.via[name] is not None and dtype == FP8_STORAGE_DTYPE:
                        value = value.to(self.via[name])
                    value = value.to(dtype)
                    if value.shape != shape:
                        raise ValueError(
                            f"low_ram: {name}'s file {path.name} holds {key} of shape {tuple(value.shape)}, but the "
                            f"model loaded from it had {tuple(shape)}; the files changed since the load."
                        )
                    module = stored.module
                    target = module.get_parameter(tensor_names[0]) if _is_parameter(module, tensor_names[0]) \
                        else module.get_buffer(tensor_names[0])
                    target.data = value
        stored.loaded = True
        self.loads[name] += 1
        logger.info("low_ram: read %s from its files", name)

    def only(self, name: str) -> None:
        """Make `name` the one large component in memory: release the others (but the VAE), then load it."""
        for other in self.components:
            if other != name:
                self.release(other)
        self.load(name)

    def loaded(self) -> list[str]:
        return [name for name, stored in self.components.items() if stored.loaded]


def _is_parameter(module: torch.nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in (module.get_submodule(owner) if owner else module)._parameters


def weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The safetensors files of one component folder, as diffusers picks them (`loading.select_weights`)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    chosen, _ = select_weights(names, variant, str(folder))
    return [folder / n for n in chosen if n.endswith(".safetensors")]


def from_pretrained(load, prepared, device: torch.device, fp8: bool = False, group_offload: bool = False):
    """Load a pipeline under `low_ram` (see the module docstring). `load(**kwargs)` is diffusers' pipeline
    `from_pretrained` on `prepared.folder`; `prepared` is `loading.prepare_load`'s result. `fp8` (`fp8+low_ram`):
    each expert gets the `fp8` profile's layerwise casting before its dtypes are recorded, so every read casts the
    file's tensors to float8 where that profile stores them (the same rounding as the `fp8` profile).
    `group_offload` (`low_ram+group_offload`): each expert is read to the host and runs under diffusers' block-level
    group offload to `device` (one block on the device at a time), the VAE under leaf-level group offload."""
    kwargs = dict(prepared.kwargs)
    for argument in ("quantization_config", "device_map"):
        if kwargs.get(argument) is not None:
            raise ValueError(
                f"`memory_profile`='low_ram' reads the experts back from their files during the call, so it takes no "
                f"`{argument}`={kwargs[argument]!r}; load without it."
            )
    ready = [e for e in ("transformer", "transformer_2") if kwargs.get(e) is not None]
    if ready:
        raise ValueError(
            f"`memory_profile`='low_ram' reads each expert from its files, but {', '.join(ready)} was given "
            "ready-made; pass the folder or the checkpoint (`high_noise_ckpt`/`low_noise_ckpt`) instead."
        )
    if fp8 and prepared.checkpoints:
        raise ValueError(
            "`memory_profile`='fp8+low_ram' does not take `high_noise_ckpt`/`low_noise_ckpt` (a float8 or GGUF "
            "checkpoint already stores small weights): use 'low_ram', or export the checkpoints (`bernini export`)."
        )
    experts = [e for e in ("transformer", "transformer_2") if e not in kwargs]
    text_encoder_from_files = "text_encoder" not in kwargs
    dtypes = kwargs.get("torch_dtype", kwargs.get("dtype")) or {}
    variant = kwargs.get("variant")
    pipe = load(**{**kwargs, **{e: None for e in experts}})  # everything but the experts
    host = torch.device("cpu")
    pipe.to(device)
    store = LowRamStore(device)
    if text_encoder_from_files and pipe.text_encoder is not None:
        store.add("text_encoder", pipe.text_encoder, weight_files(prepared.folder / "text_encoder", variant), True)
    for name in experts:
        if name in prepared.checkpoints:  # a checkpoint: built by `formats`, rebuilt from its file for each phase
            spec, config, dtype = prepared.checkpoints[name]
            rebuild = functools.partial(load_checkpoint_expert, spec, name, config, dtype, prepared.hub)
            expert = rebuild().to(host if group_offload else device)
            expert.register_to_config(_name_or_path=str(spec))
            store.add_rebuilt(name, expert, rebuild)
            _offload_groups(store, name, expert, device, host, group_offload)
            pipe.register_modules(**{name: expert})
            continue
        folder = prepared.folder / name
        if not (folder / "config.json").is_file():
            continue
        dtype = dtypes.get(name, dtypes.get("default"))
        expert = BerniniTransformer3DModel.from_pretrained(
            prepared.folder, subfolder=name, torch_dtype=dtype, variant=variant, use_safetensors=True
        )
        via = expert.dtype if fp8 else None
        if fp8:  # cast on the CPU, then move: the device never holds the expert in its load dtype
            expert.enable_layerwise_casting(storage_dtype=FP8_STORAGE_DTYPE, compute_dtype=via)
        expert.to(host if group_offload else device)
        store.add(name, expert, weight_files(folder, variant), release=True, via=via)  # one expert in RAM at a time
        _offload_groups(store, name, expert, device, host, group_offload)
        pipe.register_modules(**{name: expert})
    if group_offload and pipe.vae is not None:
        apply_group_offloading(pipe.vae.to(host), onload_device=device, offload_device=host, offload_type="leaf_level")
    install(pipe, store, "low_ram+group_offload" if group_offload else "fp8+low_ram" if fp8 else LOW_RAM)
    return pipe


def _offload_groups(store: LowRamStore, name: str, expert, device: torch.device, host: torch.device, apply: bool):
    """`low_ram+group_offload`: read `name` to the host and run it under diffusers' block-level group offload. The
    hooks are applied once, to the released expert: a read refills the same tensor objects (the groups move whatever
    they hold), and the top-level hook must be in place before the expert's first forward starts (torch picks the
    forward before the low_ram pre-hook reads the weights). No prefetch stream: a stream's groups keep host copies of
    the tensors they were made with, which a read replaces."""
    if not apply:
        return
    store.components[name].device = host
    apply_group_offloading(
        expert, onload_device=device, offload_device=host, offload_type="block_level",
        num_blocks_per_group=EXPERT_BLOCKS_PER_GROUP, use_stream=False,
    )  # fmt: skip


def install(pipe, store: LowRamStore, profile: str = LOW_RAM) -> None:
    """Hook `pipe`'s components so that each large one is read when it runs and the others are released first."""
    for name in ("transformer", "transformer_2", "text_encoder"):
        if name in store.components:
            module = store.components[name].module
            module.register_forward_pre_hook(lambda _module, _args, name=name: store.only(name))

    def before_decode(_module, _args):
        for name in ("transformer", "transformer_2"):
            store.release(name)

    if pipe.vae is not None:
        pipe.vae.decoder.register_forward_pre_hook(before_decode)
    pipe._low_ram = store
    pipe._memory_profile = (profile, store.device)
