"""Tests of the Gradio demo: the request -> call mapping, and the served page driven in headless Chromium."""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from chat_server import ChatServer
from PIL import Image

from bernini_diffusers import cli, demo
from bernini_diffusers.media import read_video
from bernini_diffusers.pipeline_bernini import BerniniPipeline
from bernini_diffusers.prompt_enhancer import PromptEnhancer
from bernini_diffusers.tasks import DEFAULT_NEGATIVE_PROMPT, TASKS, Need, TaskType

SMALL = {"num_frames": 5, "height": 32, "width": 48, "num_inference_steps": 2}
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip


def chromium_executable() -> str | None:
    for candidate in (os.environ.get("BERNINI_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def page_values(values: dict) -> dict:
    """A full request as the page sends it: its defaults, the task's guidance mode (as picking the task sets it),
    then `values`."""
    request = demo.default_values()
    request.update({name: None for name in demo.MEDIA_INPUTS})
    request["guidance_mode"] = TASKS[TaskType(values["task_type"])].default_guidance_mode.value
    request.update(values)
    return request


@pytest.fixture(scope="module")
def built_demo(tiny_pipe, tmp_path_factory):
    return demo.create_demo(tiny_pipe, save_dir=tmp_path_factory.mktemp("demo_out"))


def components_by_id(blocks) -> dict:
    return {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


# --- the page's defaults and wiring -------------------------------------------------------------------


def test_page_defaults_are_the_pipeline_defaults(built_demo):
    components = components_by_id(built_demo)
    signature = inspect.signature(BerniniPipeline.__call__).parameters
    meaning_of_none = {"negative_prompt": DEFAULT_NEGATIVE_PROMPT, "system_prompt": "", "context_frames": 0}
    for name in demo.GENERATION_PARAMETERS:
        default = signature[name].default
        if name == "guidance_mode":
            default = TASKS[TaskType(signature["task_type"].default)].default_guidance_mode.value
        elif default is None:
            default = meaning_of_none[name]
        assert components[name].value == default, name
    assert components["task_type"].value == signature["task_type"].default
    # With the values as shown, the call is the pipeline's default call (with the texts None stands for).
    kwargs = demo.build_call("t2v", "a cat", **{n: components[n].value for n in demo.GENERATION_PARAMETERS})
    defaults = {name: p.default for name, p in signature.items() if name in kwargs}
    expected = {**defaults, "prompt": "a cat", "negative_prompt": DEFAULT_NEGATIVE_PROMPT, "guidance_mode": "t2v_apg"}
    assert kwargs == expected


def test_context_window_controls(built_demo):
    components = components_by_id(built_demo)
    assert components["context_frames"].label == "Context window (frames)" and components["context_frames"].value == 0
    assert components["context_overlap"].label == "Context overlap (frames)"
    assert components["context_overlap"].value == 16


# The official defaults (docs/design.md#defaults); the official demo uses the same values for every task.
OFFICIAL_DEFAULTS = {
    "num_inference_steps": 40, "flow_shift": 5.0, "omega_vid": 1.25, "omega_img": 4.5, "omega_txt": 4.0,
    "omega_scale": 0.8, "eta": 0.5, "momentum": 0.0, "norm_threshold": 50.0, "height": 480, "width": 848,
    "num_frames": 81, "fps": 16, "max_image_size": 848, "seed": 42,
}  # fmt: skip


def test_page_defaults_are_the_official_ones(built_demo):
    components = components_by_id(built_demo)
    assert {name: components[name].value for name in OFFICIAL_DEFAULTS} == OFFICIAL_DEFAULTS


def test_every_generation_parameter_is_an_input_of_generate(built_demo):
    components = components_by_id(built_demo)
    (generate_fn,) = [fn for fn in built_demo.fns.values() if fn.name == "on_generate"]
    inputs = {c.elem_id for c in generate_fn.inputs}
    assert inputs == {"task_type", "prompt", "seed", *demo.MEDIA_INPUTS, *demo.GENERATION_PARAMETERS}
    assert set(demo.GENERATION_PARAMETERS) <= set(components)
    # One generation at a time: the event itself is limited, so a later queue() call cannot lift it.
    assert generate_fn.concurrency_limit == 1
    assert built_demo._queue.default_concurrency_limit == 1


def test_the_api_names_every_parameter(built_demo):
    # What gradio_client's `view_api()` lists: the input names, in the order a client passes them.
    (endpoint,) = [info for name, info in built_demo.get_api_info()["named_endpoints"].items() if "generate" in name]
    names = [parameter["parameter_name"] for parameter in endpoint["parameters"]]
    expected = ["task_type", "prompt", "seed", "video", "insert_video", "image", "images", "negative_prompt",
                "system_prompt", "guidance_mode", "num_frames", "height", "width", "max_image_size", "fps",
                "num_inference_steps", "flow_shift", "omega_vid", "omega_img", "omega_txt", "omega_scale", "eta",
                "momentum", "norm_threshold", "context_frames", "context_overlap"]  # fmt: skip
    assert names == expected


def test_create_demo_rejects_unknown_defaults(tiny_pipe):
    with pytest.raises(ValueError, match="unknown names \\['steps'\\]"):
        demo.create_demo(tiny_pipe, defaults={"steps": 3})


# --- request -> call mapping -----------------------------------------------------------------------------

# What each task receives when every media input of the page holds a file: (video, image, images).
ROUTES = {
    "t2i": (None, None, None),
    "t2v": (None, None, None),
    "i2i": (None, "single.png", ["r1.png", "r2.png"]),
    "v2v": ("source.mp4", None, None),
    "mv2v": ("source.mp4", None, None),
    "r2v": (None, None, ["single.png", "r1.png", "r2.png"]),
    "rv2v": ("source.mp4", None, ["single.png", "r1.png", "r2.png"]),
    "ads2v": (["source.mp4", "insert.mp4"], None, ["single.png", "r1.png", "r2.png"]),
}


def test_routes_cover_every_task():
    assert set(ROUTES) == {t.value for t in TaskType}


@pytest.mark.parametrize("task", list(ROUTES))
def test_media_routing_per_task(task):
    kwargs = demo.build_call(
        task, "p", video="source.mp4", insert_video="insert.mp4", image="single.png", images=["r1.png", "r2.png"],
        **SMALL,
    )
    assert (kwargs["video"], kwargs["image"], kwargs["images"]) == ROUTES[task]
    assert kwargs["task_type"] == task
    assert kwargs["num_frames"] == (1 if TASKS[TaskType(task)].is_image else SMALL["num_frames"])


def test_single_image_alone_is_the_first_reference():
    assert demo.build_call("r2v", "p", image="a.png")["images"] == ["a.png"]
    assert demo.build_call("r2v", "p", images=["b.png"])["images"] == ["b.png"]
    assert demo.build_call("i2i", "p", image="a.png")["images"] is None


def test_empty_texts_mean_the_task_own_and_the_rest_passes_through():
    kwargs = demo.build_call("v2v", "p", video="v.mp4", system_prompt="", guidance_mode="", negative_prompt="")
    assert kwargs["system_prompt"] is None and kwargs["guidance_mode"] is None
    assert kwargs["negative_prompt"] == ""  # an emptied negative prompt is a choice, not the default
    kwargs = demo.build_call("v2v", "p", video="v.mp4", system_prompt="S.", guidance_mode="rv2v", omega_txt=2.5)
    assert (kwargs["system_prompt"], kwargs["guidance_mode"], kwargs["omega_txt"]) == ("S.", "rv2v", 2.5)


def test_context_window_of_0_or_empty_is_off_and_the_rest_passes_through():
    for off in (0, None):
        assert demo.build_call("v2v", "p", video="v.mp4", context_frames=off)["context_frames"] is None
    kwargs = demo.build_call("v2v", "p", video="v.mp4", context_frames=33, context_overlap=8)
    assert (kwargs["context_frames"], kwargs["context_overlap"]) == (33, 8)


def test_build_call_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown parameters \\['steps'\\]"):
        demo.build_call("t2v", "p", steps=2)
    with pytest.raises(ValueError, match="task_type"):
        demo.build_call("x2v", "p")


@pytest.mark.parametrize("task", list(ROUTES))
def test_every_routed_call_passes_the_pipeline_checks(task, media_dir):
    values = dict(
        video=str(media_dir / "source.mp4"), insert_video=str(media_dir / "insert.mp4"),
        image=str(media_dir / "source.png"), images=[str(media_dir / "ref_a.png"), str(media_dir / "ref_b.png")],
    )
    BerniniPipeline.validate_call(**demo.build_call(task, "p", **values, **SMALL))


def test_layout_shows_only_what_the_task_takes():
    for spec in TASKS.values():
        layout = demo.media_layout(spec)
        assert layout.video == (spec.video is not Need.NO)
        assert layout.insert_video == (spec.task is TaskType.ADS2V)
        assert layout.images == (spec.images is not Need.NO)
        assert layout.image == (spec.image is not Need.NO or spec.images is not Need.NO)
    assert demo.media_layout(TASKS[TaskType.I2I]).image_label == "Source image"
    assert demo.media_layout(TASKS[TaskType.R2V]).image_label.startswith("Reference image (image0)")


# --- one request end to end, in Python -------------------------------------------------------------------


def test_generate_writes_the_pipeline_result_and_reports_each_step(tiny_pipe, tmp_path, media_dir):
    seen = []
    values = page_values({"task_type": "i2i", "prompt": "make it blue", "image": str(media_dir / "source.png"),
                          "seed": 7, **SMALL})  # fmt: skip
    path, used = demo.generate(
        tiny_pipe, values, save_dir=tmp_path, progress=lambda p, **kw: seen.append((p, kw.get("desc")))
    )
    assert path.parent == tmp_path and path.suffix == ".png" and used == "make it blue"
    assert [p for p, _ in seen] == [(0, 2), (1, 2), (2, 2)]
    assert seen[-1][1] == "Decoding and writing"  # no silent gap after the last step
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary file left behind

    direct = tiny_pipe(
        "make it blue", task_type="i2i", image=str(media_dir / "source.png"), **SMALL,
        generator=torch.Generator("cpu").manual_seed(7),
    ).frames[0]
    expected = (np.clip(direct[0], 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)


def test_generate_rejects_bad_input_before_model_work(tmp_path):
    class NoModel:  # any attribute use other than validate_call would fail
        validate_call = BerniniPipeline.validate_call

    with pytest.raises(ValueError, match="requires `video`"):
        demo.generate(NoModel(), page_values({"task_type": "v2v", "prompt": "p"}), save_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        demo.generate(
            NoModel(), page_values({"task_type": "v2v", "prompt": "p", "video": str(tmp_path / "missing.mp4")}),
            save_dir=tmp_path,
        )
    windows = [({"context_frames": 80}, "`context_frames`=80 is not on the latent grid"),
               ({"context_frames": 17, "context_overlap": 20}, "`context_overlap`=20 must be shorter than the window")]
    for values, message in windows:
        with pytest.raises(ValueError, match=message):
            demo.generate(NoModel(), page_values({"task_type": "t2v", "prompt": "p", **values}), save_dir=tmp_path)
    for seed in (-1, None, 1.5):  # a cleared or edited seed field
        with pytest.raises(ValueError, match=f"`seed`={seed!r} must be an integer"):
            demo.generate(NoModel(), page_values({"task_type": "t2v", "prompt": "p", "seed": seed}), save_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_context_windows_reach_the_call(tmp_path, media_dir):
    class Recording:  # checks the call as the page does, then records it
        validate_call = BerniniPipeline.validate_call
        calls = []

        def __call__(self, **kwargs):
            self.calls.append(kwargs)
            return SimpleNamespace(frames=np.zeros((1, 5, 16, 16, 3), np.float32), fps=kwargs["fps"])

    pipe = Recording()
    video = str(media_dir / "source.mp4")
    for window, overlap in ((17, 8), (0, 16)):
        values = page_values({"task_type": "v2v", "prompt": "p", "video": video, "context_frames": window,
                              "context_overlap": overlap, **SMALL})  # fmt: skip
        demo.generate(pipe, values, save_dir=tmp_path)
    assert [(c["context_frames"], c["context_overlap"]) for c in pipe.calls] == [(17, 8), (None, 16)]


def test_the_page_shows_the_pipeline_error_for_bad_windows(built_demo):
    import gradio as gr

    components = components_by_id(built_demo)
    (generate_fn,) = [fn for fn in built_demo.fns.values() if fn.name == "on_generate"]
    values = page_values({"task_type": "t2v", "prompt": "p", "context_frames": 17, "context_overlap": 20, **SMALL})
    with pytest.raises(gr.Error, match="`context_overlap`=20 must be shorter than the window `context_frames`=17"):
        generate_fn.fn(*(values[component.elem_id] for component in generate_fn.inputs), gr.Progress())


ENHANCED = "A shiny red car drives along a coastal road at sunset."


@pytest.fixture
def chat_endpoint():
    endpoint = ChatServer()
    endpoint.default = (200, ChatServer.completion(ENHANCED))
    yield endpoint
    endpoint.close()


def test_prompt_enhancer_runs_first_with_the_routed_media(tiny_pipe, tmp_path, media_dir, chat_endpoint):
    values = page_values({"task_type": "v2v", "prompt": "red car", "video": str(media_dir / "source.mp4"), **SMALL})
    enhancer = PromptEnhancer(model="pe-model", api_key="k", base_url=chat_endpoint.base_url, max_retries=0)
    path, used = demo.generate(tiny_pipe, values, save_dir=tmp_path, prompt_enhancer=enhancer)
    assert used == ENHANCED and path.exists()
    (request,) = [r["body"] for r in chat_endpoint.requests]
    assert request["model"] == "pe-model"
    parts = request["messages"][1]["content"]
    assert "red car" in parts[0]["text"]
    assert sum(part["type"] == "image_url" for part in parts) == 3  # the source video's frames reached the enhancer


def test_prompt_enhancer_failure_falls_back_to_the_raw_prompt(tiny_pipe, tmp_path):
    values = page_values({"task_type": "t2i", "prompt": "a red car", **SMALL})
    unreachable = PromptEnhancer(api_key="k", base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=0)
    _, used = demo.generate(tiny_pipe, values, save_dir=tmp_path, prompt_enhancer=unreachable)
    assert used == "a red car"

    class Broken:  # any object with `enhance` may be passed; one that raises must not stop the generation
        def enhance(self, *args, **kwargs):
            raise RuntimeError("broken")

    _, used = demo.generate(tiny_pipe, values, save_dir=tmp_path, prompt_enhancer=Broken())
    assert used == "a red car"
    assert len(list(tmp_path.glob("*_t2i_seed42.png"))) == 2


# --- the command ----------------------------------------------------------------------------------------


def test_demo_command_flags():
    args = cli.build_parser().parse_args(["demo", "--model", "tiny"])
    assert (args.host, args.port, args.share, args.ulysses, args.flow_shift) == ("127.0.0.1", 7860, False, 1, 5.0)
    assert (args.use_pe, args.pe_model, args.save_dir) == (False, None, "outputs/demo")
    assert args.func is demo.serve


def test_gradio_loads_only_when_the_page_is_built():
    code = (
        "import sys, bernini_diffusers.demo, bernini_diffusers.cli as cli; cli.build_parser(); "
        "print('gradio' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_demo_command_errors_name_the_flag(capsys):
    assert cli.main(["demo", "--model", "tiny", "--ulysses", "2"]) == 2
    assert "--ulysses=2: the demo serves one pipeline in one process" in capsys.readouterr().err
    assert cli.main(["demo", "--model", "tiny", "--port", "70000"]) == 2
    assert "--port=70000 must be in [1, 65535]" in capsys.readouterr().err
    assert cli.main(["demo"]) == 2
    assert "--model is not set" in capsys.readouterr().err
    assert cli.main(["demo", "--model", "tiny", "--context_frames", "80"]) == 2
    err = capsys.readouterr().err
    assert "--context_frames=80 is not on the latent grid" in err and "random weights" not in err
    assert cli.main(["demo", "--model", "tiny", "--context_frames", "17", "--context_overlap", "20"]) == 2
    assert "--context_overlap=20 must be shorter than the window --context_frames=17" in capsys.readouterr().err


def test_demo_command_sets_the_pages_initial_context_window(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the results folder, outputs/demo, is made here
    built = {}
    monkeypatch.setattr(demo.options, "load_pipeline", lambda args: "pipe")
    monkeypatch.setattr(demo, "create_demo", lambda pipe, **kwargs: built.update(kwargs) or _NoLaunch())
    assert cli.main(["demo", "--model", "tiny", "--context_frames", "33", "--context_overlap", "8"]) == 0
    assert (built["defaults"]["context_frames"], built["defaults"]["context_overlap"]) == (33, 8)
    assert cli.main(["demo", "--model", "tiny"]) == 0
    assert (built["defaults"]["context_frames"], built["defaults"]["context_overlap"]) == (0, 16)


class _NoLaunch:
    def launch(self, **kwargs):
        pass


# --- the served page in headless Chromium ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served_demo(tmp_path, chat_endpoint):
    """`bernini demo --model tiny --use_pe` on a free local port, stopped after the test."""
    port, save_dir = free_port(), tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
           "GRADIO_ANALYTICS_ENABLED": "False", "BERNINI_PE_BASE_URL": chat_endpoint.base_url,
           "BERNINI_PE_API_KEY": "test-key"}  # fmt: skip
    command = [sys.executable, "-m", "bernini_diffusers.cli", "demo", "--model", "tiny", "--port", str(port),
               "--save_dir", str(save_dir), "--use_pe", "--pe_model", "pe-model"]  # fmt: skip
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                pytest.fail(f"the demo exited with {server.returncode}:\n{(tmp_path / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo did not answer at {url}:\n{(tmp_path / 'server.log').read_text()}")
            time.sleep(0.3)
        yield url, save_dir, chat_endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def browser():
    executable = chromium_executable()
    if executable is None:
        pytest.skip("no Chromium executable (/usr/bin/chromium or $BERNINI_CHROMIUM); run scripts/install_browser.sh")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def pick_task(page, task: str):
    page.locator("#task_type input").click()
    label = f"{task}: {TASKS[TaskType(task)].description}"
    page.get_by_role("option", name=label, exact=True).click()


@pytest.mark.timeout(180)
def test_page_in_a_browser(served_demo, browser, tmp_path):
    from playwright.sync_api import expect

    from bernini_diffusers.testing import make_test_image, make_test_video

    url, save_dir, chat_endpoint = served_demo
    video = make_test_video(tmp_path / "in.mp4", num_frames=9, width=48, height=32, fps=16, seed=3)
    image = make_test_image(tmp_path / "in.png", width=48, height=32, seed=4)
    page = browser.new_page()
    page.set_default_timeout(30_000)
    page.goto(url)

    # v2v: the task fills its guidance mode and shows its video input; without a video the page shows the error.
    pick_task(page, "v2v")
    page.wait_for_selector("#video input[type=file]", state="attached")
    expect(page.locator("#guidance_mode input")).to_have_value("v2v_apg")
    expect(page.locator("#image")).to_be_hidden()
    page.locator("#generate").click()
    page.get_by_text("task_type='v2v' requires `video`").wait_for()

    # ... and with one, the result plays in the page, is downloadable, and is the MP4 written to --save_dir.
    page.locator("#video input[type=file]").set_input_files(str(video))
    page.wait_for_selector("#video video")
    page.locator("#prompt textarea").fill("make it red")
    page.locator("#num_inference_steps input").fill("4")
    # The progress bar (fed by the pipeline's step callback) can come and go faster than a poll: record it as the
    # page changes instead.
    page.evaluate(
        """() => {
            window.sawProgress = false;
            new MutationObserver(() => {
                if (document.body.textContent.includes("Denoising")) window.sawProgress = true;
            }).observe(document.body, {subtree: true, childList: true, characterData: true});
        }"""
    )
    page.locator("#generate").click()
    result = page.wait_for_selector("#result_video video[src]", timeout=60_000)
    assert page.evaluate("window.sawProgress"), "no progress bar was shown during sampling"
    served = page.request.get(result.get_attribute("src"))
    assert served.ok and len(served.body()) > 0
    assert page.locator("#download a").first.get_attribute("href")
    expect(page.locator("#prompt_used textarea")).to_have_value(ENHANCED)  # --use_pe rewrote it first
    assert [r["body"]["model"] for r in chat_endpoint.requests] == ["pe-model"]
    (written,) = save_dir.glob("*_v2v_seed42.mp4")
    assert served.body() == written.read_bytes()
    frames, _ = read_video(written)
    assert len(frames) == 9 and frames[0].size == (48, 32)

    # i2i: one source image in, one PNG out, shown as an image.
    pick_task(page, "i2i")
    expect(page.locator("#guidance_mode input")).to_have_value("v2v")
    expect(page.locator("#video")).to_be_hidden()
    page.locator("#image input[type=file]").set_input_files(str(image))
    page.wait_for_selector("#image img")
    page.locator("#generate").click()
    result = page.wait_for_selector("#result_image img[src]", timeout=60_000)
    assert page.request.get(result.get_attribute("src")).ok
    (written,) = save_dir.glob("*_i2i_seed42.png")
    assert Image.open(written).size == (48, 32)
    page.close()


# --- budgets: a request the one worker should not take is refused before it is queued -------------------------


class _Unloaded:  # validate_call only: a request that reaches the model fails the test
    validate_call = BerniniPipeline.validate_call

    def __call__(self, **kwargs):
        raise AssertionError("the request reached the model")


def test_a_request_over_the_token_budget_or_the_step_limit_is_refused_with_the_estimate(tmp_path, monkeypatch):
    monkeypatch.delenv("BERNINI_MAX_TOKENS", raising=False)
    huge = {"task_type": "t2v", "prompt": "p", "num_frames": 253, "height": 1024, "width": 1024,
            "num_inference_steps": 1000}  # fmt: skip
    with pytest.raises(ValueError, match=r"`num_inference_steps`=1000 is more than the demo's limit of 200 steps .*"
                                         r"needs about 262,144 transformer tokens .* for 1000 steps"):
        demo.generate(_Unloaded(), page_values(huge), save_dir=tmp_path)
    with pytest.raises(ValueError, match=r"needs about 262,144 transformer tokens .*more than the limit of 100,000"):
        demo.generate(_Unloaded(), page_values(huge), save_dir=tmp_path, budget=demo.Budget(max_tokens=100_000))
    monkeypatch.setenv("BERNINI_MAX_TOKENS", "1000")  # the command line's variable counts here too
    with pytest.raises(ValueError, match=r"more than the limit of 1,000 tokens"):
        demo.generate(_Unloaded(), page_values({**huge, "num_inference_steps": 2}), save_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_uploads_are_capped_in_size_and_count(tmp_path, media_dir):
    image = str(media_dir / "ref.png") if (media_dir / "ref.png").exists() else str(next(media_dir.glob("*.png")))
    refs = {"task_type": "r2v", "prompt": "p", "images": [image] * 3, **SMALL}
    with pytest.raises(ValueError, match=r"this request has 3 media files, more than the demo's limit of 2"):
        demo.generate(_Unloaded(), page_values(refs), save_dir=tmp_path, budget=demo.Budget(max_uploads=2))
    with pytest.raises(ValueError, match=r"MB, more than the demo's limit of 1e-06 MB per file"):
        demo.generate(_Unloaded(), page_values(refs), save_dir=tmp_path, budget=demo.Budget(max_upload_mb=1e-6))
    for bad in ({"max_steps": 0}, {"max_uploads": True}, {"max_upload_mb": float("inf")}, {"max_tokens": -1}):
        with pytest.raises(ValueError, match=f"`{next(iter(bad))}`="):
            demo.Budget(**bad)


def test_the_page_takes_the_budget(tiny_pipe):
    page = demo.create_demo(tiny_pipe, max_steps=30, max_upload_mb=5, max_uploads=3, max_tokens=4096)
    assert page.budget == demo.Budget(4096, 30, 5, 3) and page.max_file_size == "5mb"
    args = cli.build_parser().parse_args(["demo", "--model", "tiny", "--max_steps", "0"])
    with pytest.raises(ValueError, match="`max_steps`=0 must be an integer >= 1"):
        demo.serve(args)
