"""`bernini serve`: the API's overhead per job against a direct pipeline call, on the CPU with the tiny model.

The same job (t2v, `--frames` frames at `--size`, `--steps` steps, one seed) runs two ways, interleaved (direct, API,
direct, API, ...) so that a change in the machine's load hits both:

- direct: `pipe(...)` in this process on the tiny pipeline, then `out.save(path)` (the verified MP4 writer the server
  uses too);
- API: `bernini serve --model tiny` in a subprocess, driven by the official `openai` SDK: `videos.create_and_poll`
  (polling every `--poll_ms`) then `download_content` of the MP4. The server's own run time of the job (claim to
  completion, from its store) is reported too, so the overhead splits into what the server adds around the call
  (thumbnail, store writes, progress per step) and what HTTP and polling add.

Both sides run torch on one thread (`--threads`). Each row is the median of `--repeats` jobs after `--warmup` ones.
Nothing is asserted on time.

Run: python benchmarks/bench_serve.py [--repeats 5] [--steps 2] [--frames 9] [--size 96x64] [--poll_ms 50]
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--frames", type=int, default=9, help="4k+1")
    parser.add_argument("--size", default="96x64", help="WIDTHxHEIGHT, multiples of 16")
    parser.add_argument("--poll_ms", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import httpx
    import torch
    from openai import OpenAI

    from bernini_diffusers.tiny import tiny_pipeline

    warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks the videos API deprecated
    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.split("x"))
    seconds = f"{(args.frames - 1) / 16:g}"
    work = Path(tempfile.mkdtemp(prefix="bench_serve-"))
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env.pop("BERNINI_API_KEY", None)
    log = open(work / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "bernini_diffusers.cli", "serve", "--model", "tiny", "--port", str(port),
         "--jobs_dir", str(work / "jobs"), "--poll_after_ms", str(args.poll_ms)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(1200):
            if server.poll() is not None:
                raise SystemExit(f"the server exited:\n{(work / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        pipe = tiny_pipeline(torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)

        def direct(i: int) -> float:
            start = time.perf_counter()
            out = pipe(
                prompt="a red fox", task_type="t2v", num_frames=args.frames, height=height, width=width,
                num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(42), output_type="np",
            )  # fmt: skip
            out.save(work / f"direct-{i}.mp4")
            return time.perf_counter() - start

        def api(i: int) -> tuple[float, str]:
            start = time.perf_counter()
            video = client.videos.create_and_poll(
                prompt="a red fox", seconds=seconds, size=args.size, poll_interval_ms=args.poll_ms,
                extra_body={"num_inference_steps": args.steps, "seed": 42},
            )  # fmt: skip
            assert video.status == "completed", video.error
            client.videos.download_content(video.id).write_to_file(work / f"api-{i}.mp4")
            return time.perf_counter() - start, video.id

        for i in range(args.warmup):
            direct(-1 - i)
            api(-1 - i)
        direct_times, api_times, ids = [], [], []
        for i in range(args.repeats):
            direct_times.append(direct(i))
            seconds_taken, job_id = api(i)
            api_times.append(seconds_taken)
            ids.append(job_id)
        db = sqlite3.connect(work / "jobs" / "jobs.sqlite3")
        marks = ",".join("?" * len(ids))
        server_runs = [row[0] for row in db.execute(
            f"SELECT finished_at - started_at FROM jobs WHERE id IN ({marks})", ids)]  # fmt: skip
        db.close()
    finally:
        server.terminate()
        server.wait(30)
        log.close()

    d, a, s = (statistics.median(v) for v in (direct_times, api_times, server_runs))
    print(f"tiny model, t2v {args.frames} frames {args.size}, {args.steps} steps, {args.threads} torch thread(s); "
          f"median of {args.repeats} jobs after {args.warmup} warm-up")  # fmt: skip
    print(f"{'path':<44}{'s/job':>8}{'ratio':>8}")
    print(f"{'direct: pipe(...) + out.save':<44}{d:8.3f}{1:8.2f}")
    print(f"{'server run (claim -> completed, from store)':<44}{s:8.3f}{s / d:8.2f}")
    print(f"{'API: create_and_poll + download (client)':<44}{a:8.3f}{a / d:8.2f}")
    print(f"API overhead per job: {a - d:+.3f} s ({(a - d) / d:+.1%}); of it the server around the call "
          f"{s - d:+.3f} s, HTTP, queue and polling {a - s:+.3f} s")  # fmt: skip


if __name__ == "__main__":
    main()
