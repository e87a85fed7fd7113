"""Tests of the prompt enhancer against a real chat-completions server on 127.0.0.1, started by the tests."""

from __future__ import annotations

import base64
import io
import json
import logging
import subprocess
import sys
import time

import numpy as np
import pytest
from chat_server import ChatServer
from PIL import Image

from bernini_diffusers import cli
from bernini_diffusers import prompt_enhancer as pe
from bernini_diffusers.media import read_video
from bernini_diffusers.prompt_enhancer import PromptEnhancer
from bernini_diffusers.testing import make_test_image, make_test_video

FAKE_KEY = "sk-test-NOT-A-REAL-KEY-7f3a9c"
ENV_NAMES = (
    "BERNINI_PE_API_KEY", "OPENAI_API_KEY", "BERNINI_PE_BASE_URL", "OPENAI_BASE_URL", "BERNINI_PE_MODEL",
    "BERNINI_PE_TIMEOUT", "BERNINI_PE_RETRIES",
)  # fmt: skip


@pytest.fixture
def server():
    chat = ChatServer()
    yield chat
    chat.close()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def enhancer(server):
    return PromptEnhancer(model="test-model", api_key=FAKE_KEY, base_url=server.base_url, timeout=5, backoff=0)


def decode_data_url(url: str) -> np.ndarray:
    header, data = url.split(",", 1)
    assert header.endswith(";base64")
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return np.asarray(image.convert("RGB"))


def user_parts(request: dict) -> list[dict]:
    system, user = request["body"]["messages"]
    assert system["role"] == "system" and user["role"] == "user"
    return user["content"]


def image_urls(request: dict) -> list[str]:
    parts = user_parts(request)
    return [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == pe.__name__ and r.levelno == logging.WARNING]


# --- what each task sends ---------------------------------------------------------------------------------------


def test_t2v_sends_the_director_system_prompt_and_the_raw_prompt(server, enhancer):
    assert enhancer.enhance("a fox in snow", "t2v") == "an enhanced prompt"
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == f"Bearer {FAKE_KEY}"
    body = request["body"]
    assert body["model"] == "test-model" and body["max_completion_tokens"] == 8192
    assert "response_format" not in body
    assert body["messages"] == [
        {"role": "system", "content": pe.T2V_SYSTEM},
        {"role": "user", "content": "a fox in snow"},
    ]


def test_t2i_uses_the_still_image_variant(server, enhancer):
    enhancer.enhance("a lighthouse", "t2i")
    assert server.requests[0]["body"]["messages"][0]["content"] == pe.T2I_SYSTEM != pe.T2V_SYSTEM


def test_v2v_sends_three_evenly_spaced_frames_as_png_data_urls(server, enhancer, tmp_path):
    video = make_test_video(tmp_path / "v.mp4", num_frames=9, width=48, height=32)
    assert enhancer.enhance("make the car red", "v2v", video=str(video)) == "an enhanced prompt"
    (request,) = server.requests
    assert request["body"]["messages"][0]["content"] == pe.HELPFUL_SYSTEM
    parts = user_parts(request)
    assert parts[0]["type"] == "text" and "make the car red" in parts[0]["text"]
    assert [p.get("text") for p in parts[1::2]] == ["\n[Image 0]:", "\n[Image 1]:", "\n[Image 2]:"]
    urls = image_urls(request)
    assert len(urls) == 3 and all(u.startswith("data:image/png;base64,") for u in urls)
    frames, _ = read_video(video)
    for url, index in zip(urls, (0, 4, 8)):  # round(i * (9 - 1) / 2)
        np.testing.assert_array_equal(decode_data_url(url), np.asarray(frames[index]))


def test_mv2v_and_in_memory_frames(server, enhancer):
    frames = [Image.new("RGB", (16, 16), (i * 20, 0, 0)) for i in range(7)]
    enhancer.enhance("make him crouch", "mv2v", video=frames)
    urls = image_urls(server.requests[0])
    assert [decode_data_url(u)[0, 0, 0] for u in urls] == [0, 60, 120]  # frames 0, 3, 6


