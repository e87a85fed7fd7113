"""Speed recipes over diffusers' own machinery: step-cache presets on both experts, MagCache calibrated per expert
and per guidance mode, and the few-step ("turbo") LoRA recipe for Wan 2.2 Lightning / LightX2V LoRAs.

Every recipe here is opt-in and changes the output (see README, "Speed and memory"). The pipeline's methods
`enable_cache_preset`, `disable_cache` and `load_turbo_lora` delegate to this module; it never imports the pipeline.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open

from .constants import written_as_path
from .tasks import TASKS, GuidanceMode, parse_task_type

EXPERTS = ("transformer", "transformer_2")

# diffusers' hook name of MagCache's head block (hooks/mag_cache.py); its state manager holds one state per context.
_MAG_HEAD_HOOK = "mag_cache_leader_block_hook"


@dataclass(frozen=True)
class CachePreset:
    """A named step-cache recipe: one diffusers cache config per expert.

    Attributes:
        name (`str`): the preset's name, as `enable_cache_preset` takes it.
        summary (`str`): what it does and what it was measured to do on the tiny model (`benchmarks/bench_cache.py`).
        make_config (`Callable`): builds one expert's config from that expert's own number of steps and MagCache
            ratios (`None` for presets that need no calibration). Each expert gets a config object of its own.
        needs_calibration (`bool`): whether `calibration=` (a [`MagCacheCalibration`]) is required.
    """

    name: str
    summary: str
    make_config: Callable[[int | None, list[float] | None], Any]
    needs_calibration: bool = False


def _taylorseer(steps: int | None, ratios: list[float] | None) -> TaylorSeerCacheConfig:
    # Lite mode: the blocks are skipped on prediction steps and only the output projection is extrapolated (diffusers'
    # own lite patterns; its default patterns miss Wan's `attn1`). Steps count per expert and per branch context, so
    # "before step 2" is each expert's first two steps. Float32 factors: the extrapolation subtracts close values.
    return TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=2, max_order=1, use_lite_mode=True,
        taylor_factors_dtype=torch.float32,
    )  # fmt: skip


def _magcache(steps: int | None, ratios: list[float] | None) -> MagCacheConfig:
    # diffusers' default threshold, skip limit and retention; `num_inference_steps` is the expert's OWN step count, so
    # the state resets at the end of that expert's steps and the retention covers the first 20% of its own steps.
    return MagCacheConfig(
        threshold=0.06, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=steps, mag_ratios=list(ratios),
    )  # fmt: skip


# Measured by benchmarks/bench_cache.py on the tiny two-expert model (t2v, 8 steps: 4 high-noise + 4 low-noise,
# 2 branches, fp32, CPU); the real 14B experts change far less between steps than random tiny weights, so they skip more.
CACHE_PRESETS: dict[str, CachePreset] = {
    preset.name: preset
    for preset in (
        CachePreset(
            "fbc-safe",
            "FirstBlockCache, threshold 0.1: a step reuses the rest of the stack when the first block's residual "
            "moved less than 10%. Tiny model: 0 of 16 forwards skipped, rel-L2 0.",
            lambda steps, ratios: FirstBlockCacheConfig(threshold=0.1),
        ),
        CachePreset(
            "fbc-fast",
            "FirstBlockCache, threshold 0.2. Tiny model: 10 of 16 forwards skipped, rel-L2 0.0043.",
            lambda steps, ratios: FirstBlockCacheConfig(threshold=0.2),
        ),
        CachePreset(
            "taylorseer",
            "TaylorSeer lite (first-order, interval 2, from each expert's third step). Tiny model: 4 of 16 "
            "forwards skipped, rel-L2 0.060.",
            _taylorseer,
        ),
        CachePreset(
            "magcache",
            "MagCache with ratios calibrated per expert for the call's mode (`calibrate_magcache`), threshold 0.06, "
            "at most 3 steps in a row. Tiny model: 12 of 16 forwards skipped, rel-L2 0.012.",
            _magcache,
            needs_calibration=True,
        ),
    )
}


@dataclass
class MagCacheCalibration:
    """MagCache ratios of one guidance mode, one table per expert, each as long as that expert's own steps.

    Made by [`calibrate_magcache`]; pass it to `pipe.enable_cache_preset("magcache", calibration=...)` before calls
    with the same `num_inference_steps`, `flow_shift`, task and `guidance_mode`. Calibrate each mode you use.

    Attributes:
        guidance_mode (`str`): the mode the calibration call ran.
        num_inference_steps (`int`): the steps of the calibration call (both experts together).
        ratios (`dict[str, list[float]]`): per expert, the mean over the mode's branches of each own step's residual
            magnitude ratio (diffusers' calibration formula); the first entry of each expert is 1.0.
        branch_ratios (`dict[str, dict[str, list[float]]]`): per expert, the same ratios of each branch context.
    """

    guidance_mode: str
    num_inference_steps: int
    ratios: dict[str, list[float]]
    branch_ratios: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def __post_init__(self):
        self.check()

    def check(self, where: str = "MagCacheCalibration") -> None:
        """Refuse a calibration that cannot be a real one: an unknown mode, a step count that is not a positive
        integer, tables of unknown experts, ratios that are not finite and positive, or tables whose lengths do
        not add up to `num_inference_steps`.

        Raises:
            ValueError: naming `where`, the field and the value.
        """
        modes = [m.value for m in GuidanceMode]
        mode = getattr(self.guidance_mode, "value", self.guidance_mode)
        if mode not in modes:
            raise ValueError(f"{where}: `guidance_mode`={self.guidance_mode!r} is not a guidance mode; one of {modes}.")
        self.guidance_mode = mode
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{where}: `num_inference_steps`={steps!r} must be a positive integer.")
        if not isinstance(self.ratios, dict) or not self.ratios or set(self.ratios) - set(EXPERTS):
            raise ValueError(
                f"{where}: `ratios` must map one or both of {list(EXPERTS)} to a table, got "
                f"{sorted(self.ratios) if isinstance(self.ratios, dict) else type(self.ratios).__name__}."
            )
        for expert, table in self.ratios.items():
            if not isinstance(table, (list, tuple)) or not table:
                raise ValueError(f"{where}: `ratios[{expert!r}]` must be a non-empty list of ratios.")
            for i, value in enumerate(table):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                    value <= 0
                ):
                    raise ValueError(
                        f"{where}: `ratios[{expert!r}][{i}]`={value!r}; every ratio must be a finite number > 0."
                    )
        total = sum(len(table) for table in self.ratios.values())
        if total != steps:
            raise ValueError(
                f"{where}: the tables hold {total} steps "
                f"({', '.join(f'{e}: {len(t)}' for e, t in self.ratios.items())}), but `num_inference_steps`={steps}."
            )

    def check_call(self, guidance_mode: str, num_inference_steps: int, expert_steps: Mapping[str, int] | None = None):
        """Refuse a call this calibration was not made for: another guidance mode, another step count, or (once the
        steps are planned) another split of the steps between the experts (another `flow_shift` or boundary).

        Raises:
            ValueError: naming the calibration's value and the call's.
        """
        mode = getattr(guidance_mode, "value", guidance_mode)
        if mode != self.guidance_mode:
            raise ValueError(
                f"the MagCache calibration was made for `guidance_mode`={self.guidance_mode!r}, but the call runs "
                f"{mode!r}: its ratios do not fit. Calibrate this mode (`calibrate_magcache`) and enable it."
            )
        if num_inference_steps != self.num_inference_steps:
            raise ValueError(
                f"the MagCache calibration was made for `num_inference_steps`={self.num_inference_steps}, but the call "
                f"runs {num_inference_steps}: calibrate with the call's steps."
            )
        if expert_steps is not None:
            made = {expert: self.steps(expert) for expert in EXPERTS}
            runs = {expert: expert_steps.get(expert, 0) for expert in EXPERTS}
            if made != runs:
                raise ValueError(
                    f"the MagCache calibration splits its steps {made} between the experts, but the call splits them "
                    f"{runs} (another `flow_shift` or boundary): calibrate with the call's settings."
                )

    def steps(self, expert: str) -> int:
        """The number of steps `expert` ran in the calibration call (0 if it never ran)."""
        return len(self.ratios.get(expert, []))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the calibration as JSON."""
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> MagCacheCalibration:
        """Read a calibration written by [`MagCacheCalibration.save`], checked (see [`MagCacheCalibration.check`]).

        Raises:
            FileNotFoundError: for a missing file.
            ValueError: for a file that is not such a calibration, naming the file and what is wrong.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no such MagCache calibration file: '{path}'") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"MagCache calibration '{path}' is not readable JSON ({err}).") from None
        names = {f.name for f in fields(cls)}
        needed = {"guidance_mode", "num_inference_steps", "ratios"}
        if not isinstance(data, dict) or set(data) - names or not needed <= set(data):
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"MagCache calibration '{path}' must be an object with the keys {sorted(names)}, got {found}."
            )
        calibration = object.__new__(cls)
        for name in names:
            setattr(calibration, name, data.get(name, {}))
        calibration.check(f"MagCache calibration '{path}'")
        return calibration


def _experts(pipe) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in EXPERTS if getattr(pipe, name, None) is not None}


def check_cache_for_call(pipe, guidance_mode, num_inference_steps: int, expert_steps=None) -> None:
    """Refuse a call that the MagCache calibration enabled on `pipe` was not made for (see
    [`MagCacheCalibration.check_call`]); nothing without one, or once the experts' caches were removed by hand."""
    calibration = getattr(pipe, "_magcache_calibration", None)
    if calibration is not None and any(model.is_cache_enabled for model in _experts(pipe).values()):
        calibration.check_call(guidance_mode, num_inference_steps, expert_steps)


def disable_cache(pipe) -> None:
    """Remove the step cache of every expert of `pipe` that has one."""
    pipe._magcache_calibration = None
    for model in _experts(pipe).values():
        if model.is_cache_enabled:
            model.disable_cache()


def enable_cache_preset(pipe, name: str, *, calibration: MagCacheCalibration | None = None) -> None:
    """Apply the cache preset `name` (a key of [`CACHE_PRESETS`]) to both experts, each with a config of its own.

    Any cache already enabled on the experts is removed first. MagCache takes each expert's ratio table and own step
    count from `calibration`; an expert that ran no step in the calibration call gets no cache.

    Raises:
        ValueError: for an unknown name, a MagCache preset without a calibration, or a calibration given to a preset
            that takes none.
    """
    if name not in CACHE_PRESETS:
        raise ValueError(f"`name`={name!r} is not a cache preset; expected one of {', '.join(CACHE_PRESETS)}.")
    preset = CACHE_PRESETS[name]
    if preset.needs_calibration and not isinstance(calibration, MagCacheCalibration):
        raise ValueError(
            f"cache preset {name!r} needs `calibration`, a MagCacheCalibration of the mode you call (got "
            f"{type(calibration).__name__}); make one with `calibrate_magcache(pipe, call_kwargs)`."
        )
    if not preset.needs_calibration and calibration is not None:
        raise ValueError(f"cache preset {name!r} takes no `calibration`; only 'magcache' does.")
    compiled = getattr(pipe, "_compile_settings", None)
    if compiled is not None and compiled.get("fullgraph"):
        # diffusers' cache hooks wrap the compiled blocks' forward and cannot be traced: the first step would fail
        raise ValueError(
            f"cache preset {name!r} and `compile` (fullgraph=True) do not go together: the experts are already "
            "compiled whole, and a step cache's hooks break the graph. Enable the cache before `compile"
            "(fullgraph=False)`, or use one of them."
        )
    if preset.needs_calibration:
        calibration.check()  # a calibration edited after it was made
    experts = _experts(pipe)
    configs = {}
    for expert in experts:
        if preset.needs_calibration:
            steps = calibration.steps(expert)
            if steps == 0:
                continue
            configs[expert] = preset.make_config(steps, calibration.ratios[expert])
        else:
            configs[expert] = preset.make_config(None, None)
    disable_cache(pipe)
    for expert, config in configs.items():
        experts[expert].enable_cache(config)
    pipe._magcache_calibration = calibration  # each call is checked against it (`check_cache_for_call`)


def calibrate_magcache(pipe, call_kwargs: Mapping[str, Any]) -> MagCacheCalibration:
    """Run one uncached call with diffusers' MagCache in calibration mode and return the ratios per expert.

    Why not diffusers' `MagCacheConfig(calibrate=True)` alone: its hook counts steps per model and per cache
    context. With two experts each expert's hook only sees its own steps (e.g. 17 high-noise + 23 low-noise of 40),
    so a config with `num_inference_steps=40` never reaches its end on either expert (the ratios are never reported,
    and in inference mode the low-noise expert would read the high-noise steps' ratios, `mag_ratios[0:23]` instead of
    `[17:40]`, and retain 8 of its own steps instead of 20% of them); with several guidance branches each branch is a
    context with its own table, and the report is printed per context then cleared. Here the hooks are given a step
    count no expert reaches, the tables are read from each context's state after every step, and each expert's
    table is the mean over the branches of its own steps.

    Args:
        pipe (`BerniniPipeline`): the pipeline; it must have no cache enabled.
        call_kwargs (`Mapping`): the arguments of the call to calibrate (prompt, task, media, `num_inference_steps`,
            `guidance_mode`, seed generator, ...); `output_type` is forced to `"latent"`.

    Returns:
        [`MagCacheCalibration`]: one table per expert that ran, sized to that expert's own steps.
    """
    call_kwargs = dict(call_kwargs)
    if "callback_on_step_end" in call_kwargs:
        raise ValueError("`call_kwargs` must not set `callback_on_step_end`: the calibration reads the ratios with it.")
    experts = _experts(pipe)
    if any(model.is_cache_enabled for model in experts.values()):
        raise ValueError("calibrate_magcache needs the experts uncached; call `pipe.disable_cache()` first.")
    steps = int(call_kwargs.get("num_inference_steps", 40))
    tables: dict[str, dict[str, list[float]]] = {name: {} for name in experts}

    def snapshot(p, step, timestep, kwargs):
        for name, model in experts.items():
            states = model.blocks[0]._diffusers_hook.get_hook(_MAG_HEAD_HOOK).state_manager._state_cache
            for context, state in states.items():
                tables[name][context] = list(state.calibration_ratios)
        return kwargs

    for model in experts.values():
        # A count no expert reaches: the state is never reset (and the tables never cleared) inside the call.
        model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps + 1))
    try:
        pipe(**{**call_kwargs, "output_type": "latent", "callback_on_step_end": snapshot})
    finally:
        disable_cache(pipe)

    ratios = {}
    for name, contexts in tables.items():
        if not contexts:
            continue
        lengths = {len(table) for table in contexts.values()}
        if len(lengths) != 1:  # every branch runs every step of its expert
            raise RuntimeError(f"MagCache calibration: branches of {name} ran different step counts {sorted(lengths)}")
        ratios[name] = [math.fsum(column) / len(column) for column in zip(*contexts.values())]
    if sum(len(table) for table in ratios.values()) != steps:
        raise RuntimeError(f"MagCache calibration counted {ratios} steps, the call ran {steps}")
    mode = call_kwargs.get("guidance_mode")
    if mode is None:
        mode = TASKS[parse_task_type(call_kwargs.get("task_type", "t2v"))].default_guidance_mode
    return MagCacheCalibration(
        guidance_mode=getattr(mode, "value", str(mode)),
        num_inference_steps=steps,
        ratios=ratios,
        branch_ratios={name: contexts for name, contexts in tables.items() if contexts},
    )


