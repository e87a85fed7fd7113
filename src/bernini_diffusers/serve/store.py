"""The job store of `bernini serve`: one SQLite database (WAL) under the jobs folder, standard library only.

A job is a row. Its life: `queued` -> `in_progress` (claimed by one worker, with a lease it renews) -> `completed`
(only once its output file is written and verified) or `failed`. A worker that dies stops renewing; once its lease
expires, or at once when it was a process of this host that is gone, the job goes back to `queued` (or to `failed`
with the reason, by a setting). Deleting a running job sets `cancel`; its worker stops at the next denoising step.
Every transition is also appended to `events`, so "completed exactly once" can be checked after the fact.

SQLite is the single-machine store: WAL lets one writer and many readers work at once across the processes of one
host, but its locks need a local file system (not NFS). Workers on several machines need a server database instead
(see docs/serving.md).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cases import process_alive

# The statuses the API shows; `deleted` is internal (a cancelled job whose worker has not let go of it yet).
QUEUED, IN_PROGRESS, COMPLETED, FAILED, DELETED = "queued", "in_progress", "completed", "failed", "deleted"
ON_INTERRUPTED = ("requeue", "fail")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 1,
    completed_at INTEGER,
    model TEXT NOT NULL,
    prompt TEXT,
    seconds TEXT NOT NULL,
    size TEXT NOT NULL,
    call TEXT NOT NULL,
    remixed_from TEXT,
    error TEXT,
    output TEXT,
    thumbnail TEXT,
    uploads TEXT NOT NULL DEFAULT '[]',
    worker TEXT,
    lease_until REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS events (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    event TEXT NOT NULL,
    worker TEXT,
    at REAL NOT NULL,
    detail TEXT
);
"""


def new_job_id() -> str:
    """A fresh job id in OpenAI's style (`video_` and 32 hex digits)."""
    return f"video_{uuid.uuid4().hex}"


def worker_name(group: int = 0) -> str:
    """`<pid>@<host>/<group>`: who holds a lease (the pid lets a restarted server on the same host see it is gone)."""
    return f"{os.getpid()}@{socket.gethostname()}/{group}"


def _holder_gone(worker: str | None) -> bool:
    """Whether the lease holder was a process of this host that no longer runs (its lease need not be waited out)."""
    if not worker:
        return True
    pid, _, rest = worker.partition("@")
    host = rest.split("/")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return int(pid) != os.getpid() and not process_alive(int(pid))


@dataclass
class Job:
    """One row of the store, as the API and the workers read it."""

    seq: int
    id: str
    created_at: int
    status: str
    step: int
    steps: int
    completed_at: int | None
    model: str
    prompt: str | None
    seconds: str
    size: str
    call: dict[str, Any]
    remixed_from: str | None
    error: dict[str, Any] | None
    output: str | None
    thumbnail: str | None
    uploads: list[str]
    worker: str | None
    lease_until: float | None
    attempts: int
    cancel: bool
    started_at: float | None
    finished_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        values = dict(row)
        values["call"] = json.loads(values["call"])
        values["error"] = json.loads(values["error"]) if values["error"] else None
        values["uploads"] = json.loads(values["uploads"])
        values["cancel"] = bool(values["cancel"])
        return cls(**values)

    @property
    def progress(self) -> int:
        """0-100 from the denoising step count; 100 only once completed (decode and write come after the last step)."""
        if self.status == COMPLETED:
            return 100
        return min(99, int(100 * self.step / max(self.steps, 1)))


class QueueFull(Exception):
    """The store already holds `max_queue` queued jobs."""