def test_ads2v_sends_the_insert_video_frames_too(server, enhancer, tmp_path):
    source = make_test_video(tmp_path / "s.mp4", num_frames=9, seed=1)
    insert = make_test_video(tmp_path / "i.mp4", num_frames=5, seed=2)
    enhancer.enhance("place the can on the table", "ads2v", video=[str(source), str(insert)])
    assert len(image_urls(server.requests[0])) == 6


def test_i2i_sends_the_files_with_their_own_mime_type(server, enhancer, tmp_path):
    source = make_test_image(tmp_path / "source.png")
    reference = tmp_path / "ref.jpg"
    Image.new("RGB", (20, 10), (10, 200, 30)).save(reference, format="JPEG")
    enhancer.enhance("make it winter", "i2i", image=str(source), images=[str(reference)])
    urls = image_urls(server.requests[0])
    assert urls[0].startswith("data:image/png;base64,") and urls[1].startswith("data:image/jpeg;base64,")
    assert base64.b64decode(urls[0].split(",", 1)[1]) == source.read_bytes()  # the file's own bytes
    assert "response_format" not in server.requests[0]["body"]


def test_r2v_uses_json_mode_and_reads_rewritten_text(server, enhancer, tmp_path):
    refs = [str(make_test_image(tmp_path / f"r{i}.png", seed=i)) for i in range(2)]
    server.replies.append((200, ChatServer.completion(json.dumps({"rewritten_text": "image0 runs with image1"}))))
    assert enhancer.enhance("the dog runs with the cat", "r2v", images=refs) == "image0 runs with image1"
    body = server.requests[0]["body"]
    assert body["response_format"] == {"type": "json_object"}
    assert len(image_urls(server.requests[0])) == 2
    assert "image0" in user_parts(server.requests[0])[0]["text"]


def test_rv2v_sends_three_source_frames_then_the_references_in_json_mode(server, enhancer, tmp_path):
    video = make_test_video(tmp_path / "v.mp4", num_frames=5)
    ref = make_test_image(tmp_path / "mug.png", seed=3)
    server.replies.append((200, ChatServer.completion('{"rewritten_text": "replace the cup with image0"}')))
    enhanced = enhancer.enhance("swap the cup", "rv2v", video=str(video), images=[str(ref)])
    assert enhanced == "replace the cup with image0"
    urls = image_urls(server.requests[0])
    assert len(urls) == 4
    np.testing.assert_array_equal(decode_data_url(urls[3]), np.asarray(Image.open(ref).convert("RGB")))
    assert server.requests[0]["body"]["response_format"] == {"type": "json_object"}


def test_every_renderer_task_has_a_route():
    from bernini_diffusers.tasks import TaskType

    assert {t.value for t in TaskType} <= set(pe.ROUTES)
    assert {name for name, route in pe.ROUTES.items() if route.json_mode} == {"r2v", "r2i", "rv2v", "vrc2v"}


# --- pass-through and failures ---------------------------------------------------------------------------------


def test_empty_prompt_and_unknown_task_pass_through_without_a_request(server, enhancer, caplog):
    assert enhancer.enhance("", "t2v") == ""
    assert enhancer.enhance("   ", "t2v") == "   "
    assert enhancer.enhance("a cat", "x2y") == "a cat"
    assert server.requests == [] and warnings_of(caplog) == []


def test_build_messages_names_an_unknown_task(enhancer):
    with pytest.raises(ValueError, match="`task_type`='x2y' has no enhancer template; choose one of: t2v, t2i, v2v"):
        enhancer.build_messages("a cat", "x2y")


def test_server_error_is_retried_then_the_raw_prompt_with_one_warning(server, caplog):
    enhancer = PromptEnhancer(api_key=FAKE_KEY, base_url=server.base_url, max_retries=2, backoff=0)
    server.default = (500, {"error": {"message": "overloaded"}})
    assert enhancer.enhance("a cat", "t2v") == "a cat"
    assert len(server.requests) == 3
    (warning,) = warnings_of(caplog)
    assert "500" in warning and "3 attempt" in warning and "raw prompt" in warning