# ------------------------------------------------------------------------------------------------ turbo LoRAs

# The call settings of the Wan 2.2 Lightning / LightX2V 4-step LoRAs (T2V-A14B):
# - 4 steps with shift 5: the Lightning authors trained on the timesteps [1000, 937.5, 833.3, 625]
#   (ModelTC/LightX2V-Wan2.2-Lightning issue #3), which are 4 uniform steps shifted by 5; the package's official
#   grid gives 999, 937, 833, 624, and the expert switch at 875 splits them 2 high-noise + 2 low-noise, as the
#   ComfyUI workflows do (t2v switch 875, cfg 1, shift 5: deepbeepmeep/Wan2GP issue #748).
# - no CFG ("4 steps without the need of CFG trick", the Wan2.2-Lightning README). In Bernini terms every guidance
#   weight is 1 and never rescaled: CFG chains then collapse onto their last (conditional) branch, and APG with
#   eta 1, no norm clamp and no momentum does the same, so every task keeps its own mode and inputs.
# - strength 1 on both experts: diffusers' loader applies the files' alpha keys (huggingface/diffusers PR #12074).
# The sampler stays the pipeline's (UniPC, or `use_unipc=False` for flow-matching Euler).
TURBO: dict[str, Any] = {
    "num_inference_steps": 4,
    "flow_shift": 5.0,
    "omega_vid": 1.0,
    "omega_img": 1.0,
    "omega_txt": 1.0,
    "omega_scale": 1.0,
    "eta": 1.0,
    "momentum": 0.0,
    "norm_threshold": 0.0,
}


