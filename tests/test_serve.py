"""`bernini serve`: the server in a subprocess on 127.0.0.1 with the tiny model, driven by the official `openai` SDK
unmodified and by plain HTTP (httpx) for the error cases; restarts after SIGKILL and a bounded load."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from bernini_diffusers.testing import make_test_image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "test-key-123"
# The smallest job: 0.25 s at 16 fps is 5 frames (4k+1), 32x32, one denoising step.
SMALL = {"seconds": "0.25", "size": "32x32"}
FAST = {"num_inference_steps": 1}
START_TIMEOUT = 300
JOB_TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`bernini serve --model tiny` in a subprocess (its output in a log file), stopped with SIGKILL or SIGTERM."""

    def __init__(self, jobs_dir: Path, *flags: str, api_key: str | None = None, processes: int = 1):
        self.jobs_dir, self.flags, self.api_key = jobs_dir, flags, api_key
        self.launcher = [sys.executable, "-m", "bernini_diffusers.cli"]
        if processes > 1:  # torchrun (gloo on the CPU), rank 0 answering HTTP
            self.launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                             "--master_port", str(_free_port()), "-m", "bernini_diffusers.cli"]  # fmt: skip
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = jobs_dir.parent / f"{jobs_dir.name}-server-{time.monotonic_ns()}.log"
        self.proc = None

    def start(self) -> Server:
        command = [
            *self.launcher, "serve", "--model", "tiny", "--port", str(self.port),
            "--jobs_dir", str(self.jobs_dir), "--poll_after_ms", "100", "--lease_seconds", "20", *self.flags,
        ]  # fmt: skip
        env = dict(os.environ)
        env.pop("BERNINI_API_KEY", None)
        if self.api_key:
            command += ["--api_key", self.api_key]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"the server did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, timeout=60)

    def http(self, method: str, path: str, key: str | None = "default", **kwargs):
        key = self.api_key if key == "default" else key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=60, **kwargs)

    def events(self) -> list[dict]:
        db = sqlite3.connect(self.jobs_dir / "jobs.sqlite3")
        db.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in db.execute("SELECT * FROM events ORDER BY n")]
        finally:
            db.close()

    def wait(self, job_id: str, timeout: float = JOB_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            video = self.http("GET", f"/v1/videos/{job_id}").json()
            if video.get("status") in ("completed", "failed"):
                return video
            time.sleep(0.2)
        raise AssertionError(f"{job_id} did not finish in {timeout} s:\n{self.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # max_queue 3: the 429 test fills it without a second server.
    srv = Server(tmp_path_factory.mktemp("serve") / "jobs", "--max_queue", "3", api_key=KEY).start()
    yield srv
    srv.stop()


def _read_video(data: bytes, tmp_path: Path, name: str = "out.mp4"):
    import imageio.v3 as iio

    path = tmp_path / name
    path.write_bytes(data)
    return path, iio.imread(path)


def test_sdk_drives_every_route(server, tmp_path):
    warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks the videos API deprecated
    client = server.client()
    video = client.videos.create_and_poll(prompt="a red fox", **SMALL, extra_body={**FAST, "seed": 7})
    assert video.status == "completed", video.error
    assert (video.object, video.progress, video.model, video.size, video.seconds) == ("video", 100, "tiny", "32x32",
                                                                                      "0.25")  # fmt: skip
    assert video.completed_at >= video.created_at

    data = client.videos.download_content(video.id).read()
    path, frames = _read_video(data, tmp_path)
    assert frames.shape[:3] == (5, 32, 32)  # 0.25 s at 16 fps: 5 frames, at the requested size
    thumbnail = client.videos.download_content(video.id, variant="thumbnail").read()
    assert thumbnail.startswith(b"\x89PNG")
    assert client.videos.retrieve(video.id).status == "completed"

    with open(path, "rb") as source:  # `edit` uploads a small video: v2v on it
        edited = client.videos.edit(prompt="make it snow", video=source, extra_body=FAST)
    assert edited.status in ("queued", "in_progress")
    edited = client.videos.poll(edited.id, poll_interval_ms=100)
    assert edited.status == "completed", edited.error
    edited_frames = _read_video(client.videos.download_content(edited.id).read(), tmp_path, "edit.mp4")[1]
    assert edited_frames.shape[:3] == (5, 32, 32)

    reference = tmp_path / "reference.png"
    make_test_image(reference, width=32, height=32, seed=1)
    with open(reference, "rb") as image:  # `input_reference`: the one reference image of r2v
        r2v = client.videos.create(prompt="the fox in this style", input_reference=image, **SMALL, extra_body=FAST)
    r2v = client.videos.poll(r2v.id, poll_interval_ms=100)
    assert r2v.status == "completed", r2v.error
    assert _read_video(client.videos.download_content(r2v.id).read(), tmp_path, "r2v.mp4")[1].shape[:3] == (5, 32, 32)

    remix = client.videos.remix(video.id, prompt="the same fox at night", extra_body=FAST)
    assert remix.remixed_from_video_id == video.id
    remix = client.videos.poll(remix.id, poll_interval_ms=100)
    assert remix.status == "completed", remix.error

    ids = [v.id for v in client.videos.list(order="asc")]
    assert ids.index(video.id) < ids.index(edited.id) < ids.index(remix.id)
    page = client.videos.list(limit=1, order="desc")
    assert [v.id for v in page.data] == [ids[-1]] and page.has_more
    assert [v.id for v in page.get_next_page().data] == [ids[-2]]
    assert [v.id for v in client.videos.list(limit=1)][:3] == ids[::-1][:3]  # auto-paging follows `after`

    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    assert not list((server.jobs_dir / "outputs").glob(f"{video.id}*"))
    assert client.videos.download_content(remix.id).read()  # a remix keeps its own copy of the source


def _error(response, status: int, param: str | None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    return error


def test_errors_over_plain_http(server, tmp_path):
    create = "/v1/videos"
    uploads = sorted((server.jobs_dir / "uploads").iterdir())
    assert server.http("GET", "/health", key=None).status_code == 200
    _error(server.http("GET", "/v1/videos", key=None), 401, None)
    _error(server.http("POST", create, key="wrong", json={"prompt": "x"}), 401, None)
    assert "WWW-Authenticate" in server.http("GET", "/v1/status", key=None).headers
    _error(server.http("GET", "/v1/videos/video_" + "0" * 32), 404, "video_id")
    _error(server.http("GET", "/v1/videos/nope/content"), 404, "video_id")
    _error(server.http("DELETE", "/v1/videos/video_" + "1" * 32), 404, "video_id")

    _error(server.http("POST", create, json={"prompt": "x", "size": "big"}), 400, "size")
    _error(server.http("POST", create, json={"prompt": "x", "seconds": "-1"}), 400, "seconds")
    _error(server.http("POST", create, json={"size": "32x32"}), 400, "prompt")
    _error(server.http("POST", create, data={"prompt": "x", "num_inference_steps": "many"}), 400, "num_inference_steps")
    _error(server.http("POST", create, json={"prompt": "x", "guidance_mode": "loud"}), 400, "guidance_mode")
    _error(server.http("POST", create, json={"prompt": "x", "task_type": "v2v"}), 400, "video")  # validate_call
    _error(server.http("POST", create, json={"prompt": "x", "size": "0x32"}), 400, "size")
    _error(server.http("POST", create, json={"prompt": "x", "size": "4096x4096"}), 400, "size")  # the rope table
    _error(server.http("POST", create, json={"prompt": "x", "seconds": "60"}), 400, "seconds")
    _error(server.http("POST", create, json={"prompt": "x", "colour": "red"}), 400, "colour")
    # No path reaches the server's file system: media are uploads or video ids only.
    _error(server.http("POST", create, data={"prompt": "x", "images[]": "/etc/passwd"}), 400, "images")
    _error(server.http("POST", create, json={"prompt": "x", "input_reference": {"image_url": "file:///etc/passwd"}}),
           400, "input_reference")  # fmt: skip
    _error(server.http("POST", "/v1/videos/edits", data={"prompt": "x", "video": "/etc/passwd"}), 400, "video")
    _error(server.http("POST", "/v1/videos/edits", data={"prompt": "x", "video[id]": "../../etc"}), 400, "video")
    _error(server.http("POST", "/v1/videos/edits", data={"prompt": "x"}), 400, "video")
    bad = server.http("POST", create, data={"prompt": "x"}, files={"input_reference": ("a.png", b"not a png")})
    _error(bad, 400, "input_reference")
    _error(server.http("POST", create, data={"prompt": "x"}, files={"input_reference": ("a.sh", b"#!")}), 400,
           "input_reference")  # fmt: skip
    assert sorted((server.jobs_dir / "uploads").iterdir()) == uploads  # refused uploads are not kept
    _error(server.http("GET", "/v1/videos", params={"limit": 0}), 400, "limit")
    schema = server.http("GET", "/openapi.json").json()
    assert {"/v1/videos", "/v1/videos/{video_id}/content", "/v1/status", "/health"} <= set(schema["paths"])
    form = schema["paths"]["/v1/videos"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"prompt", "seconds", "size", "input_reference", "num_inference_steps", "seed"} <= set(form["properties"])


def test_queue_full_and_cancel(server):
    """--max_queue 3: a burst gets 429 with Retry-After; deleting a queued job removes it, deleting the running one
    stops it within a step."""
    slow = {"prompt": "x", **SMALL, "num_inference_steps": 200}
    deadline = time.monotonic() + JOB_TIMEOUT
    while server.http("GET", "/v1/status").json()["status"] != "idle":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    answers = [server.http("POST", "/v1/videos", json=slow) for _ in range(6)]
    accepted = [r.json()["id"] for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert len(accepted) + len(refused) == 6 and refused and len(accepted) <= 4
    error = _error(refused[0], 429, None)
    assert error["code"] == "queue_full" and int(refused[0].headers["Retry-After"]) >= 1

    running = accepted[0]
    while server.http("GET", f"/v1/videos/{running}").json()["progress"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    status = server.http("GET", "/v1/status").json()
    assert status["status"] == "busy" and status["running"] == [running] and status["queued"] == len(accepted) - 1
    for job_id in reversed(accepted):  # the queued ones first, then the running one
        assert server.http("DELETE", f"/v1/videos/{job_id}").json()["deleted"] is True
        _error(server.http("GET", f"/v1/videos/{job_id}"), 404, "video_id")
    while server.http("GET", "/v1/status").json()["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    events = [e for e in server.events() if e["job"] == running]
    assert [e["event"] for e in events][-2:] == ["cancel_requested", "deleted"]
    assert server.http("GET", "/v1/status").json()["status"] == "idle"


def _completions(events: list[dict]) -> Counter:
    return Counter(e["job"] for e in events if e["event"] == "completed")


@pytest.mark.slow
def test_restart_after_sigkill_loses_nothing(tmp_path):
    jobs = tmp_path / "jobs"
    first = Server(jobs, "--max_queue", "10").start()
    ids = [first.http("POST", "/v1/videos", json={"prompt": f"job {i}", **SMALL, "num_inference_steps": 3}).json()["id"]
           for i in range(4)]  # fmt: skip
    deadline = time.monotonic() + JOB_TIMEOUT
    while first.http("GET", f"/v1/videos/{ids[0]}").json()["progress"] < 1:  # the first is running, the rest queued
        assert time.monotonic() < deadline
        time.sleep(0.1)
    first.stop(signal.SIGKILL)

    second = Server(jobs, "--max_queue", "10").start()
    try:
        videos = [second.wait(job_id) for job_id in ids]
        assert [v["status"] for v in videos] == ["completed"] * 4
        completions = _completions(second.events())
        assert all(completions[job_id] == 1 for job_id in ids), completions  # each finished once
        requeued = [e["job"] for e in second.events() if e["event"] == "requeued"]
        assert requeued == [ids[0]]
        for job_id in ids:
            assert second.http("GET", f"/v1/videos/{job_id}/content").content[4:8] == b"ftyp"
    finally:
        second.stop()


@pytest.mark.slow
def test_bounded_load(tmp_path):
    """50 concurrent creates against --max_queue 20: each accepted or 429; every accepted job completes once."""
    srv = Server(tmp_path / "jobs", "--max_queue", "20").start()
    try:
        answers: list = [None] * 50

        def send(i: int):
            answers[i] = srv.http("POST", "/v1/videos", json={"prompt": f"load {i}", **SMALL, **FAST})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        codes = Counter(r.status_code for r in answers)
        assert set(codes) <= {200, 429} and codes[200] >= 20, codes
        accepted = [r.json()["id"] for r in answers if r.status_code == 200]
        assert len(set(accepted)) == len(accepted)
        assert all(r.headers.get("Retry-After") for r in answers if r.status_code == 429)
        for job_id in accepted:
            assert srv.wait(job_id)["status"] == "completed"
        listed = {v["id"] for v in srv.http("GET", "/v1/videos", params={"limit": 100}).json()["data"]}
        assert listed == set(accepted)
        completions = _completions(srv.events())
        assert set(completions) == set(accepted) and set(completions.values()) == {1}
        print(f"load: {codes[200]} accepted, {codes[429]} refused (429), all accepted completed once")
    finally:
        srv.stop()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_data_parallel_groups_share_the_store(tmp_path):
    """torchrun with 2 processes and --data_parallel 2: each group claims its own jobs from the one store, rank 0
    answers HTTP, and every job completes once."""
    srv = Server(tmp_path / "jobs", "--data_parallel", "2", processes=2).start()
    try:
        assert srv.http("GET", "/v1/status").json()["workers"] == 2
        job = {**SMALL, "num_inference_steps": 2}
        ids = [srv.http("POST", "/v1/videos", json={"prompt": f"dp {i}", **job}).json()["id"] for i in range(4)]
        assert [srv.wait(job_id)["status"] for job_id in ids] == ["completed"] * 4
        events = srv.events()
        assert set(_completions(events).values()) == {1} and set(_completions(events)) == set(ids)
        groups = {e["worker"].rsplit("/", 1)[1] for e in events if e["event"] == "claimed"}
        assert groups == {"0", "1"}, events
    finally:
        srv.stop()



@pytest.mark.slow
@pytest.mark.multiprocess
def test_sharded_weights_serve_a_job(tmp_path):
    """torchrun with 2 processes, --ulysses 2 --shard_weights: one group whose ranks each hold half of the experts and
    of the text encoder runs the job, and its video is the one a single process makes."""
    single = Server(tmp_path / "single").start()
    try:
        expected = single.wait(single.http("POST", "/v1/videos", json={"prompt": "a kite", "seed": 3, **SMALL}).json()["id"])
        reference = single.http("GET", f"/v1/videos/{expected['id']}/content").content
    finally:
        single.stop()
    srv = Server(tmp_path / "jobs", "--ulysses", "2", "--shard_weights", processes=2).start()
    try:
        assert srv.http("GET", "/v1/status").json()["workers"] == 1
        job = srv.wait(srv.http("POST", "/v1/videos", json={"prompt": "a kite", "seed": 3, **SMALL}).json()["id"])
        assert job["status"] == "completed", job
        video = srv.http("GET", f"/v1/videos/{job['id']}/content").content
        frames = [iio.imread(data, index=None, extension=".mp4") for data in (reference, video)]
        assert frames[0].shape == frames[1].shape
        assert np.abs(frames[0].astype(np.int16) - frames[1].astype(np.int16)).max() <= 2  # Ulysses sums reordered
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--shard_weights"], "--shard_weights shards the experts across the --ulysses x --branch_parallel ranks"),
        (["--shard_weights", "--ulysses", "2", "--memory_profile", "group_offload"],
         "--memory_profile='group_offload' cannot be combined with --shard_weights"),
    ],
)  # fmt: skip
def test_serve_checks_shard_weights_before_loading(tmp_path, capsys, flags, message):
    from bernini_diffusers import cli

    argv = ["serve", "--model", "tiny", "--jobs_dir", str(tmp_path / "jobs"), *flags]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "jobs").exists()


def _add(store, n: int = 0, max_queue=None):
    from bernini_diffusers.serve.store import new_job_id

    return store.add(job_id=new_job_id(), model="tiny", prompt=f"p{n}", seconds="0.25", size="32x32",
                     call={"prompt": f"p{n}", "seed": 1}, steps=4, uploads=[], max_queue=max_queue)  # fmt: skip


def test_store_leases_requeue_and_complete_once(tmp_path):
    """The store alone (no model): an expired lease returns the job to the queue, only the lease holder completes it,
    `fail` marks it failed with the reason instead, and a full queue is refused in the same transaction."""
    from bernini_diffusers.serve.store import JobStore, QueueFull

    store = JobStore(tmp_path / "jobs", lease_seconds=0.2)
    job = _add(store)
    first = store.claim("1@elsewhere/0")  # a worker of another host: only its lease can tell it is gone
    assert first.id == job.id and first.status == "in_progress" and store.claim("2@elsewhere/0") is None
    assert store.heartbeat(job.id, "1@elsewhere/0", step=2) and store.get(job.id).progress == 50
    assert store.recover() == []  # the lease holds
    time.sleep(0.3)
    assert store.recover() == [job.id] and store.get(job.id).status == "queued"
    second = store.claim("2@elsewhere/0")
    assert second.attempts == 2
    assert not store.heartbeat(job.id, "1@elsewhere/0")  # the old holder learns it lost the job
    assert not store.finish(job.id, "1@elsewhere/0", output="outputs/x.mp4")
    assert store.finish(job.id, "2@elsewhere/0", output="outputs/x.mp4")
    assert [e["event"] for e in store.events(job.id)] == ["queued", "claimed", "requeued", "claimed", "completed"]
    (tmp_path / "jobs" / "outputs" / "x.mp4").write_bytes(b"x")
    assert store.recover() == []  # a completed job with its file stays completed

    other = _add(store, 1)
    store.claim("3@elsewhere/0")
    time.sleep(0.3)
    store.recover("fail")
    failed = store.get(other.id)
    assert failed.status == "failed" and failed.error["code"] == "interrupted"

    (tmp_path / "jobs" / "outputs" / "x.mp4").unlink()  # never completed without its file
    store.recover()
    assert store.get(job.id).status == "failed" and store.get(job.id).error["code"] == "output_missing"

    _add(store, 2, max_queue=2)
    _add(store, 3, max_queue=2)
    with pytest.raises(QueueFull):
        _add(store, 4, max_queue=2)

    running = store.claim("4@elsewhere/0")
    assert store.delete(running.id).status == "in_progress" and store.get(running.id) is None
    assert not store.heartbeat(running.id, "4@elsewhere/0")  # the worker stops at its next step
    assert store.drop_cancelled(running.id, "4@elsewhere/0") is not None
    assert store.get(running.id, include_deleted=True) is None


def test_store_requeues_a_dead_local_worker_at_once(tmp_path):
    from bernini_diffusers.serve.store import JobStore

    store = JobStore(tmp_path / "jobs", lease_seconds=3600)
    job = _add(store)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store.claim(f"{gone.pid}@{socket.gethostname()}/0")  # a process of this host that has exited
    assert store.recover() == [job.id] and store.get(job.id).status == "queued"
    store.claim(f"{os.getpid()}@{socket.gethostname()}/0")  # a live one keeps its lease
    assert store.recover() == []
