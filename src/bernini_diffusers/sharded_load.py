"""Loading with sharded weights: every process of a data group reads only its FSDP2 shards of each expert.

`BerniniPipeline.from_pretrained_sharded` builds the experts on the meta device (no weight memory), shards them with
`parallel.shard_model` across the data group, allocates this process's shards and fills them with the rows of each
tensor that FSDP2 gives it (`Shard(0)`: rank r of N holds rows `[r * ceil(R / N), (r + 1) * ceil(R / N))`), read from
the memory-mapped files. The largest thing a process holds while loading is its own shards, so host memory per
process is about 1 / N of an expert, not a whole expert per process.

Every source the unsharded load reads is served, each described by a plan checked (key set, shapes) before any
weight is read, and read by a row reader (`open_rows`: a model tensor's rows in the dtype the unsharded load gives):

- the diffusers layout (`transformer/`, `transformer_2/`, bare keys) and original checkpoint folders or indexes
  (`high_noise_ckpt`, `low_noise_ckpt`: EMA copies preferred), by a conversion plan
  (`hub_export.convert.plan_conversion`), rows read with safetensors' `get_slice`;
- a checkpoint that is one file, in any format `formats` reads (official, Wan, ComfyUI or diffusers keys; plain
  float, plain or scaled float8, GGUF), by a `formats.FilePlan`, rows read by `formats.FileRows` (scaled float8
  dequantized with its scales' rows, GGUF block types dequantized by diffusers). A GGUF expert is held dequantized,
  in the load dtype: FSDP2 shards plain tensors, not GGUF's packed blocks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from .formats import FilePlan, FileRows
from .hub_export.convert import (
    EXPERTS,
    WEIGHTS_INDEX_NAME,
    ConversionPlan,
    _open_error,
    expected_tensors,
    expert_skeleton,
    index_shards,
    load_dtype,
    plan_conversion,
    read_checkpoint,
)
from .loading import CHECKPOINT_ARGUMENTS, plan_checkpoint_expert, resolve_layout
from .transformer_bernini import BerniniTransformer3DModel


def _folder_plan(folder: Path, expert: str) -> tuple[ConversionPlan, torch.nn.Module]:
    """The plan of an expert folder of the diffusers layout (`config.json` and safetensors, bare keys)."""
    config = BerniniTransformer3DModel.load_config(folder)
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        files, weight_map = index_shards(index)
    else:
        files, weight_map = sorted(folder.glob("*.safetensors")), None
    if not files:
        raise FileNotFoundError(f"`{expert}`: no safetensors weights in '{folder}'.")
    model = expert_skeleton(config)
    plan = plan_conversion(
        read_checkpoint(files, weight_map),
        expert,
        expected_tensors(model),
        checkpoint=str(folder),
        keep_in_fp32=model._keep_in_fp32_modules or (),
    )
    return plan, model


def plan_experts(
    pretrained_model_name_or_path: str | os.PathLike, checkpoints: Mapping[str, Any] | None = None
) -> dict[str, tuple[ConversionPlan | FilePlan, torch.nn.Module]]:
    """Each expert's plan and its skeleton (parameters on the meta device), from a local diffusers folder or, with
    `checkpoints` (`{"transformer": high_noise_ckpt, "transformer_2": low_noise_ckpt}`), checkpoints in any form
    `from_pretrained` takes: official shards (a conversion plan) or one file of any format (a `formats.FilePlan`)."""
    layout = resolve_layout(pretrained_model_name_or_path, {})
    plans = {}
    for expert in EXPERTS:
        files = layout.components.get(expert)
        if files is None:
            continue
        spec = (checkpoints or {}).get(expert)
        if spec is not None:
            config = BerniniTransformer3DModel.load_config(files.root / expert)
            plans[expert] = plan_checkpoint_expert(spec, expert, config)
        else:
            plans[expert] = _folder_plan(files.root / expert, expert)
    if not plans:
        name = str(pretrained_model_name_or_path)
        raise ValueError(f"`pretrained_model_name_or_path`={name!r} has no expert folder (`transformer/`).")
    return plans


def check_float8_storage(plans: Mapping[str, tuple[ConversionPlan | FilePlan, torch.nn.Module]], profile: str) -> None:
    """Refuse an `fp8` memory profile for a GGUF expert, as `memory.apply_memory_profile` refuses it for the whole
    (quantized) load: stored in float8, its dequantized shards would be quantized a second time."""
    for expert, (plan, _) in plans.items():
        if isinstance(plan, FilePlan) and plan.fmt.container == "gguf":
            raise ValueError(
                f"`memory_profile`={profile!r}: `{expert}` is a GGUF file ({plan.fmt.path!r}), already quantized; fp8 "
                "storage applies to unquantized experts. Use a profile without fp8 (`expert_offload` or none)."
            )


def cast_skeleton(
    plan: ConversionPlan | FilePlan, model: torch.nn.Module, torch_dtype: torch.dtype | None
) -> torch.nn.Module:
    """Give the skeleton's (meta) parameters the dtypes `from_pretrained(dtype=...)` would give the loaded ones."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, param in model.named_parameters():
        param.data = param.data.to(load_dtype(name, plan.tensors[name].torch_dtype, torch_dtype, keep))
    return model.eval()