# Weight files that are pickles: `torch.load` (even restricted) runs the unpickler over them; refused like pickle
# model weights (loading.py), with the two lines that convert one.
PICKLE_LORA_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def names_a_local_file(name: str | os.PathLike) -> bool:
    """Whether a LoRA source `name` is a local path rather than a Hub repo id: it exists, is written as a path
    (absolute, `./`, `../`, `~`), has a weight-file suffix (`x.safetensors`, `x.bin`), or has a path separator without
    being of the `owner/repo` form. A missing one is then "file not found", never a Hub request."""
    name = os.fspath(name)
    path = Path(name)
    if path.exists() or written_as_path(name):
        return True
    if path.suffix.lower() in (".safetensors", *PICKLE_LORA_SUFFIXES):
        return True
    if "/" in name or os.sep in name:
        try:
            validate_repo_id(name)
        except HFValidationError:  # not owner/repo, so a path
            return True
    return False


def _pickle_lora_error(path: Path | str, argument: str) -> ValueError:
    target = Path(path).with_suffix(".safetensors").name
    return ValueError(
        f"`{argument}`={str(path)!r} is a pickle file; LoRAs load from safetensors only, because unpickling runs code. "
        "Convert it once, in Python, only if you trust the file:\n"
        f"    import torch, safetensors.torch\n"
        f"    sd = torch.load({Path(path).name!r}, weights_only=True); safetensors.torch.save_file("
        f"{{k: v.contiguous() for k, v in sd.items()}}, {target!r})"
    )


