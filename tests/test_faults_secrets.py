"""No credential in any message: a Hub mirror that echoes the `Authorization` header into its errors, `--token`,
`$HF_TOKEN`, and token-shaped text in errors, log records, warnings and tracebacks; Hub failures exit 1.

The mirror is a small HTTP server on 127.0.0.1 in a thread of the test (`HF_ENDPOINT` points the child at it).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from bernini_diffusers import cli, redaction
from bernini_diffusers import prompt_enhancer as pe

ENV_TOKEN = "hf_EnvTokenAbcdefghijklmnopqrstuvwxyz12"
FLAG_TOKEN = "hf_FlagTokenAbcdefghijklmnopqrstuvwxyz1"


class _Echo(BaseHTTPRequestHandler):
    """Answers every request 403 with the request's Authorization header in the body and in X-Error-Message."""

    def _deny(self, body: bool = True) -> None:
        message = f"denied for Authorization: {self.headers.get('Authorization', '')}"
        data = json.dumps({"error": message}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self):
        self._deny()

    def do_HEAD(self):
        self._deny(body=False)

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


# Runs each command line in one process (the imports once) and prints [exit status, everything printed] per line;
# an exception escaping `main` (--debug) goes to sys.excepthook, as it would at the top of `bernini`.
CHILD = """
    import contextlib, io, json, sys
    from bernini_diffusers.cli import main

    results = []
    for argv in json.loads(sys.argv[1]):
        printed = io.StringIO()
        with contextlib.redirect_stderr(printed), contextlib.redirect_stdout(printed):
            try:
                status = main(argv)
            except BaseException as err:
                sys.excepthook(type(err), err, err.__traceback__)
                status = 1
        results.append([status, printed.getvalue()])
    print(json.dumps(results))
"""


def test_a_mirror_echoing_the_token_shows_it_nowhere_and_exits_1(mirror, tmp_path):
    generate = ["generate", "--model", "owner/repo", "--prompt", "p", "--task_type", "t2v"]
    generate += ["--output", str(tmp_path / "out.mp4")]
    export = ["export", "--base", "owner/base", "--high_noise_ckpt", "owner/ckpt/high", "--low_noise_ckpt"]
    export += ["owner/ckpt/low", "--out", str(tmp_path / "export"), "--token", FLAG_TOKEN]
    runs = [generate, [*generate, "--debug"], export, [*export, "--debug"]]
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    env = {**os.environ, "HF_ENDPOINT": mirror, "HF_TOKEN": ENV_TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    child = subprocess.run(
        [sys.executable, str(script), json.dumps(runs)], env=env, capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr
    everything = child.stdout + child.stderr
    assert ENV_TOKEN not in everything and FLAG_TOKEN not in everything
    assert "hf_EnvToken" not in everything and "hf_FlagToken" not in everything
    results = json.loads(child.stdout.splitlines()[-1])
    for argv, (status, printed) in zip(runs, results):
        assert status == 1, (argv, printed)  # the Hub failing is the environment, not a bad flag
        assert "403 Forbidden: denied for Authorization: ***" in printed, printed  # the mirror did echo it
        if "--debug" in argv:
            assert "Traceback" in printed
        else:
            (line,) = [line for line in printed.splitlines() if line.startswith("bernini: error:")]
            assert "Hub repo could not be read" in line and line.endswith("shows the traceback)")
    assert "='owner/repo' is not a local folder" in results[0][1] and "--base='owner/base'" in results[2][1]
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "export").exists()


@pytest.mark.parametrize(
    "text, kept",
    [
        (f"403: denied for Authorization: Bearer {FLAG_TOKEN}", "403: denied for Authorization: ***"),
        (f"{{'authorization': 'Bearer {FLAG_TOKEN}'}}", "{'authorization': '***'}"),
        (f"token {FLAG_TOKEN} refused", "token *** refused"),
        ("key sk-proj-Abcdefghijklmnopqrstuvwx refused", "key *** refused"),
        ("GET https://user:pw@host/x?token=abcd1234", "GET https://***@host/x?token=***"),
        ("Bearer abc.DEF-123_456 refused", "Bearer *** refused"),
        ("hf_hub_download failed; Basic authentication failed", "hf_hub_download failed; Basic authentication failed"),
    ],
)
def test_mask_secrets_shapes(text, kept):
    assert redaction.mask_secrets(text) == kept
    assert pe.mask_secrets is redaction.mask_secrets and pe.printable is redaction.printable  # the old names


def test_known_secrets_env_and_flags_are_masked(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "plain-secret-value")  # not token-shaped: masked because it is $HF_TOKEN
    assert redaction.mask_secrets("got plain-secret-value back") == "got *** back"
    assert redaction.secrets_from_argv(["export", "--token", "a-b-c-d", "--token=e-f-g-h"]) == ["a-b-c-d", "e-f-g-h"]
    redaction.add_secret("flag-secret-value")
    assert redaction.mask_secrets("x flag-secret-value y") == "x *** y"


def test_logs_warnings_and_tracebacks_are_masked(monkeypatch, capsys):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args, **kwargs: shown.append(str(message)))
    redaction.protect_output([])
    stream = logging.StreamHandler(sys.stderr)
    logger = logging.getLogger("huggingface_hub.some.module")
    logging.getLogger("huggingface_hub").addHandler(stream)
    try:
        redaction.guard_loggers()  # a handler added after protect_output: guarded on the next call
        logger.warning("retrying with Authorization: Bearer %s", FLAG_TOKEN)
        try:
            raise RuntimeError(f"echoed {FLAG_TOKEN}")
        except RuntimeError:
            logger.exception("failed")
        warnings.showwarning(UserWarning(f"token {FLAG_TOKEN}"), UserWarning, "x.py", 1)
        err = RuntimeError(f"echoed {FLAG_TOKEN}")
        sys.excepthook(type(err), err, None)
    finally:
        logging.getLogger("huggingface_hub").removeHandler(stream)
    printed = capsys.readouterr().err
    assert FLAG_TOKEN not in printed and printed.count("***") == 3, printed
    assert shown == ["token ***"]


def test_hub_errors_wrapped_in_a_flag_error_exit_1():
    try:
        try:
            raise LocalEntryNotFoundError("outgoing traffic has been disabled")
        except LocalEntryNotFoundError as err:
            raise FileNotFoundError(f"`base`='o/r' could not be read ({err})") from err
    except FileNotFoundError as err:
        status, line = cli._failure(err)
    assert status == 1 and line.startswith("FileNotFoundError: --base='o/r' could not be read")
    status, line = cli._failure(FileNotFoundError("`video`='clip.mp4' does not exist."))
    assert status == 2  # a missing local file is still the user's
