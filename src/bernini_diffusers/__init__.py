"""Bernini-R, ByteDance's video renderer, as a diffusers pipeline.

Public names load lazily, so `import bernini_diffusers` (and the command line's `--help`) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "BerniniPipeline": "pipeline_bernini",
    "BerniniPipelineOutput": "pipeline_bernini",
    "BerniniTransformer3DModel": "formats",  # the class, with `from_single_file` wired by formats
    "NonFiniteOutputError": "pipeline_bernini",
    "GuidanceMode": "tasks",
    "TASKS": "tasks",
    "TaskType": "tasks",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .pipeline_bernini import BerniniPipeline, BerniniPipelineOutput, NonFiniteOutputError
    from .tasks import TASKS, GuidanceMode, TaskType
    from .transformer_bernini import BerniniTransformer3DModel


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