def _check_lora_tensors(tensors, where: str) -> None:
    """Refuse an empty LoRA or one with a non-finite value, naming `where` and the key. `tensors` yields
    (key, tensor) pairs; each is checked as it comes, so a file is read one tensor at a time."""
    count = 0
    for key, value in tensors:
        count += 1
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"LoRA {where}: key {key!r} is a {type(value).__name__}, not a tensor.")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            kind = "alpha" if key.endswith("alpha") else "tensor"
            raise ValueError(
                f"LoRA {where}: {kind} {key!r} holds non-finite values (NaN or inf); it would turn every output "
                "into NaN. Use another file."
            )
    if count == 0:
        raise ValueError(f"LoRA {where} is empty: it holds no tensors.")


def check_lora_source(source, argument: str = "pretrained_model_name_or_path_or_dict", **kwargs) -> None:
    """Check a LoRA source before anything is loaded: a state dict or a local safetensors file is read and must
    be non-empty and finite (tensors and `alpha`); a pickle file (`.bin`, `.pt`, `.pth`, `.ckpt`) or
    `use_safetensors=False` is refused; a missing local path is a `FileNotFoundError`. A Hub repo is only checked
    for a pickle `weight_name` here (its tensors are checked once loaded, see [`load_lora`]).

    Raises:
        FileNotFoundError: for a missing local file or folder.
        ValueError: for a pickle, an empty LoRA, or a non-finite tensor (naming the file and the key).
    """
    if kwargs.get("use_safetensors", True) is False:
        raise ValueError(f"`use_safetensors`=False is not supported (`{argument}`): LoRAs load from safetensors only.")
    if isinstance(source, Mapping):
        _check_lora_tensors(source.items(), f"`{argument}` (a state dict)")
        return
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"`{argument}` must be a state dict, a safetensors file, a folder or a Hub repo id, got "
            f"{type(source).__name__}."
        )
    weight_name = kwargs.get("weight_name")
    if weight_name is not None and Path(str(weight_name)).suffix.lower() in PICKLE_LORA_SUFFIXES:
        raise _pickle_lora_error(weight_name, "weight_name")
    if weight_name is not None and not str(weight_name).lower().endswith(".safetensors"):
        raise ValueError(f"`weight_name`={weight_name!r}: LoRAs load from `.safetensors` files only.")
    if not names_a_local_file(source):
        return  # a Hub repo id
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"`{argument}`: no such LoRA file or folder: '{source}'")
    if path.is_dir():
        if weight_name is None:
            return  # diffusers picks the folder's safetensors file (`use_safetensors=True`: never a pickle)
        path = path / (kwargs.get("subfolder") or "") / weight_name
        if not path.is_file():
            raise FileNotFoundError(f"`weight_name`: no such LoRA file: '{path}'")
    if path.suffix.lower() in PICKLE_LORA_SUFFIXES:
        raise _pickle_lora_error(source, argument)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"`{argument}`={str(source)!r}: LoRAs load from `.safetensors` files only.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            _check_lora_tensors(((key, handle.get_tensor(key)) for key in handle.keys()), f"file '{source}'")
    except SafetensorError as err:
        raise ValueError(f"`{argument}`: '{source}' is not a readable safetensors file ({err}).") from None