class JobStore:
    r"""
    The jobs of one server (or of several workers of one host) in `<jobs_dir>/jobs.sqlite3`.

    Args:
        jobs_dir (`str` or `Path`):
            The folder of the database, the uploads and the outputs (created if missing).
        lease_seconds (`float`):
            How long a claim holds without a heartbeat.
    """

    def __init__(self, jobs_dir: str | os.PathLike, lease_seconds: float = 60.0):
        self.root = Path(jobs_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.uploads_dir = self.root / "uploads"
        self.outputs_dir = self.root / "outputs"
        self.uploads_dir.mkdir(exist_ok=True)
        self.outputs_dir.mkdir(exist_ok=True)
        self.path = self.root / "jobs.sqlite3"
        self.lease_seconds = lease_seconds
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per operation: safe across the server's threads and the workers' processes.
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            if write:
                db.execute("BEGIN IMMEDIATE")  # take the write lock now: read-then-write steps cannot interleave
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            else:
                yield db
        finally:
            db.close()

    @staticmethod
    def _event(db: sqlite3.Connection, job: str, event: str, worker: str | None = None, detail: str | None = None):
        db.execute(
            "INSERT INTO events (job, event, worker, at, detail) VALUES (?, ?, ?, ?, ?)",
            (job, event, worker, time.time(), detail),
        )

    # ------------------------------------------------------------------------------------------ the API's side

    def add(
        self, *, job_id: str, model: str, prompt: str | None, seconds: str, size: str, call: dict[str, Any],
        steps: int, uploads: list[str], remixed_from: str | None = None, max_queue: int | None = None,
    ) -> Job:
        """Queue a job; `QueueFull` if `max_queue` jobs are already waiting (counted in the same transaction)."""
        with self._connect(write=True) as db:
            if max_queue is not None:
                (waiting,) = db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (QUEUED,)).fetchone()
                if waiting >= max_queue:
                    raise QueueFull(waiting)
            db.execute(
                "INSERT INTO jobs (id, created_at, status, steps, model, prompt, seconds, size, call, remixed_from, "
                "uploads) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, int(time.time()), QUEUED, steps, model, prompt, seconds, size, json.dumps(call),
                 remixed_from, json.dumps(uploads)),
            )  # fmt: skip
            self._event(db, job_id, "queued")
        return self.get(job_id)

    def get(self, job_id: str, *, include_deleted: bool = False) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (row["status"] == DELETED and not include_deleted):
            return None
        return Job.from_row(row)

    def list(self, *, after: str | None = None, limit: int = 20, order: str = "desc") -> tuple[list[Job], bool]:
        """A page of jobs in creation order (`asc` or `desc`) after the job `after`; returns (jobs, has_more).
        A `KeyError` if `after` is not a job."""
        with self._connect() as db:
            where, params = "status != ?", [DELETED]
            if after is not None:
                row = db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise KeyError(after)
                where += " AND seq > ?" if order == "asc" else " AND seq < ?"
                params.append(row["seq"])
            direction = "ASC" if order == "asc" else "DESC"
            rows = db.execute(
                f"SELECT * FROM jobs WHERE {where} ORDER BY seq {direction} LIMIT ?", (*params, limit + 1)
            ).fetchall()
        return [Job.from_row(row) for row in rows[:limit]], len(rows) > limit

    def counts(self) -> dict[str, int]:
        with self._connect() as db:
            rows = db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {row[0]: row[1] for row in rows}

    def running(self) -> list[Job]:
        """The jobs a worker holds: running ones, and deleted ones whose worker has not stopped yet."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE status IN (?, ?) ORDER BY seq", (IN_PROGRESS, DELETED)
            ).fetchall()
        return [Job.from_row(row) for row in rows]

    def mean_duration(self, last: int = 20) -> float | None:
        """The mean run time of the last `last` completed jobs, in seconds (None before the first)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT finished_at - started_at FROM jobs WHERE status = ? AND started_at IS NOT NULL "
                "ORDER BY seq DESC LIMIT ?", (COMPLETED, last),
            ).fetchall()  # fmt: skip
        durations = [row[0] for row in rows if row[0] is not None]
        return sum(durations) / len(durations) if durations else None

    def delete(self, job_id: str) -> Job | None:
        """Delete a job: a queued or finished one at once (returned, so its files can be removed); a running one is
        marked `deleted` with `cancel` set, and its worker removes it when it stops. None if there is no such job."""
        with self._connect(write=True) as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] == DELETED:
                return None
            job = Job.from_row(row)
            if job.status == IN_PROGRESS:
                db.execute("UPDATE jobs SET status = ?, cancel = 1 WHERE id = ?", (DELETED, job_id))
                self._event(db, job_id, "cancel_requested")
            else:
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                self._event(db, job_id, "deleted")
        return job

    # ------------------------------------------------------------------------------------------ the workers' side

    def recover(self, on_interrupted: str = "requeue") -> list[str]:
        """Return to the queue (or fail, `on_interrupted="fail"`) the running jobs whose holder is gone or whose lease
        expired; drop cancelled ones whose worker died; fail completed jobs whose file is missing. Returns the ids
        put back or failed. Called at start and by idle workers."""
        if on_interrupted not in ON_INTERRUPTED:
            raise ValueError(f"`on_interrupted`={on_interrupted!r} must be one of {', '.join(ON_INTERRUPTED)}.")
        changed, now = [], time.time()
        with self._connect(write=True) as db:
            for row in db.execute("SELECT * FROM jobs WHERE status IN (?, ?)", (IN_PROGRESS, DELETED)).fetchall():
                if not ((row["lease_until"] or 0) < now or _holder_gone(row["worker"])):
                    continue
                if row["status"] == DELETED:
                    db.execute("DELETE FROM jobs WHERE id = ?", (row["id"],))
                    self._event(db, row["id"], "deleted", row["worker"], "its worker is gone")
                    continue
                reason = f"its worker {row['worker']} stopped while running it (lease lost)"
                if on_interrupted == "requeue":
                    db.execute(
                        "UPDATE jobs SET status = ?, worker = NULL, lease_until = NULL, step = 0 WHERE id = ?",
                        (QUEUED, row["id"]),
                    )
                    self._event(db, row["id"], "requeued", row["worker"], reason)
                else:
                    error = {"code": "interrupted", "message": f"The job was interrupted: {reason}."}
                    db.execute(
                        "UPDATE jobs SET status = ?, worker = NULL, error = ?, finished_at = ? WHERE id = ?",
                        (FAILED, json.dumps(error), now, row["id"]),
                    )
                    self._event(db, row["id"], "failed", row["worker"], reason)
                changed.append(row["id"])
            for row in db.execute("SELECT id, output FROM jobs WHERE status = ?", (COMPLETED,)).fetchall():
                if row["output"] and not (self.root / row["output"]).is_file():
                    error = {"code": "output_missing", "message": f"The output file {row['output']} is gone."}
                    db.execute(
                        "UPDATE jobs SET status = ?, error = ? WHERE id = ?", (FAILED, json.dumps(error), row["id"])
                    )
                    self._event(db, row["id"], "failed", None, "output file missing")
                    changed.append(row["id"])
        return changed

    def claim(self, worker: str) -> Job | None:
        """Claim the oldest queued job for `worker` (status `in_progress`, a fresh lease, one more attempt)."""
        with self._connect(write=True) as db:
            row = db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY seq LIMIT 1", (QUEUED,)).fetchone()
            if row is None:
                return None
            now = time.time()
            db.execute(
                "UPDATE jobs SET status = ?, worker = ?, lease_until = ?, attempts = attempts + 1, step = 0, "
                "started_at = ? WHERE id = ?",
                (IN_PROGRESS, worker, now + self.lease_seconds, now, row["id"]),
            )
            self._event(db, row["id"], "claimed", worker)
        return self.get(row["id"])

    def heartbeat(self, job_id: str, worker: str, step: int | None = None) -> bool:
        """Renew the lease (and record the step count); False if `worker` no longer holds the job or it was
        cancelled: the worker should stop."""
        with self._connect(write=True) as db:
            sets, params = "lease_until = ?", [time.time() + self.lease_seconds]
            if step is not None:
                sets += ", step = ?"
                params.append(step)
            cursor = db.execute(
                f"UPDATE jobs SET {sets} WHERE id = ? AND worker = ? AND status = ? AND cancel = 0",
                (*params, job_id, worker, IN_PROGRESS),
            )
            return cursor.rowcount == 1

    def finish(self, job_id: str, worker: str, *, output: str | None = None, thumbnail: str | None = None,
               size: str | None = None, error: dict[str, Any] | None = None) -> bool:
        """Mark the job completed (its `output`, relative to the jobs folder, already written and verified) or failed
        (`error`), if `worker` still holds it; `size` (`WxH`) is the output's, which a source video decides. False if
        it does not (the caller then removes what it wrote)."""
        now = time.time()
        with self._connect(write=True) as db:
            if error is None:
                cursor = db.execute(
                    "UPDATE jobs SET status = ?, output = ?, thumbnail = ?, size = COALESCE(?, size), "
                    "completed_at = ?, finished_at = ?, lease_until = NULL "
                    "WHERE id = ? AND worker = ? AND status = ? AND cancel = 0",
                    (COMPLETED, output, thumbnail, size, int(now), now, job_id, worker, IN_PROGRESS),
                )
            else:
                cursor = db.execute(
                    "UPDATE jobs SET status = ?, error = ?, finished_at = ?, lease_until = NULL "
                    "WHERE id = ? AND worker = ? AND status = ? AND cancel = 0",
                    (FAILED, json.dumps(error), now, job_id, worker, IN_PROGRESS),
                )
            done = cursor.rowcount == 1
            if done:
                self._event(db, job_id, COMPLETED if error is None else FAILED, worker)
        return done

    def drop_cancelled(self, job_id: str, worker: str) -> Job | None:
        """Remove a job that was deleted while `worker` ran it; returns it (for its files), or None."""
        with self._connect(write=True) as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ? AND status = ?", (job_id, DELETED)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            self._event(db, job_id, "deleted", worker, "cancelled while running")
        return Job.from_row(row)

    def is_cancelled(self, job_id: str, worker: str) -> bool:
        """Whether the job was deleted (or taken from `worker`) since it was claimed."""
        with self._connect() as db:
            row = db.execute("SELECT status, worker, cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is None or bool(row["cancel"]) or row["worker"] != worker or row["status"] != IN_PROGRESS

    def events(self, job_id: str | None = None) -> list[dict[str, Any]]:
        with self._connect() as db:
            if job_id is None:
                rows = db.execute("SELECT * FROM events ORDER BY n").fetchall()
            else:
                rows = db.execute("SELECT * FROM events WHERE job = ? ORDER BY n", (job_id,)).fetchall()
        return [dict(row) for row in rows]
