"""Bernini-R, ByteDance's video renderer, as a diffusers pipeline."""

from .pipeline_bernini import BerniniPipeline, BerniniPipelineOutput
from .tasks import TASKS, GuidanceMode, TaskType
from .transformer_bernini import BerniniTransformer3DModel

__all__ = [
    "BerniniPipeline",
    "BerniniPipelineOutput",
    "BerniniTransformer3DModel",
    "GuidanceMode",
    "TASKS",
    "TaskType",
]
__version__ = "0.1.0"
