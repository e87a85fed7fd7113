"""Loading with sharded weights: every process of a data group reads only its FSDP2 shards of each expert.

`BerniniPipeline.from_pretrained_sharded` builds the experts on the meta device (no weight memory), shards them with
`parallel.shard_model` across the data group, allocates this process's shards and fills them with the rows of each
tensor that FSDP2 gives it (`Shard(0)`: rank r of N holds rows `[r * ceil(R / N), (r + 1) * ceil(R / N))`), read with
safetensors' `get_slice` from the memory-mapped files. The largest thing a process holds while loading is its own
shards, so host memory per process is about 1 / N of an expert, not a whole expert per process.

Both expert layouts the loader reads are served by one conversion plan (`hub_export.convert.plan_conversion`): the
diffusers layout (`transformer/`, `transformer_2/`, bare keys) and the original checkpoints (`high_noise_ckpt`,
`low_noise_ckpt`: EMA copies preferred), so key sets, shapes and dtypes are checked before any weight is read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from .hub_export.convert import (
    EXPERTS,
    WEIGHTS_INDEX_NAME,
    ConversionPlan,
    _by_file,
    _open_error,
    expected_tensors,
    expert_skeleton,
    index_shards,
    load_dtype,
    plan_conversion,
    read_checkpoint,
)
from .loading import CHECKPOINT_ARGUMENTS, plan_checkpoint, resolve_layout
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
) -> dict[str, tuple[ConversionPlan, torch.nn.Module]]:
    """Each expert's conversion plan and its skeleton (parameters on the meta device), from a local diffusers folder
    or, with `checkpoints` (`{"transformer": high_noise_ckpt, "transformer_2": low_noise_ckpt}`), original files."""
    layout = resolve_layout(pretrained_model_name_or_path, {})
    plans = {}
    for expert in EXPERTS:
        files = layout.components.get(expert)
        if files is None:
            continue
        spec = (checkpoints or {}).get(expert)
        if spec is not None:
            config = BerniniTransformer3DModel.load_config(files.root / expert)
            plans[expert] = plan_checkpoint(spec, expert, config)
        else:
            plans[expert] = _folder_plan(files.root / expert, expert)
    if not plans:
        name = str(pretrained_model_name_or_path)
        raise ValueError(f"`pretrained_model_name_or_path`={name!r} has no expert folder (`transformer/`).")
    return plans


def cast_skeleton(plan: ConversionPlan, model: torch.nn.Module, torch_dtype: torch.dtype | None) -> torch.nn.Module:
    """Give the skeleton's (meta) parameters the dtypes `from_pretrained(dtype=...)` would give the loaded ones."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, param in model.named_parameters():
        param.data = param.data.to(load_dtype(name, plan.tensors[name].torch_dtype, torch_dtype, keep))
    return model.eval()


def materialize_shards(
    plan: ConversionPlan, model: torch.nn.Module, group, device: torch.device, compute_dtype: torch.dtype | None = None
) -> None:
    """Allocate this process's shards of the sharded skeleton `model` on `device` and read them from the plan's files.

    Each parameter is an FSDP2 `DTensor` sharded on its first dimension across `group`; only this rank's rows are
    read (`get_slice`), so no process ever holds a whole tensor larger than its shard. Parameters stored in float8
    (`memory.store_float8`) are rounded to `compute_dtype` first, the dtype the `fp8` profile casts from, so that
    they hold the same values as a whole load with that profile.
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
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
        for file, items in _by_file(plan.tensors.items()):
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for name, info in items:
                        param = params[name]
                        if not hasattr(param, "to_local"):  # kept whole on every rank (see `shard_model`)
                            param.copy_(cast(handle.get_tensor(info.key), param.dtype))
                            continue
                        local = param.to_local()
                        if local.numel() == 0:  # a first dimension smaller than the group: no rows here
                            continue
                        start = rank * -(-info.shape[0] // degree)
                        rows = handle.get_slice(info.key)[start : start + local.shape[0]]
                        local.copy_(cast(rows, local.dtype))
            except SafetensorError as err:
                raise _open_error(file, err) from None


def checkpoint_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop `high_noise_ckpt` / `low_noise_ckpt` from `kwargs`: `{"transformer": ..., "transformer_2": ...}`."""
    return {expert: kwargs.pop(argument, None) for expert, argument in CHECKPOINT_ARGUMENTS.items()}
