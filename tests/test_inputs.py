"""Bad input raises a clear error naming the argument before any model work (docs/design.md#bad-input), and call
details.

"Before any model work" is proven by a pipeline whose experts, text encoder and VAE raise if they are ever run.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from bernini_diffusers import BerniniPipeline

from model_guard import MODEL_WORK

SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=2, output_type="latent")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "notes.png").write_text("this is not an image\n")
    (root / "notes.mp4").write_text("this is not a video\n")
    return root


def _call(pipe, **kwargs):
    arguments = {"prompt": "a small boat on a lake", **SMALL, **kwargs}
    return pipe(**arguments)


def _raises(pipe, argument, error=ValueError, **kwargs):
    """The call raises `error` whose message names `argument` (in backticks), and no model ran."""
    with pytest.raises(error, match=re.escape(f"`{argument}`")) as info:
        _call(pipe, **kwargs)
    assert MODEL_WORK not in str(info.value)
    return str(info.value)


# --- the guard itself --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["t2v", "i2i"])
def test_guard_catches_model_work(guarded_pipe, media_dir, task):
    """A valid call does reach the models, so an error raised without AssertionError came before them."""
    extra = {"image": media_dir / "source.png"} if task == "i2i" else {}
    with pytest.raises(AssertionError, match=MODEL_WORK):
        _call(guarded_pipe, task_type=task, **extra)


# --- choices ------------------------------------------------------------------------------------------------------


def test_unknown_task_type_lists_the_choices(guarded_pipe):
    message = _raises(guarded_pipe, "task_type", task_type="t2x")
    assert "'t2x'" in message
    for allowed in ("t2i", "t2v", "i2i", "v2v", "mv2v", "r2v", "rv2v", "ads2v"):
        assert allowed in message


def test_unknown_guidance_mode_lists_the_choices(guarded_pipe):
    message = _raises(guarded_pipe, "guidance_mode", guidance_mode="cfg")
    assert "'cfg'" in message
    for allowed in ("t2v", "t2v_apg", "v2v", "v2v_apg", "v2v_chain", "r2v_apg", "rv2v"):
        assert allowed in message


# --- media that do not fit the task -------------------------------------------------------------------------------


def test_video_given_to_t2v(guarded_pipe, media_dir):
    _raises(guarded_pipe, "video", task_type="t2v", video=str(media_dir / "source.mp4"))


def test_image_given_to_v2v(guarded_pipe, media_dir):
    _raises(guarded_pipe, "image", task_type="v2v", video=str(media_dir / "source.mp4"),
            image=str(media_dir / "source.png"))


def test_images_given_to_v2v(guarded_pipe, media_dir):
    _raises(guarded_pipe, "images", task_type="v2v", video=str(media_dir / "source.mp4"),
            images=[str(media_dir / "ref_a.png")])


def test_video_missing_for_v2v(guarded_pipe):
    message = _raises(guarded_pipe, "video", task_type="v2v")
    assert "v2v" in message


def test_images_missing_for_r2v(guarded_pipe):
    _raises(guarded_pipe, "images", task_type="r2v")
    _raises(guarded_pipe, "images", task_type="r2v", images=[])


def test_image_missing_for_i2i(guarded_pipe):
    _raises(guarded_pipe, "image", task_type="i2i")


def test_one_video_for_ads2v(guarded_pipe, media_dir):
    message = _raises(guarded_pipe, "video", task_type="ads2v", video=[str(media_dir / "source.mp4")])
    assert "2" in message


def test_two_videos_for_v2v(guarded_pipe, media_dir):
    _raises(guarded_pipe, "video", task_type="v2v",
            video=[str(media_dir / "source.mp4"), str(media_dir / "insert.mp4")])


# --- missing and unreadable files ---------------------------------------------------------------------------------


def test_missing_video_file(guarded_pipe):
    message = _raises(guarded_pipe, "video", FileNotFoundError, task_type="v2v", video="nope.mp4")
    assert "nope.mp4" in message


def test_missing_reference_file_names_its_index(guarded_pipe, media_dir):
    message = _raises(guarded_pipe, "images[1]", FileNotFoundError, task_type="r2v",
                      images=[str(media_dir / "ref_a.png"), "missing.png"])
    assert "missing.png" in message


def test_missing_image_file(guarded_pipe):
    message = _raises(guarded_pipe, "image", FileNotFoundError, task_type="i2i", image="missing.png")
    assert "missing.png" in message


def test_text_file_as_image(guarded_pipe, bad_files):
    _raises(guarded_pipe, "image", task_type="i2i", image=str(bad_files / "notes.png"))


def test_text_file_as_video(guarded_pipe, bad_files):
    _raises(guarded_pipe, "video", task_type="v2v", video=str(bad_files / "notes.mp4"))


# --- values out of range ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("num_frames", 0),
        ("num_frames", -3),
        ("height", 8),
        ("width", 0),
        ("height", 10**6),
        ("num_inference_steps", 0),
        ("fps", 0),
        ("flow_shift", -1),
        ("max_image_size", 4),
        ("norm_threshold", -1),
        ("omega_txt", float("nan")),
        ("output_type", "gif"),
        ("callback_on_step_end_tensor_inputs", ["foo"]),
    ],
)
def test_out_of_range_values(guarded_pipe, argument, value):
    message = _raises(guarded_pipe, argument, **{argument: value})
    shown = "foo" if argument == "callback_on_step_end_tensor_inputs" else repr(value)
    assert shown in message


def test_prompt_must_be_a_string(guarded_pipe):
    with pytest.raises(ValueError, match="`prompt`") as info:
        guarded_pipe(prompt=None, **SMALL)
    assert "NoneType" in str(info.value)


def test_generator_must_be_a_generator(guarded_pipe):
    message = _raises(guarded_pipe, "generator", generator="42")
    assert "str" in message


def test_latents_with_a_wrong_shape(guarded_pipe):
    """Checked once the output geometry is known, still before any model work; names `latents` and both shapes."""
    wrong = torch.zeros(1, 16, 3, 4, 6)
    with pytest.raises(ValueError, match="`latents`") as info:
        _call(guarded_pipe, task_type="t2v", latents=wrong)
    message = str(info.value)
    assert "(1, 16, 2, 4, 6)" in message and "(1, 16, 3, 4, 6)" in message


# --- valid calls --------------------------------------------------------------------------------------------------


def test_image_task_forces_one_frame(tiny_pipe):
    generator = torch.Generator("cpu").manual_seed(0)
    out = tiny_pipe("a lighthouse", task_type="t2i", num_frames=81, height=32, width=48, num_inference_steps=2,
                    generator=generator, output_type="np")
    assert out.frames.shape == (1, 1, 32, 48, 3)
    generator = torch.Generator("cpu").manual_seed(0)
    latent = tiny_pipe("a lighthouse", task_type="t2i", num_frames=81, height=32, width=48, num_inference_steps=2,
                       generator=generator, output_type="latent").frames
    assert latent.shape == (1, 16, 1, 4, 6)


# --- the documented arguments -------------------------------------------------------------------------------------


def _documented_arguments(doc: str) -> list[str]:
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    indent = len(lines[start]) - len(lines[start].lstrip()) + 4
    names = []
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break  # the next section (Returns:)
        match = re.match(rf"^ {{{indent}}}(\w+) \(", line)
        if match:
            names.append(match.group(1))
    return names


def test_call_docstring_documents_every_argument_in_order():
    documented = _documented_arguments(BerniniPipeline.__call__.__doc__)
    parameters = [name for name in inspect.signature(BerniniPipeline.__call__).parameters if name != "self"]
    assert documented == parameters
