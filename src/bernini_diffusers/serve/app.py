"""The HTTP side of `bernini serve`: OpenAI's videos API (and `/health`, `/v1/status`) as a FastAPI app.

Requests are checked (`calls.build_job`: the pipeline's own `validate_call` and the size budget) and queued in the
job store; workers (`worker.Worker`) run them. Responses are OpenAI's `video` object, list page, deletion object and
error object, so the official `openai` SDK parses every one of them. FastAPI (the `[serve]` extra) is imported when the
app is built.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (`request: Request`) as objects, and
# `Request` is imported inside `create_app`, where a string annotation could not be resolved.
import functools
import hmac
import math
import mimetypes
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .calls import EXTRA_FIELDS, MEDIA_FIELDS, RequestError, build_job
from .store import COMPLETED, FAILED, IN_PROGRESS, QUEUED, Job, JobStore, QueueFull, new_job_id
from .worker import remove_files

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif")
_JOB_ID = re.compile(r"^video_[0-9a-f]{32}$")
# Form fields the SDK nests (`video={"id": ...}` is sent as `video[id]`, a list `x` as `x[]`).
_FORM_KEY = re.compile(r"^([A-Za-z_]+)(?:\[(\w*)\])?$")


@dataclass
class Settings:
    r"""
    What the app needs to know of the server.

    Args:
        model (`str`): The model id shown in every `video` object.
        defaults (`dict`): The size defaults of a request (`num_frames`, `height`, `width`, `max_image_size`,
            `num_inference_steps`).
        max_tokens (`int`): The size budget of one job's longest guidance branch.
        rope_length (`int`, *optional*): The model's rope table per axis, if known.
        max_queue (`int`): Queued jobs beyond which a create is answered 429.
        max_upload_bytes (`int`): The largest upload accepted, per file.
        api_key (`str`, *optional*): The bearer key every endpoint but `/health` requires.
        poll_after_ms (`int`): The `openai-poll-after-ms` hint of an unfinished job (the SDK's poll interval).
        workers (`int`): How many jobs run at once (data-parallel groups).
        wake (`Callable`, *optional*): Called after a job is queued (wakes an idle worker).
    """

    model: str
    defaults: dict[str, Any]
    max_tokens: int
    rope_length: int | None = None
    max_queue: int = 64
    max_upload_bytes: int = 64 * 2**20
    api_key: str | None = None
    poll_after_ms: int = 1000
    workers: int = 1
    wake: Callable[[], None] | None = None
    running: Callable[[], list[str]] = field(default=lambda: [])


def video_object(job: Job) -> dict[str, Any]:
    """OpenAI's `video` object of a job."""
    error = None
    if job.status == FAILED and job.error:
        error = {"code": job.error.get("code", "failed"), "message": job.error.get("message", "")}
    return {
        "id": job.id, "object": "video", "status": job.status, "progress": job.progress, "created_at": job.created_at,
        "completed_at": job.completed_at, "expires_at": None, "model": job.model, "prompt": job.prompt,
        "seconds": job.seconds, "size": job.size, "error": error, "remixed_from_video_id": job.remixed_from,
    }  # fmt: skip


def _body_schema(files: dict[str, str], openai_fields: tuple[str, ...] = ("prompt", "model", "seconds", "size")):
    """The OpenAPI request body of a create-like route: OpenAI's fields and Bernini's, as JSON or multipart (with
    `files`: upload field -> description). The routes read the body themselves, so FastAPI cannot infer it."""
    kinds = {str: {"type": "string"}, int: {"type": "integer"}, float: {"type": "number"},
             list: {"type": "array", "items": {"type": "number"}}}  # fmt: skip
    fields = {name: {"type": "string"} for name in openai_fields}
    fields.update({name: dict(kinds[kind]) for name, kind in EXTRA_FIELDS.items()})
    uploads = {name: {"type": "string", "format": "binary", "description": text} for name, text in files.items()}
    required = ["prompt"] if "prompt" in fields else []
    json_schema = {"type": "object", "required": required, "properties": fields}
    form_schema = {"type": "object", "required": required, "properties": {**fields, **uploads}}
    content = {"application/json": {"schema": json_schema}}
    if files:
        content["multipart/form-data"] = {"schema": form_schema}
    return {"requestBody": {"required": True, "content": content}}


def _not_found(job_id: str) -> RequestError:
    return RequestError(f"No video found with id '{job_id}'.", "video_id", status=404, code="not_found")


def create_app(store: JobStore, settings: Settings):
    """The FastAPI app of a server whose jobs live in `store` (see `Settings`)."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def _error_response(err: RequestError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    app = FastAPI(
        title="Bernini-R video API",
        description="OpenAI-compatible videos API (`client.videos.*` of the openai SDK) over one Bernini-R pipeline.",
        version="1",
    )

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError):
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        param = str(first.get("loc", ["", ""])[-1]) or None
        return _error_response(RequestError(f"`{param}`: {first.get('msg', 'invalid value')}.", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        kind = "invalid_request_error"
        body = {"error": {"message": str(err.detail), "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.middleware("http")
    async def _authorize(request: Request, call_next):
        if settings.api_key and request.url.path != "/health":
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.api_key.encode()):
                err = RequestError(
                    "Missing or wrong API key: send `Authorization: Bearer <key>`.", None, status=401,
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
                return _error_response(err)
        return await call_next(request)

    # ------------------------------------------------------------------------------------------ reading a body

    async def read_body(request: Request) -> tuple[dict[str, Any], dict[str, list]]:
        """The fields and the uploaded files of a JSON or multipart body (form keys `x[]` and `x[id]` unnested)."""
        content_type = request.headers.get("content-type", "")
        length = request.headers.get("content-length")
        limit = settings.max_upload_bytes * 4 + 2**20
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestError(
                f"The request body of {int(length):,} bytes is over this server's limit of {limit:,}.", None,
                status=413, code="request_too_large",
            )  # fmt: skip
        if content_type.startswith("application/json"):
            try:
                body = await request.json()
            except ValueError:
                raise RequestError("The body is not valid JSON.", None) from None
            if not isinstance(body, dict):
                raise RequestError("The body must be a JSON object.", None)
            return body, {}
        if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            if not (await request.body()).strip():
                return {}, {}
            raise RequestError(f"Unsupported content type {content_type!r}: send JSON or multipart/form-data.", None)
        form = await request.form(max_files=16, max_fields=200)
        fields: dict[str, Any] = {}
        files: dict[str, list] = {}
        for key, value in form.multi_items():
            match = _FORM_KEY.match(key)
            if match is None:
                raise RequestError(f"Unknown form field {key!r}.", key)
            name, inner = match.group(1), match.group(2)
            if isinstance(value, UploadFile):
                files.setdefault(name, []).append(value)
            elif inner:  # `video[id]`: a reference object
                fields.setdefault(name, {})[inner] = value
            elif inner == "":  # `x[]`: one item of a list
                fields.setdefault(name, []).append(value)
            else:
                fields[name] = value
        return fields, files

    def save_upload(upload, name: str, suffixes: tuple[str, ...]) -> str:
        """Store an upload under `uploads/` with a generated name; returns its path relative to the jobs folder."""
        suffix = Path(upload.filename or "").suffix.lower()
        if suffix not in suffixes:
            suffix = mimetypes.guess_extension(upload.content_type or "") or ""
            suffix = {".jpe": ".jpg"}.get(suffix, suffix)
        if suffix not in suffixes:
            raise RequestError(
                f"`{name}`: the upload {upload.filename!r} ({upload.content_type}) is not one of "
                f"{', '.join(suffixes)}.", name,
            )  # fmt: skip
        target = store.uploads_dir / f"{uuid.uuid4().hex}{suffix}"
        size = 0
        upload.file.seek(0)
        with open(target, "wb") as out:
            while chunk := upload.file.read(2**20):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    out.close()
                    target.unlink(missing_ok=True)
                    raise RequestError(
                        f"`{name}`: the upload is over this server's limit of {settings.max_upload_bytes:,} bytes.",
                        name, status=413, code="upload_too_large",
                    )  # fmt: skip
                out.write(chunk)
        return str(target.relative_to(store.root))

    def copy_output(job_id: Any, name: str) -> str:
        """A finished job's video, linked (or copied) into `uploads/` so the new job keeps it if that one is deleted."""
        if isinstance(job_id, dict):
            job_id = job_id.get("id")
        if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
            raise RequestError(
                f"`{name}` takes an uploaded file or a video id (`{{\"id\": \"video_...\"}}`), not {job_id!r}: paths "
                "and URLs are not read.", name,
            )  # fmt: skip
        job = store.get(job_id)
        if job is None:
            raise _not_found(job_id)
        if job.status != COMPLETED or not job.output or not job.output.endswith(".mp4"):
            raise RequestError(f"`{name}`: video '{job_id}' is {job.status}, not a completed video.", name)
        target = store.uploads_dir / f"{uuid.uuid4().hex}.mp4"
        try:
            os.link(store.root / job.output, target)
        except OSError:
            shutil.copyfile(store.root / job.output, target)
        return str(target.relative_to(store.root))

    def create(fields: dict[str, Any], files: dict[str, list], *, video_from: str | None = None,
               needs_video: bool = False, remixed_from: str | None = None) -> dict[str, Any]:  # fmt: skip
        """Store the media, check the request and queue it (runs in a worker thread: media are probed)."""
        saved: list[str] = []
        try:
            media: dict[str, Any] = {}
            for name in ("images", "input_reference"):
                if name in fields:
                    raise RequestError(
                        f"`{name}` takes uploaded files only (multipart); paths, URLs and file ids are not read.", name
                    )
            for name, uploads in files.items():
                if name not in MEDIA_FIELDS:
                    raise RequestError(f"Unexpected file field `{name}`; files go in {', '.join(MEDIA_FIELDS)}.", name)
                if name != "images" and len(uploads) > 1:
                    raise RequestError(f"`{name}` takes one file, got {len(uploads)}.", name)
                suffixes = VIDEO_SUFFIXES if name == "video" else IMAGE_SUFFIXES
                paths = [save_upload(upload, name, suffixes) for upload in uploads]
                saved += paths
                media[name] = paths if name == "images" else paths[0]
            if "video" in fields:
                if "video" in media:
                    raise RequestError("`video`: give an upload or a video id, not both.", "video")
                media["video"] = copy_output(fields.pop("video"), "video")
                saved.append(media["video"])
            if video_from is not None:
                media["video"] = copy_output(video_from, "video_id")
                saved.append(media["video"])
            if needs_video and "video" not in media:
                raise RequestError("`video` is required: an uploaded video or a completed video's id.", "video")
            root = store.root
            absolute = {
                name: [str(root / p) for p in value] if isinstance(value, list) else str(root / value)
                for name, value in media.items()
            }
            spec = build_job(
                fields, absolute, defaults=settings.defaults, max_tokens=settings.max_tokens,
                rope_length=settings.rope_length,
            )
            # The check read the files through absolute paths; the store keeps them relative to the jobs folder.
            for name in ("video", "images"):
                value = spec.call.get(name)
                if value is not None:
                    relative = [str(Path(p).relative_to(root)) for p in (value if isinstance(value, list) else [value])]
                    spec.call[name] = relative if isinstance(value, list) else relative[0]
            job = store.add(
                job_id=new_job_id(), model=settings.model, prompt=spec.call["prompt"], seconds=spec.seconds,
                size=spec.size, call=spec.call, steps=spec.steps, uploads=saved, remixed_from=remixed_from,
                max_queue=settings.max_queue,
            )  # fmt: skip
        except QueueFull:
            for path in saved:
                (store.root / path).unlink(missing_ok=True)
            raise RequestError(
                f"The queue is full ({settings.max_queue} jobs waiting); retry later.", None, status=429,
                code="queue_full", kind="rate_limit_error", headers={"Retry-After": str(retry_after())},
            ) from None  # fmt: skip
        except BaseException:
            for path in saved:
                (store.root / path).unlink(missing_ok=True)
            raise
        if settings.wake is not None:
            settings.wake()
        return video_object(job)

    def retry_after() -> int:
        mean = store.mean_duration() or 5.0
        waiting = store.counts().get(QUEUED, 0)
        return int(min(3600, max(1, math.ceil(mean * max(waiting, 1) / max(settings.workers, 1)))))

    async def in_thread(function, *args, **kwargs):
        return await anyio.to_thread.run_sync(functools.partial(function, *args, **kwargs))

    def with_poll_hint(job: Job) -> JSONResponse:
        headers = {}
        if job.status in (QUEUED, IN_PROGRESS):
            headers["openai-poll-after-ms"] = str(settings.poll_after_ms)
        return JSONResponse(video_object(job), headers=headers)

    # ------------------------------------------------------------------------------------------ routes

    @app.get("/health", tags=["service"])
    async def health():
        """Liveness: 200 while the server runs (no key needed)."""
        return {"status": "ok"}

    @app.get("/v1/status", tags=["service"])
    async def status():
        """Queue length, running jobs and busy/idle: what a load balancer reads."""
        counts = await in_thread(store.counts)
        running = [job.id for job in await in_thread(store.running)]
        queued = counts.get(QUEUED, 0)
        return {
            "object": "status", "status": "busy" if running or queued else "idle", "model": settings.model,
            "queued": queued, "running": running, "workers": settings.workers, "max_queue": settings.max_queue,
            "completed": counts.get(COMPLETED, 0), "failed": counts.get(FAILED, 0),
            "accepting": queued < settings.max_queue,
        }  # fmt: skip

    reference = {"input_reference": "an image: the first reference (r2v unless task_type says otherwise)",
                 "images": "more reference images (repeat the field as images[])"}  # fmt: skip

    @app.post("/v1/videos", tags=["videos"], openapi_extra=_body_schema(reference))
    async def create_video(request: Request):
        """`client.videos.create`: prompt, seconds, size, an `input_reference` image upload (-> r2v), and Bernini's
        arguments in the same body (`task_type`, `negative_prompt`, omegas, `num_inference_steps`, `seed`, ...)."""
        fields, files = await read_body(request)
        return await in_thread(create, fields, files)

    @app.post("/v1/videos/edits", tags=["videos"], openapi_extra=_body_schema(
        {"video": "the source video (or the form field video[id] naming a completed video)"}))
    async def edit_video(request: Request):
        """`client.videos.edit`: prompt + an uploaded video (or `video[id]` of a completed one) -> v2v."""
        fields, files = await read_body(request)
        fields.setdefault("task_type", "v2v")
        return await in_thread(create, fields, files, needs_video=True)

    @app.post("/v1/videos/{video_id}/remix", tags=["videos"], openapi_extra=_body_schema({}, ("prompt",)))
    async def remix_video(video_id: str, request: Request):
        """`client.videos.remix`: v2v with a new prompt on a completed video's output."""
        fields, files = await read_body(request)
        if await in_thread(store.get, video_id) is None:
            raise _not_found(video_id)
        fields.setdefault("task_type", "v2v")
        return await in_thread(create, fields, files, video_from=video_id, needs_video=True, remixed_from=video_id)

    @app.get("/v1/videos", tags=["videos"])
    async def list_videos(after: str | None = None, limit: int = 20, order: str = "desc"):
        """`client.videos.list`: a page of jobs, newest first by default (`after`, `limit` 1-100, `order`)."""
        if not 1 <= limit <= 100:
            raise RequestError(f"`limit`={limit} must be in [1, 100].", "limit")
        if order not in ("asc", "desc"):
            raise RequestError(f"`order`={order!r} must be asc or desc.", "order")
        try:
            jobs, more = await in_thread(store.list, after=after, limit=limit, order=order)
        except KeyError:
            raise RequestError(f"`after`={after!r} is not a video id.", "after", status=404, code="not_found") from None
        data = [video_object(job) for job in jobs]
        return {
            "object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more,
        }  # fmt: skip

    @app.get("/v1/videos/{video_id}", tags=["videos"])
    async def retrieve_video(video_id: str):
        """`client.videos.retrieve` (and the SDK's `poll`): the job's `video` object."""
        job = await in_thread(store.get, video_id)
        if job is None:
            raise _not_found(video_id)
        return with_poll_hint(job)

    @app.get("/v1/videos/{video_id}/content", tags=["videos"])
    async def video_content(video_id: str, variant: str = "video"):
        """`client.videos.download_content`: the MP4 (`variant=video`; a PNG for an image task) or a PNG frame
        (`thumbnail`)."""
        if variant not in ("video", "thumbnail"):
            raise RequestError(f"`variant`={variant!r} is not served here; use video or thumbnail.", "variant")
        job = await in_thread(store.get, video_id)
        if job is None:
            raise _not_found(video_id)
        if job.status != COMPLETED:
            raise RequestError(f"Video '{video_id}' is {job.status}; its content exists once completed.", "video_id",
                               code="not_ready")  # fmt: skip
        name = job.output if variant == "video" else job.thumbnail
        path = store.root / name
        if not path.is_file():
            raise RequestError(f"The {variant} of '{video_id}' is gone.", "video_id", status=404, code="not_found")
        kind = "video/mp4" if path.suffix == ".mp4" else "image/png"
        return FileResponse(path, media_type=kind, filename=f"{video_id}{path.suffix}")

    @app.delete("/v1/videos/{video_id}", tags=["videos"])
    async def delete_video(video_id: str):
        """`client.videos.delete`: a queued job is removed, a running one stops within one denoising step, a finished
        one's files are deleted."""
        job = await in_thread(store.delete, video_id)
        if job is None:
            raise _not_found(video_id)
        if job.status != IN_PROGRESS:  # the worker of a running job removes its files when it stops
            await in_thread(remove_files, store, job)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    return app
