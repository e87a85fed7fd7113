"""Credentials never reach a message: masking for errors, log records, warnings and tracebacks (standard library only).

`mask_secrets` replaces with `***` every credential this process knows (`add_secret`: the prompt enhancer's key and
URL credentials, `--token` values) and those of the environment (`HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`,
`OPENAI_API_KEY`, `BERNINI_PE_API_KEY`), and anything shaped like one: Hugging Face tokens (`hf_...`), OpenAI keys
(`sk-...`), `Authorization` header values, `Bearer`/`Basic` tokens, URL user info and `token=`/`key=`-style query
values. `protect_output` makes a front end (the CLI, the demo, the server) mask everything it prints: log records of
every handler, warnings and uncaught tracebacks. `printable` escapes the control characters of text from elsewhere
(an endpoint's reply) before it is shown.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Iterable, Sequence
from urllib.parse import unquote, unquote_plus

# Every credential made known in this process (`add_secret`), masked wherever it appears.
_SECRETS: set[str] = set()
# Shorter values are too common to mask in free text, and too short to be credentials.
_MIN_SECRET = 4
# Environment variables that hold credentials a message may echo (a mirror answering with the request's headers).
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "BERNINI_PE_API_KEY")
# Flags whose value is a credential (`--token hf_...` or `--token=hf_...`).
SECRET_FLAGS = ("--token", "--api_key", "--pe_api_key")

_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@?#'\"]+@")
# A token after `Bearer`/`Basic` when it looks like one (holds a digit, `+`, `/` or `=`): words ("Basic
# authentication failed") stay.
_AUTH_HEADER = re.compile(r"\b(Bearer|Basic)\s+(?=[A-Za-z._~+/=-]*[0-9+/=])[A-Za-z0-9._~+/=-]{8,}")
# The value of an `Authorization` header however it is written: `Authorization: ...`, `'authorization': '...'`.
_AUTHORIZATION = re.compile(r"\b((?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)(?:[A-Za-z]+\s+)?[^\s\"',;}]+", re.I)
_SECRET_PARAM = re.compile(
    r"\b((?:api[_-]?key|access[_-]?token|token|key|password|passwd|secret|signature|sig)=)[^&\s'\"#,;)]+", re.I
)
# Hugging Face user/org tokens (`hf_` and 34 letters and digits) and OpenAI-style keys (`sk-...`, `sk-proj-...`).
_TOKEN_SHAPES = re.compile(r"\b(?:hf_[A-Za-z0-9]{16,}|sk-[A-Za-z0-9_-]{16,})\b")


def secret_forms(value: str | None) -> set[str]:
    """A credential as written and as percent-decoded, if long enough to be one."""
    forms = {value, unquote(value), unquote_plus(value)} if value else set()
    return {form for form in forms if len(form) >= _MIN_SECRET}


def add_secret(*values: str | None) -> None:
    """Mask `values` (and their percent-decoded forms) in every later message of this process."""
    for value in values:
        _SECRETS.update(secret_forms(value))


def secrets_from_argv(argv: Sequence[str]) -> list[str]:
    """The values of credential flags (`SECRET_FLAGS`) in a command line, written `--token VALUE` or `--token=VALUE`."""
    found = []
    for i, arg in enumerate(argv):
        flag, equals, value = str(arg).partition("=")
        if flag in SECRET_FLAGS:
            if equals:
                found.append(value)
            elif i + 1 < len(argv):
                found.append(str(argv[i + 1]))
    return found


def mask_secrets(text: str) -> str:
    """`text` with every known credential, token-shaped value, `Authorization` value, URL user info, `Bearer`/`Basic`
    token and `key=...` value as `***`."""
    text = str(text)
    known = set(_SECRETS)  # a copy: another thread may add to the set
    for name in SECRET_ENV:
        known |= secret_forms(os.environ.get(name))
    for secret in sorted(known, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = _TOKEN_SHAPES.sub("***", text)
    text = _AUTHORIZATION.sub(r"\1***", text)
    text = _USERINFO.sub(r"\1***@", text)
    text = _AUTH_HEADER.sub(r"\1 ***", text)
    return _SECRET_PARAM.sub(r"\1***", text)


# C0 and C1 controls (ANSI escapes, carriage returns, ...), line and paragraph separators, and the bidirectional
# overrides that make a terminal show text other than what it holds.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    r"""`text` safe to print on a terminal: control characters escaped as Python writes them (`\x1b`, `\r`, `\n`)."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), str(text))


class MaskSecrets(logging.Filter):
    """Masks credentials in a record (message, traceback, stack), whichever library logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is for logging to report
            return True
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            if mask_secrets(text) != text:
                record.exc_text = mask_secrets(text)
        elif record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_secrets(record.stack_info)
        return True


MASK = MaskSecrets()
# The loggers whose records a front end may print: the package, the libraries it drives, the HTTP stack.
LOGGERS = (
    "bernini_diffusers", "diffusers", "transformers", "huggingface_hub", "accelerate", "openai", "httpx", "httpcore",
    "urllib3", "requests", "gradio", "uvicorn", "uvicorn.error", "uvicorn.access", "fastapi",
)  # fmt: skip


def guard_loggers(names: Iterable[str] = ()) -> None:
    """Attach the masking filter to the named loggers (and `LOGGERS`), the root logger, and all their handlers.

    A logger's filter sees only records logged on that logger; a handler's filter sees every record it prints,
    propagated ones included, so both are guarded.
    """
    for name in (None, *LOGGERS, *names):
        target = logging.getLogger(name)
        for owner in (target, *target.handlers):
            if MASK not in owner.filters:
                owner.addFilter(MASK)


def mask_exception(err: BaseException) -> BaseException:
    """Mask the string arguments of `err` and of the exceptions it was raised from or during, in place (so that a
    traceback printed later by anyone shows no credential); returns `err`."""
    seen, current = set(), err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        try:
            current.args = tuple(mask_secrets(a) if isinstance(a, str) else a for a in current.args)
        except Exception:  # an exception type whose args cannot be set: the excepthook still masks what it prints
            pass
        notes = getattr(current, "__notes__", None)
        if isinstance(notes, list):
            notes[:] = [mask_secrets(n) if isinstance(n, str) else n for n in notes]
        current = current.__cause__ or current.__context__
    return err


def _excepthook(exc_type, exc, tb) -> None:
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    sys.stderr.write(mask_secrets(text))


def _masked(showwarning):
    """`showwarning` with the warning's message masked (`warnings.showwarning` is the hook that prints warnings)."""

    def show(message, category, filename, lineno, file=None, line=None):
        showwarning(mask_secrets(str(message)), category, filename, lineno, file, line)

    show.masks = True
    return show


def protect_output(argv: Sequence[str] = ()) -> None:
    """Mask credentials in everything this process prints from now on: `--token`-style values of `argv` become known
    secrets, and log records, warnings and uncaught tracebacks are masked. Idempotent; a front end calls it first."""
    add_secret(*secrets_from_argv(argv))
    guard_loggers()
    sys.excepthook = _excepthook
    if not getattr(warnings.showwarning, "masks", False):
        warnings.showwarning = _masked(warnings.showwarning)
