import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from model_guard import model_work  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_pipe():
    """The two-expert tiny pipeline, shared read-only by tests that only call it."""
    from bernini_diffusers.testing import tiny_pipeline

    return tiny_pipeline()


@pytest.fixture(scope="module")
def guarded_pipe():
    """A fresh tiny pipeline whose experts, text encoder and VAE fail the test (`model_guard.MODEL_WORK`) if they
    ever run: a call refused with a ValueError was refused before any model work."""
    from bernini_diffusers.testing import tiny_pipeline

    pipe = tiny_pipeline()
    patch = pytest.MonkeyPatch()
    for module in (pipe.transformer, pipe.transformer_2, pipe.text_encoder):
        patch.setattr(module, "forward", model_work)
    patch.setattr(pipe.vae, "encode", model_work)
    patch.setattr(pipe.vae, "decode", model_work)
    yield pipe
    patch.undo()


@pytest.fixture(scope="session")
def tiny_pipe_1p3b():
    from bernini_diffusers.testing import tiny_pipeline

    return tiny_pipeline(two_experts=False)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    """Small test media: a 24 fps source clip, an insert clip, a source image and references of different sizes."""
    from bernini_diffusers.testing import make_test_image, make_test_video

    root = tmp_path_factory.mktemp("media")
    make_test_video(root / "source.mp4", num_frames=12, width=48, height=32, fps=24, seed=1)
    make_test_video(root / "insert.mp4", num_frames=9, width=32, height=32, fps=16, seed=2)
    make_test_image(root / "source.png", width=48, height=32, seed=3)
    make_test_image(root / "ref_a.png", width=32, height=32, seed=4)
    make_test_image(root / "ref_b.png", width=40, height=60, seed=5)
    return root