def test_a_retry_that_succeeds_returns_the_enhanced_prompt(server, caplog):
    enhancer = PromptEnhancer(api_key=FAKE_KEY, base_url=server.base_url, max_retries=2, backoff=0)
    server.replies.append((503, {"error": {"message": "busy"}}))
    assert enhancer.enhance("a cat", "t2v") == "an enhanced prompt"
    assert len(server.requests) == 2 and warnings_of(caplog) == []


def test_client_error_is_not_retried(server, caplog):
    enhancer = PromptEnhancer(api_key=FAKE_KEY, base_url=server.base_url, max_retries=3, backoff=0)
    server.default = (400, {"error": {"message": "bad model"}})
    assert enhancer.enhance("a cat", "t2v") == "a cat"
    assert len(server.requests) == 1 and len(warnings_of(caplog)) == 1


def test_backoff_waits_between_attempts(server):
    enhancer = PromptEnhancer(api_key=FAKE_KEY, base_url=server.base_url, max_retries=2, backoff=0.1, max_backoff=0.15)
    server.default = (500, {"error": {"message": "down"}})
    start = time.monotonic()
    enhancer.enhance("a cat", "t2v")
    assert time.monotonic() - start >= 0.1 + 0.15  # min(0.1 * 1, 0.15) + min(0.1 * 2, 0.15)


def test_timeout_falls_back_quickly(server, caplog):
    enhancer = PromptEnhancer(api_key=FAKE_KEY, base_url=server.base_url, timeout=0.2, max_retries=1, backoff=0)
    server.replies.extend([("sleep", 1.0), ("sleep", 1.0)])
    start = time.monotonic()
    assert enhancer.enhance("a cat", "t2v") == "a cat"
    assert time.monotonic() - start < 1.5
    (warning,) = warnings_of(caplog)
    assert "Timeout" in warning