def _adapters(model) -> set[str]:
    return set(getattr(model, "peft_config", None) or {})


def _delete_adapter(pipe, *names: str) -> None:
    for model in _experts(pipe).values():
        present = [name for name in names if name in _adapters(model)]
        if present:
            model.delete_adapters(present)


def load_lora(pipe, load, source, adapter_name: str | None = None, **kwargs) -> None:
    """`load` (diffusers' `load_lora_weights`, bound to `pipe`) with the checks of [`check_lora_source`] first and,
    after it, a check that the LoRA landed on some module of its expert and that what landed is finite; on either
    failure the new adapter is deleted again and a `ValueError` names the source.
    """
    check_lora_source(source, **kwargs)
    target = "transformer_2" if kwargs.get("load_into_transformer_2") else "transformer"
    model = getattr(pipe, target)
    before = _adapters(model)
    kwargs["use_safetensors"] = True  # never diffusers' pickle fallback for a folder or repo
    load(source, adapter_name=adapter_name, **kwargs)
    added = sorted(_adapters(model) - before)
    where = f"'{source}'" if isinstance(source, (str, os.PathLike)) else "(a state dict)"
    if not added and not kwargs.get("hotswap"):
        raise ValueError(
            f"LoRA {where} matches no module of `{target}`: none of its keys names a layer of the Wan transformer "
            "(a LoRA for another model, or an unknown key format), so loading it would change nothing."
        )
    for name, param in model.named_parameters():
        if any(f".{adapter}." in name or name.endswith(f".{adapter}") for adapter in added) and "lora_" in name:
            if not bool(torch.isfinite(param).all()):
                _delete_adapter(pipe, *added)
                raise ValueError(f"LoRA {where} loaded non-finite values into `{target}` ({name}); it was unloaded.")