RowReader = Callable[[str, int | None, int | None], torch.Tensor]


@contextmanager
def open_rows(plan: ConversionPlan | FilePlan, torch_dtype: torch.dtype | None) -> Iterator[RowReader]:
    """A reader of rows of the plan's tensors: `read(name, start, stop)` returns rows `[start, stop)` of model tensor
    `name` (all of it with `None, None`) in the dtype `from_pretrained(dtype=torch_dtype)` gives it, copying only
    those rows out of the memory-mapped files. The files stay open inside the `with` block."""
    if isinstance(plan, FilePlan):
        with FileRows(plan, torch_dtype) as rows:
            yield rows
        return
    with ExitStack() as stack:
        handles = {}

        def read(name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
            info = plan.tensors[name]
            try:
                if info.file not in handles:
                    handles[info.file] = stack.enter_context(safe_open(str(info.file), framework="pt"))
                handle = handles[info.file]
                whole = start is None and stop is None
                rows = handle.get_tensor(info.key) if whole else handle.get_slice(info.key)[start:stop]
            except SafetensorError as err:
                raise _open_error(info.file, err) from None
            return rows.to(load_dtype(name, info.torch_dtype, torch_dtype, plan.keep_in_fp32))

        yield read


def materialize_shards(
    plan: ConversionPlan | FilePlan,
    model: torch.nn.Module,
    group,
    device: torch.device,
    compute_dtype: torch.dtype | None = None,
    *,
    torch_dtype: torch.dtype | None,
) -> None:
    """Allocate this process's shards of the sharded skeleton `model` on `device` and read them from the plan's files.

    Each parameter is an FSDP2 `DTensor` sharded on its first dimension across `group`; only this rank's rows are
    read (`open_rows`, in the dtype a `from_pretrained(dtype=torch_dtype)` load gives them), so no process ever holds
    a whole tensor larger than its shard. Parameters stored in float8 (`memory.store_float8`) are rounded to
    `compute_dtype` first, the dtype the `fp8` profile casts from, so that they hold the same values as a whole load
    with that profile.
    """

    def cast(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and compute_dtype is not None:
            rows = rows.to(compute_dtype)
        return rows.to(dtype)

    rank, degree = dist.get_rank(group), dist.get_world_size(group)
    # `to_empty` allocates every parameter and buffer without values; the buffers (RoPE tables, built on the CPU by
    # the skeleton) are put back afterwards.
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    with torch.no_grad(), open_rows(plan, torch_dtype) as read:
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
        for name, info in plan.tensors.items():
            param = params[name]
            if not hasattr(param, "to_local"):  # kept whole on every rank (see `shard_model`)
                param.copy_(cast(read(name, None, None), param.dtype))
                continue
            local = param.to_local()
            if local.numel() == 0:  # a first dimension smaller than the group: no rows here
                continue
            start = rank * -(-info.shape[0] // degree)
            rows = read(name, start, start + local.shape[0])
            local.copy_(cast(rows, local.dtype))


def checkpoint_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop `high_noise_ckpt` / `low_noise_ckpt` from `kwargs`: `{"transformer": ..., "transformer_2": ...}`."""
    return {expert: kwargs.pop(argument, None) for expert, argument in CHECKPOINT_ARGUMENTS.items()}
