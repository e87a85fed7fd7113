"""Task types of the Bernini-R renderer and the one table that drives the pipeline, the CLI and case files."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TaskType(str, enum.Enum):
    """The renderer's task types. A task differs only in its media, its default guidance mode and its system prompt."""

    T2I = "t2i"
    T2V = "t2v"
    I2I = "i2i"
    V2V = "v2v"
    MV2V = "mv2v"
    R2V = "r2v"
    RV2V = "rv2v"
    ADS2V = "ads2v"

    def __str__(self) -> str:
        return self.value


class GuidanceMode(str, enum.Enum):
    """The renderer's guidance modes (docs/design.md#modes)."""

    T2V = "t2v"
    T2V_APG = "t2v_apg"
    V2V = "v2v"
    V2V_APG = "v2v_apg"
    V2V_CHAIN = "v2v_chain"
    R2V_APG = "r2v_apg"
    RV2V = "rv2v"

    def __str__(self) -> str:
        return self.value


# The T5 system-prompt prefixes, concatenated to the cleaned prompt with no separator. The extra keys (r2i, i2v,
# vi2v, vrc2v, default) have no task of their own in the renderer but are accepted as `system_prompt` names.
_HELPFUL = "You are a helpful assistant"
SYSTEM_PROMPTS: dict[str, str] = {
    "default": f"{_HELPFUL}.",
    "t2i": f"{_HELPFUL} specialized in text-to-image generation.",
    "t2v": f"{_HELPFUL} specialized in text-to-video generation.",
    "i2i": f"{_HELPFUL} specialized in image editing.",
    "r2i": f"{_HELPFUL} specialized in subject-to-image generation.",
    "i2v": f"{_HELPFUL} specialized in image-to-video generation.",
    "v2v": f"{_HELPFUL} specialized in video editing.",
    "r2v": f"{_HELPFUL} specialized in subject-to-video generation.",
    "vi2v": f"{_HELPFUL} specialized in video editing on content propagation.",
    "rv2v": f"{_HELPFUL} specialized in video editing with reference.",
    "ads2v": f"{_HELPFUL} specialized in ads insertion.",
    "vrc2v": "You are a helpful assistant for editing. You may need to adjust the subject's action or position.",
    "mv2v": (
        "You are a helpful assistant for editing. You might need to adjust the video's style, lighting, colors, "
        "textures, and the subject's pose or action."
    ),
}

# The standard Wan2.2 negative prompt, the official renderer's default. It is tokenized raw (no cleaning, no prefix).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class Need(enum.Enum):
    """How a task uses one media slot."""

    NO = "not accepted"
    OPTIONAL = "optional"
    REQUIRED = "required"


@dataclass(frozen=True)
class TaskSpec:
    task: TaskType
    description: str
    default_guidance_mode: GuidanceMode
    video: Need
    image: Need
    images: Need
    num_videos: tuple[int, int] = (0, 0)  # allowed (min, max) number of videos when `video` is given
    is_image: bool = False  # image tasks force num_frames=1 and write PNG

    @property
    def system_prompt(self) -> str:
        return SYSTEM_PROMPTS[self.task.value]

    @property
    def inputs(self) -> tuple[tuple[str, Need], ...]:
        """The media arguments the task takes (`video`, `image`, `images`, in that order), each with its need; the
        one description of a task's inputs that the argument check, the command line and the demo word their own way.
        """
        media = (("video", self.video), ("image", self.image), ("images", self.images))
        return tuple((name, need) for name, need in media if need is not Need.NO)


TASKS: dict[TaskType, TaskSpec] = {
    spec.task: spec
    for spec in (
        TaskSpec(TaskType.T2I, "text to image", GuidanceMode.T2V_APG, Need.NO, Need.NO, Need.NO, is_image=True),
        TaskSpec(TaskType.T2V, "text to video", GuidanceMode.T2V_APG, Need.NO, Need.NO, Need.NO),
        TaskSpec(
            TaskType.I2I, "image editing", GuidanceMode.V2V, Need.NO, Need.REQUIRED, Need.OPTIONAL, is_image=True
        ),
        TaskSpec(TaskType.V2V, "video editing", GuidanceMode.V2V_APG, Need.REQUIRED, Need.NO, Need.NO, (1, 1)),
        TaskSpec(
            TaskType.MV2V, "video editing with motion changes", GuidanceMode.V2V_APG, Need.REQUIRED, Need.NO,
            Need.NO, (1, 1),
        ),
        TaskSpec(TaskType.R2V, "reference to video", GuidanceMode.R2V_APG, Need.NO, Need.NO, Need.REQUIRED),
        TaskSpec(
            TaskType.RV2V, "video editing with references", GuidanceMode.RV2V, Need.REQUIRED, Need.NO,
            Need.REQUIRED, (1, 1),
        ),
        # The official scripts run ads2v with rv2v guidance (the official gradio demo uses v2v_apg instead).
        TaskSpec(
            TaskType.ADS2V, "ad insertion: video = [source, insert]", GuidanceMode.RV2V, Need.REQUIRED, Need.NO,
            Need.OPTIONAL, (2, 2),
        ),
    )
}


def _choice_error(argument: str, value, choices) -> ValueError:
    allowed = ", ".join(str(c) for c in choices)
    return ValueError(f"`{argument}`={value!r} is not supported; choose one of: {allowed}.")


def parse_task_type(value: str | TaskType) -> TaskType:
    try:
        return TaskType(value)
    except ValueError:
        raise _choice_error("task_type", value, [t.value for t in TaskType]) from None


# Modes of the full Bernini model (planner + renderer): they weight the planner's ViT tokens, which the renderer has
# not. The official command line lists them beside the renderer's; here they are named in a clear error.
PLANNER_GUIDANCE_MODES = ("vae_txt_vit_wapg", "r2v_wapg", "rv2v_wapg")


def parse_guidance_mode(value: str | GuidanceMode) -> GuidanceMode:
    try:
        return GuidanceMode(value)
    except ValueError:
        if value in PLANNER_GUIDANCE_MODES:
            raise ValueError(
                f"`guidance_mode`={value!r} belongs to the full Bernini planner model (it weights the planner's ViT "
                f"tokens); the Bernini-R renderer supports: {', '.join(g.value for g in GuidanceMode)}."
            ) from None
        raise _choice_error("guidance_mode", value, [g.value for g in GuidanceMode]) from None