@pytest.mark.parametrize(
    "body",
    [b"<html>not json</html>", b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": ""}}]}'],
    ids=["non-json-body", "empty-content"],
)
def test_malformed_body_falls_back(server, caplog, body):
    enhancer = PromptEnhancer(api_key=FAKE_KEY, base_url=server.base_url, max_retries=1, backoff=0)
    server.default = (200, body)
    assert enhancer.enhance("a cat", "t2v") == "a cat"
    assert len(server.requests) == 2 and len(warnings_of(caplog)) == 1


def test_json_mode_reply_without_rewritten_text_falls_back(server, caplog, tmp_path):
    enhancer = PromptEnhancer(api_key=FAKE_KEY, base_url=server.base_url, max_retries=1, backoff=0)
    server.default = (200, ChatServer.completion('{"prompt": "image0 walks"}'))
    ref = str(make_test_image(tmp_path / "r.png"))
    assert enhancer.enhance("the dog walks", "r2v", images=[ref]) == "the dog walks"
    (warning,) = warnings_of(caplog)
    assert "rewritten_text" in warning


def test_unreadable_media_falls_back(server, enhancer, caplog, tmp_path):
    assert enhancer.enhance("a cat", "v2v", video=str(tmp_path / "missing.mp4")) == "a cat"
    assert server.requests == [] and len(warnings_of(caplog)) == 1


def test_missing_key_warns_once_and_sends_nothing(server, caplog):
    enhancer = PromptEnhancer(base_url=server.base_url)
    assert enhancer.enhance("a cat", "t2v") == "a cat"
    assert enhancer.enhance("a dog", "t2v") == "a dog"
    (warning,) = warnings_of(caplog)
    assert "BERNINI_PE_API_KEY" in warning and server.requests == []


# --- the key stays secret ------------------------------------------------------------------------------------------


def test_the_key_never_reaches_logs_errors_or_repr(server, caplog, capsys):
    caplog.set_level(logging.DEBUG)  # the openai SDK's own debug logs included
    enhancer = PromptEnhancer(api_key=FAKE_KEY, base_url=server.base_url, max_retries=1, backoff=0)
    # An endpoint that echoes the credentials it got in its error body.
    server.default = (401, lambda headers: {"error": {"message": f"invalid key {headers['Authorization']}"}})
    assert enhancer.enhance("a cat", "t2v") == "a cat"
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {FAKE_KEY}"  # it was sent
    captured = capsys.readouterr()
    assert FAKE_KEY not in caplog.text and FAKE_KEY not in captured.err and FAKE_KEY not in captured.out
    assert "***" in "".join(warnings_of(caplog))
    assert FAKE_KEY not in repr(enhancer) and FAKE_KEY not in str(enhancer)
    assert "api_key=<set>" in repr(enhancer)


# --- configuration -------------------------------------------------------------------------------------------------


def test_environment_fallbacks(monkeypatch, server):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    enhancer = PromptEnhancer()
    assert enhancer._api_key == "sk-openai" and enhancer.base_url == "http://127.0.0.1:9/v1"
    assert enhancer.model == pe.DEFAULT_PE_MODEL == "gpt-5.4-2026-03-05"
    monkeypatch.setenv("BERNINI_PE_API_KEY", FAKE_KEY)
    monkeypatch.setenv("BERNINI_PE_BASE_URL", server.base_url)
    monkeypatch.setenv("BERNINI_PE_MODEL", "env-model")
    enhancer = PromptEnhancer(backoff=0)
    assert enhancer.model == "env-model" and enhancer.base_url == server.base_url
    enhancer.enhance("a cat", "t2v")
    request = server.requests[0]
    assert request["body"]["model"] == "env-model" and request["headers"]["authorization"] == f"Bearer {FAKE_KEY}"
    assert PromptEnhancer(model="flag-model").model == "flag-model"  # --pe_model wins over the environment


@pytest.mark.parametrize(
    "kwargs",
    [{"timeout": 0}, {"timeout": -1}, {"timeout": float("nan")}, {"timeout": float("inf")}, {"timeout": True},
     {"timeout": 3601}, {"max_retries": -1}, {"max_retries": 1.5}, {"max_retries": 101}, {"backoff": -1},
     {"backoff": float("nan")}, {"max_backoff": float("inf")}],
)  # fmt: skip
def test_bad_settings_name_the_argument(kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=f"`{name}`"):
        PromptEnhancer(**kwargs)


def test_evenly_spaced_frames():
    assert pe.evenly_spaced(81) == [0, 40, 80]
    assert pe.evenly_spaced(10) == [0, 4, 9]  # round(4.5) == 4, as Python rounds
    assert pe.evenly_spaced(1) == [0, 0, 0]
    with pytest.raises(ValueError):
        pe.evenly_spaced(0)


def test_openai_is_not_imported_with_the_package():
    code = (
        "import sys, bernini_diffusers.prompt_enhancer, bernini_diffusers.cli; "
        "print('openai' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "False"



# --- a dead endpoint costs one budget, once -------------------------------------------------------------------------


def small_budget(server, **kwargs) -> PromptEnhancer:
    """An enhancer whose budget is 1 s: 3 tries of 0.3 s and waits of 0.05 s."""
    kwargs = {"timeout": 0.3, "max_retries": 2, "backoff": 0.05, "max_backoff": 0.05, **kwargs}
    enhancer = PromptEnhancer(model="test-model", api_key=FAKE_KEY, base_url=server.base_url, **kwargs)
    enhancer._get_client()  # importing the SDK (a second or so, once) is this process's time, not the endpoint's
    return enhancer


def timed(call):
    start = time.monotonic()
    value = call()
    return value, time.monotonic() - start


def test_the_default_budget_is_about_a_minute():
    enhancer = PromptEnhancer(api_key=FAKE_KEY)
    assert (enhancer.timeout, enhancer.max_retries, enhancer.backoff) == (20.0, 2, 1.0)
    assert enhancer.budget == 20 * 3 + 1 + 2 == 63
    assert "budget=63" in repr(enhancer)


def test_a_hanging_endpoint_costs_one_budget_then_no_request(server, caplog, tmp_path):
    server.default = ("hang", None)
    enhancer = small_budget(server)
    assert enhancer.budget == pytest.approx(1.0)
    enhanced, seconds = timed(lambda: enhancer.enhance("a cat", "t2v"))
    assert enhanced == "a cat" and 0.9 <= seconds < 1.0 + 0.5
    assert len(server.requests) == 3
    (warning,) = warnings_of(caplog)
    assert server.base_url in warning and "Timeout" in warning and "3 attempt" in warning
    assert "without asking the endpoint again" in warning and "raw prompt" in warning
    video = make_test_video(tmp_path / "v.mp4", num_frames=5)
    for prompt, task, media in [("a dog", "t2v", {}), ("make it red", "v2v", {"video": str(video)})] * 3:
        enhanced, seconds = timed(lambda: enhancer.enhance(prompt, task, **media))
        assert enhanced == prompt and seconds < 0.05
    assert len(server.requests) == 3 and len(warnings_of(caplog)) == 1  # no request, no further warning


def test_a_trickling_endpoint_is_cut_at_the_deadline(server):
    # Headers, then a byte every 50 ms for ever: the HTTP client's per-read timeout alone would never fire.
    server.default = ("trickle", 0.05)
    enhancer = small_budget(server, timeout=0.5, max_retries=0)
    enhanced, seconds = timed(lambda: enhancer.enhance("a cat", "t2v"))
    assert enhanced == "a cat" and seconds < 0.5 + 0.5 and len(server.requests) == 1


def test_the_budget_holds_however_the_tries_are_spent(server):
    # A trickle, an error, a slow answer, then silence: every kind of failure in one prompt.
    server.replies.extend([("trickle", 0.05), (500, {"error": {"message": "down"}}), ("sleep", 0.4)])
    server.default = ("hang", None)
    enhancer = small_budget(server, max_retries=3)
    assert enhancer.budget == pytest.approx(0.3 * 4 + 0.05 * 3)
    enhanced, seconds = timed(lambda: enhancer.enhance("a cat", "t2v"))
    assert enhanced == "a cat" and seconds < enhancer.budget + 0.5 and len(server.requests) == 4


@pytest.mark.parametrize(
    "failure", [(500, {"error": {"message": "down"}}), (401, {"error": {"message": "bad key"}})], ids=["500", "401"]
)
def test_an_endpoint_that_fails_every_try_is_not_asked_again(server, caplog, failure):
    server.default = failure
    enhancer = small_budget(server, max_retries=1, backoff=0)
    assert enhancer.enhance("a cat", "t2v") == "a cat"
    asked = len(server.requests)
    assert asked == (2 if failure[0] == 500 else 1)
    server.default = (200, ChatServer.completion("an enhanced prompt"))  # back, but this run has moved on
    assert enhancer.enhance("a dog", "t2v") == "a dog"
    assert len(server.requests) == asked and len(warnings_of(caplog)) == 1


@pytest.mark.parametrize(
    "failure", [(400, {"error": {"message": "too long"}}), (200, b"<html>not json</html>")], ids=["400", "malformed"]
)
def test_an_endpoint_that_answers_is_asked_again_for_the_next_prompt(server, caplog, failure):
    server.replies.append(failure)
    enhancer = small_budget(server, max_retries=0)
    assert enhancer.enhance("a cat", "t2v") == "a cat"
    assert enhancer.enhance("a dog", "t2v") == "an enhanced prompt"
    assert len(server.requests) == 2 and len(warnings_of(caplog)) == 1


# --- timeout and retries from arguments, the environment and the command line ------------------------------------


def test_timeout_and_retries_from_the_environment(monkeypatch):
    monkeypatch.setenv("BERNINI_PE_TIMEOUT", " 2.5 ")
    monkeypatch.setenv("BERNINI_PE_RETRIES", "0")
    enhancer = PromptEnhancer(api_key=FAKE_KEY)
    assert (enhancer.timeout, enhancer.max_retries, enhancer.budget) == (2.5, 0, 2.5)
    enhancer = PromptEnhancer(api_key=FAKE_KEY, timeout=7, max_retries=3)  # arguments win
    assert (enhancer.timeout, enhancer.max_retries) == (7.0, 3)
    monkeypatch.setenv("BERNINI_PE_TIMEOUT", "")  # empty: unset
    assert PromptEnhancer(api_key=FAKE_KEY).timeout == 20.0


@pytest.mark.parametrize(
    "name, value",
    [("BERNINI_PE_TIMEOUT", "soon"), ("BERNINI_PE_TIMEOUT", "nan"), ("BERNINI_PE_TIMEOUT", "-1"),
     ("BERNINI_PE_TIMEOUT", "0"), ("BERNINI_PE_TIMEOUT", "inf"), ("BERNINI_PE_RETRIES", "two"),
     ("BERNINI_PE_RETRIES", "-1"), ("BERNINI_PE_RETRIES", "1.5"), ("BERNINI_PE_RETRIES", "1000")],
)  # fmt: skip
def test_a_bad_environment_value_is_refused_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"`{name}`={value!r} must be"):
        PromptEnhancer(api_key=FAKE_KEY)
    with pytest.raises(ValueError, match=f"`{name}`"):  # the command line builds it before the model loads
        cli.load_prompt_enhancer(cli.build_parser().parse_args(["generate", "--use_pe"]))


@pytest.mark.parametrize("command", ["generate", "demo"])
def test_both_commands_take_the_timeout_and_retry_flags(command, monkeypatch):
    monkeypatch.setenv("BERNINI_PE_TIMEOUT", "99")
    monkeypatch.setenv("BERNINI_PE_RETRIES", "9")
    parser = cli.build_parser()
    flags = [command, "--use_pe", "--pe_timeout", "5", "--pe_retries", "0"]
    enhancer = cli.load_prompt_enhancer(parser.parse_args(flags))
    assert (enhancer.timeout, enhancer.max_retries) == (5.0, 0)  # the flags win over the environment
    enhancer = cli.load_prompt_enhancer(parser.parse_args([command, "--use_pe"]))
    assert (enhancer.timeout, enhancer.max_retries) == (99.0, 9)


@pytest.mark.parametrize(
    "flag, value",
    [("--pe_timeout", "nan"), ("--pe_timeout", "-3"), ("--pe_timeout", "0"), ("--pe_timeout", "inf"),
     ("--pe_timeout", "ten"), ("--pe_retries", "-1"), ("--pe_retries", "2.5"), ("--pe_retries", "many"),
     ("--pe_retries", "101")],
)  # fmt: skip
@pytest.mark.parametrize("command", ["generate", "demo"])
def test_a_bad_flag_value_is_refused_naming_the_flag(command, flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args([command, "--use_pe", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {value!r} is not" in capsys.readouterr().err


# --- credentials never shown, replies printed safely --------------------------------------------------------------

URL_PASSWORD = "pw-SECRET-1f2e"
QUERY_KEY = "QUERY-SECRET-9d8c"


def test_credentials_in_the_base_url_are_sent_but_never_shown(server, caplog, capsys):
    caplog.set_level(logging.DEBUG)  # the HTTP stack's own debug logs, with full request URLs, included
    url = server.base_url.replace("http://", f"http://alice:{URL_PASSWORD}@") + f"?api_key={QUERY_KEY}&mode=x"
    enhancer = PromptEnhancer(api_key=FAKE_KEY, base_url=url, max_retries=1, backoff=0)

    def echo(headers):  # an endpoint that echoes what it got in its error body
        return {"error": {"message": f"denied {headers['Authorization']} at {server.requests[-1]['path']}"}}

    server.default = (500, echo)
    assert enhancer.enhance("a cat", "t2v") == "a cat"
    request = server.requests[0]
    assert request["path"] == f"/v1/chat/completions?api_key={QUERY_KEY}&mode=x"  # the query reaches the server
    basic = base64.b64encode(f"alice:{URL_PASSWORD}".encode()).decode()
    assert request["headers"]["authorization"] == f"Basic {basic}"  # so do the URL's credentials
    shown = [repr(enhancer), str(enhancer), enhancer.base_url, caplog.text, *capsys.readouterr()]
    for secret in (URL_PASSWORD, QUERY_KEY, basic.rstrip("="), FAKE_KEY):
        assert all(secret not in text for text in shown), secret
    assert enhancer.base_url == server.base_url.replace("http://", "http://***@") + "?api_key=***&mode=***"
    (warning,) = warnings_of(caplog)
    assert "denied Basic ***" in warning


@pytest.mark.parametrize("logger_name", ["httpx2", "openai._base_client", "bernini_diffusers.prompt_enhancer"])
def test_a_logged_traceback_is_masked(server, caplog, logger_name):
    url = server.base_url.replace("http://", f"http://alice:{URL_PASSWORD}@") + f"?api_key={QUERY_KEY}"
    PromptEnhancer(api_key=FAKE_KEY, base_url=url)
    try:
        raise ConnectionError(f"cannot reach {url} with {FAKE_KEY}")
    except ConnectionError:
        logging.getLogger(logger_name).exception("request to %s failed", url)
    assert "ConnectionError: cannot reach http://***@" in caplog.text and "request to http://***@" in caplog.text
    assert all(secret not in caplog.text for secret in (URL_PASSWORD, QUERY_KEY, FAKE_KEY))


def test_a_token_as_url_user_name_is_masked(server):
    enhancer = PromptEnhancer(api_key=FAKE_KEY, base_url=server.base_url.replace("http://", "http://tok-abc123@"))
    assert "tok-abc123" not in repr(enhancer) and "http://***@127.0.0.1" in repr(enhancer)


@pytest.mark.parametrize("source", ["argument", "environment"])
def test_a_bad_base_url_is_refused_without_its_credentials(monkeypatch, source):
    url = f"ftp://alice:{URL_PASSWORD}@example.com/v1?api_key={QUERY_KEY}"
    name = "base_url" if source == "argument" else "BERNINI_PE_BASE_URL"
    if source == "environment":
        monkeypatch.setenv(name, url)
    with pytest.raises(ValueError) as error:
        PromptEnhancer(api_key=FAKE_KEY, base_url=url if source == "argument" else None)
    text = str(error.value)
    assert f"`{name}`='ftp://***@example.com/v1?api_key=***' must be an http(s) URL" in text
    assert URL_PASSWORD not in text and QUERY_KEY not in text


def test_unknown_tokens_in_echoed_errors_are_masked():
    text = "denied Bearer abc123XYZ987 for https://bob:hunter22@h/v1?token=t0k3n-value&x=1, key=k-998877"
    masked = pe.mask_secrets(text)
    assert masked == "denied Bearer *** for https://***@h/v1?token=***&x=1, key=***"
    assert pe.mask_secrets("Basic authentication failed") == "Basic authentication failed"  # words stay


def test_printable_escapes_control_characters():
    reply = "\x1b[2J\x1b]0;owned\x07a red car\rfake line\nnext\x9b31m \u202egnp.exe\t\x00"
    shown = pe.printable(reply)
    assert shown == r"\x1b[2J\x1b]0;owned\x07a red car\rfake line\nnext\x9b31m \u202egnp.exe\t\x00"
    assert shown.isprintable()
    plain = "Un café à Zürich, 東京の夜, 👩‍👩‍👧 «quotes»"
    assert pe.printable(plain) == plain  # text, accents, scripts and emoji sequences stay as they are


def test_an_echoed_error_with_terminal_escapes_is_logged_escaped(server, caplog):
    server.default = (400, {"error": {"message": "bad\x1b[2J\x1b[31m request\rOK"}})
    enhancer = small_budget(server)
    assert enhancer.enhance("a cat", "t2v") == "a cat"
    (warning,) = warnings_of(caplog)
    assert "\x1b" not in warning and "\r" not in warning and r"bad\x1b[2J\x1b[31m request\rOK" in warning
