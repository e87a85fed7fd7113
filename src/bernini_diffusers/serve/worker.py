"""The workers of `bernini serve`: claim a job from the store, run it on the loaded pipeline, write its output.

One process serves one pipeline. Under torchrun each data group is one worker: its first rank (the writer) claims
jobs and hands each to the group with `broadcast_object`; every rank of the group runs the job with the Ulysses/branch
layout, and the writer writes the file. A cancelled job stops at the next denoising step on every rank of the group
(the writer's decision is broadcast, so no rank is left waiting in a collective).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import numpy as np
import torch

from .. import media
from .store import Job, JobStore, worker_name

# A group's writer offers "nothing to do" to its ranks this often, so no collective waits long enough to time out.
IDLE_POLL_SECONDS = 0.2


class JobCancelled(Exception):
    """The job was deleted (or its lease taken over) while it ran."""


def _resolve(store: JobStore, call: dict[str, Any]) -> dict[str, Any]:
    """The call with its media (stored relative to the jobs folder) as paths of this host."""
    call = dict(call)
    if call.get("video") is not None:
        video = call["video"]
        call["video"] = [str(store.root / v) for v in video] if isinstance(video, list) else str(store.root / video)
    if call.get("images"):
        call["images"] = [str(store.root / image) for image in call["images"]]
    return call


def remove_files(store: JobStore, job: Job, uploads: bool = True) -> None:
    """Remove what the server wrote for `job` (output, thumbnail, its temporaries and, with `uploads`, its uploads);
    only names under the jobs folder that the store recorded or the worker derived from the job id."""
    names = [job.output, job.thumbnail, *(job.uploads if uploads else [])]
    for name in filter(None, names):
        (store.root / name).unlink(missing_ok=True)
    for attempt in range(1, job.attempts + 1):
        for suffix in (".mp4", ".png"):
            path = store.outputs_dir / f"{job.id}-{attempt}{suffix}"
            if store.root / (job.output or "") != path:
                for stale in media.temporaries(path):
                    stale.unlink(missing_ok=True)


class Worker:
    r"""
    Runs the store's jobs on one pipeline (one process, or one data group of a parallel run).

    Args:
        pipe (`BerniniPipeline`): The loaded pipeline.
        store (`JobStore`): The job store.
        state (`ParallelState`, *optional*): This rank's parallel state; None for one process.
        on_interrupted (`str`): What `JobStore.recover` does with a job whose worker died: requeue or fail.
    """

    def __init__(self, pipe, store: JobStore, state=None, on_interrupted: str = "requeue"):
        self.pipe, self.store, self.state = pipe, store, state
        self.writer = state is None or state.is_writer
        self.name = worker_name(0 if state is None else state.data_rank)
        self.on_interrupted = on_interrupted
        self.wake = threading.Event()  # set by the app when a job is queued
        self.stop = threading.Event()
        self.current: str | None = None

    def _broadcast(self, value):
        return value if self.state is None else self.state.broadcast_object(value)

    def run_forever(self) -> None:
        """Claim and run jobs until `stop` is set (one process) or the launcher ends the group."""
        last_recover = 0.0
        while not self.stop.is_set():
            job = None
            if self.writer:
                if time.monotonic() - last_recover > self.store.lease_seconds / 4:
                    self.store.recover(self.on_interrupted)
                    last_recover = time.monotonic()
                job = self.store.claim(self.name)
                if job is None:
                    self.wake.wait(IDLE_POLL_SECONDS)
                    self.wake.clear()
            job = self._broadcast(job)
            if job is not None:
                self.run_job(job)

    def _heartbeat(self, job: Job, done: threading.Event) -> None:
        # The lease is renewed between steps too: decoding, writing and a slow first step all outlast no lease.
        while not done.wait(self.store.lease_seconds / 4):
            self.store.heartbeat(job.id, self.name)

    def run_job(self, job: Job) -> None:
        """Run one claimed job to a completed or failed row (writer), or drop it if it was deleted meanwhile."""
        self.current = job.id
        done = threading.Event()
        beat = None
        if self.writer:
            beat = threading.Thread(target=self._heartbeat, args=(job, done), daemon=True)
            beat.start()
        try:
            self._run(job)
        except JobCancelled:
            if self.writer:
                dropped = self.store.drop_cancelled(job.id, self.name)
                if dropped is not None:
                    remove_files(self.store, dropped)
        except Exception as err:  # one job's failure is its own; the worker goes on
            if self.writer:
                message = " ".join(str(err).split()) or type(err).__name__
                error = {"code": "generation_failed", "message": f"{type(err).__name__}: {message}"}
                self.store.finish(job.id, self.name, error=error)
                print(f"job {job.id} failed: {type(err).__name__}: {message}", file=sys.stderr)
        finally:
            done.set()
            if beat is not None:
                beat.join()
            self.current = None

    def _run(self, job: Job) -> None:
        call = _resolve(self.store, job.call)
        seed = call.pop("seed")

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            stop = False
            if self.writer:
                stop = not self.store.heartbeat(job.id, self.name, step + 1)  # the progress is the step count
            if self._broadcast(stop):
                raise JobCancelled(job.id)
            return callback_kwargs

        out = self.pipe(
            **call, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
            callback_on_step_end=on_step_end,
        )  # fmt: skip
        if not self.writer:
            return
        frames = out.frames[0]
        stem = self.store.outputs_dir / f"{job.id}-{job.attempts}"
        path = out.save(stem.with_suffix(".mp4"))  # verified, then renamed (one frame lands in .png)
        thumbnail = path
        if len(frames) > 1:
            middle = np.asarray(frames[len(frames) // 2 : len(frames) // 2 + 1])
            thumbnail = media.write_output(middle, stem.with_name(stem.name + ".thumbnail.png"), out.fps)
        height, width = np.asarray(frames[0]).shape[:2]
        finished = self.store.finish(
            job.id, self.name, output=str(path.relative_to(self.store.root)),
            thumbnail=str(thumbnail.relative_to(self.store.root)), size=f"{width}x{height}",
        )  # fmt: skip
        if not finished:  # deleted or taken over meanwhile: what this attempt wrote is nobody's
            path.unlink(missing_ok=True)
            thumbnail.unlink(missing_ok=True)
            if self.store.drop_cancelled(job.id, self.name) is not None:
                remove_files(self.store, job)