def load_turbo_lora(pipe, high, low, adapter_name: str = "turbo", **kwargs) -> None:
    """Load a Wan 2.2 few-step LoRA pair: `high` into `transformer`, `low` into `transformer_2` (diffusers'
    `load_lora_weights(..., load_into_transformer_2=True)`), both under `adapter_name`. Call with [`TURBO`]'s settings.

    `high` and `low` are what `load_lora_weights` takes: a safetensors file, a folder or repo (with `weight_name=` in
    `kwargs`), or a state dict, in diffusers' or the original `diffusion_model.blocks.N...lora_down/lora_up/alpha` key
    format. All or nothing: both sources are checked before either is loaded, and on any failure the adapter is
    removed from both experts.
    """
    if getattr(pipe, "transformer", None) is None or getattr(pipe, "transformer_2", None) is None:
        raise ValueError(
            "load_turbo_lora needs both experts (a Wan 2.2 A14B pipeline); this pipeline has "
            f"transformer={type(getattr(pipe, 'transformer', None)).__name__}, "
            f"transformer_2={type(getattr(pipe, 'transformer_2', None)).__name__}. Load a single file with "
            "`pipe.load_lora_weights(path)` instead."
        )
    check_lora_source(high, "high", **kwargs)
    check_lora_source(low, "low", **kwargs)
    if any(adapter_name in _adapters(getattr(pipe, name)) for name in EXPERTS):
        raise ValueError(f"`adapter_name`={adapter_name!r} is already loaded; unload it or pass another name.")
    try:
        pipe.load_lora_weights(high, adapter_name=adapter_name, **kwargs)
        pipe.load_lora_weights(low, adapter_name=adapter_name, load_into_transformer_2=True, **kwargs)
    except BaseException:
        _delete_adapter(pipe, adapter_name)
        raise
