"""The `bernini serve` command: its flags and its run function.

Like the other modules that build the `bernini` parser, this one imports only the standard library and torch-free
modules at module level; torch, the pipeline and the server's packages (FastAPI, uvicorn: the `[serve]` extra) load
inside `run_serve`, after the command line is parsed.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

from .. import options
from ..constants import DEFAULT_MAX_TOKENS, MAX_TOKENS_ENV

API_KEY_ENV = "BERNINI_API_KEY"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
DEFAULT_JOBS_DIR = "bernini_jobs"
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_UPLOAD_MB = 64
DEFAULT_LEASE_SECONDS = 60.0

_EPILOG = """
The SDK: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY or "none").videos.create_and_poll(prompt=...,
  seconds="5", size="848x480", extra_body={"num_inference_steps": 40, "seed": 1})`. See docs/serving.md.
Many GPUs: `torchrun --nproc-per-node 8 -m bernini_diffusers.cli serve --model M --ulysses 4` serves 2 jobs at a
  time (two data-parallel groups of Ulysses 4); rank 0 answers HTTP. `--shard_weights` shards the weights across
  each group's ranks (FSDP2), as `bernini generate --shard_weights` does.
"""


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bernini serve`: the model flags of `bernini generate`, the size defaults of a request, and the
    server's own flags."""
    parser = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible videos API (needs the [serve] extra)",
        formatter_class=options.HelpFormatter, epilog=_EPILOG,
        description="Serve Bernini-R as OpenAI's videos API (/v1/videos), with a job store that survives restarts.",
    )  # fmt: skip
    options.add_model_arguments(parser.add_argument_group("model"))
    options.add_size_arguments(parser.add_argument_group("a request's defaults"))
    server = parser.add_argument_group("server")
    server.add_argument("--host", default=DEFAULT_HOST, help="address to bind; 0.0.0.0 serves the whole network")
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to bind")
    server.add_argument(
        "--api_key", help=f"require `Authorization: Bearer KEY` on every endpoint but /health (default: ${API_KEY_ENV})"
    )
    server.add_argument(
        "--max_queue", type=int, default=DEFAULT_MAX_QUEUE, help="queued jobs beyond which a create is answered 429"
    )
    server.add_argument("--jobs_dir", default=DEFAULT_JOBS_DIR, help="the job store, uploads and outputs")
    server.add_argument("--max_upload_mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, help="largest upload, per file")
    server.add_argument(
        "--max_tokens", type=int,
        help=f"refuse a request whose longest guidance branch exceeds this many transformer tokens (default: "
             f"${MAX_TOKENS_ENV}, else {DEFAULT_MAX_TOKENS})",
    )
    server.add_argument(
        "--on_interrupted", choices=("requeue", "fail"), default="requeue",
        help="what becomes of a job whose worker died while running it (found at start or when its lease expires)",
    )
    server.add_argument("--lease_seconds", type=float, default=DEFAULT_LEASE_SECONDS, help="a claim's lease")
    server.add_argument(
        "--poll_after_ms", type=int, default=1000, help="the poll interval the server suggests to the SDK"
    )
    parallel = parser.add_argument_group("many GPUs (under torchrun)")
    parallel.add_argument(
        "--ulysses", "--ulysses_degree", dest="ulysses", type=int, default=1, help="Ulysses degree of every job"
    )
    parallel.add_argument(
        "--branch_parallel", "--branch_degree", dest="branch_parallel", type=int, default=1,
        help="rank groups computing a step's guidance branches at once",
    )  # fmt: skip
    options.add_shard_argument(parallel)
    parallel.add_argument(
        "--data_parallel", type=int,
        help="jobs run at once (each by ulysses x branch_parallel ranks); default: WORLD_SIZE / (ulysses x "
             "branch_parallel). Given, it must match",
    )  # fmt: skip
    options.add_debug_argument(parser)
    parser.set_defaults(func=run_serve)
    return parser


def _check(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise ValueError(f"`port`={args.port} must be in [1, 65535].")
    for name in ("max_queue", "ulysses", "branch_parallel"):
        if getattr(args, name) < 1:
            raise ValueError(f"`{name}`={getattr(args, name)} must be >= 1.")
    for name in ("max_upload_mb", "lease_seconds"):
        if not getattr(args, name) > 0:
            raise ValueError(f"`{name}`={getattr(args, name)} must be > 0.")
    if args.poll_after_ms < 1:
        raise ValueError(f"`poll_after_ms`={args.poll_after_ms} must be >= 1.")
    options.check_shard_flags(args)
    group, world = args.ulysses * args.branch_parallel, int(os.environ.get("WORLD_SIZE", "1"))
    if world % group:
        raise ValueError(
            f"`ulysses`={args.ulysses} x `branch_parallel`={args.branch_parallel} needs a multiple of {group} "
            f"processes; WORLD_SIZE is {world}."
        )
    if args.data_parallel is not None and args.data_parallel * group != world:
        raise ValueError(
            f"`data_parallel`={args.data_parallel} x {group} ranks per job is not WORLD_SIZE={world}: launch with "
            f"torchrun --nproc-per-node {args.data_parallel * group}."
        )


def _enable_parallelism(pipe, args: argparse.Namespace):
    """This rank's parallel state (as `bernini generate`), None for one process."""
    if pipe.parallel_state is not None:  # loaded with --shard_weights: already enabled
        return pipe.parallel_state
    if args.ulysses == 1 and args.branch_parallel == 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    return pipe.enable_parallelism(ulysses_degree=args.ulysses, branch_degree=args.branch_parallel)


def run_serve(args: argparse.Namespace) -> int:
    """Check the flags, load the pipeline once, and serve until interrupted (rank 0 answers HTTP; every rank works)."""
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (for uploads)
        import uvicorn
    except ImportError as err:
        raise ImportError(
            f"`bernini serve` needs the [serve] extra: pip install 'bernini_diffusers[serve]' ({err})"
        ) from None
    from .app import Settings, create_app
    from .store import JobStore
    from .worker import Worker

    _check(args)
    api_key = args.api_key or os.environ.get(API_KEY_ENV, "").strip() or None
    model, _ = options.resolve_model(args)
    options.resolve_size_defaults(args)
    for name in options.SIZE_DEFAULTS:
        if getattr(args, name) < 1:
            raise ValueError(f"`{name}`={getattr(args, name)} must be >= 1.")
    max_tokens = options.max_tokens(args)
    options.check_environment(args)
    store = JobStore(args.jobs_dir, lease_seconds=args.lease_seconds)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        changed = store.recover(args.on_interrupted)
        if changed:
            print(f"note: {len(changed)} job(s) left running by a stopped server: {args.on_interrupted}d",
                  file=sys.stderr)  # fmt: skip

    pipe = options.load_pipeline(args)
    state = _enable_parallelism(pipe, args)
    worker = Worker(pipe, store, state, on_interrupted=args.on_interrupted)
    if not worker.writer:
        pipe.set_progress_bar_config(disable=True)
    if rank == 0:
        settings = Settings(
            model=model, defaults={name: getattr(args, name) for name in options.SIZE_DEFAULTS},
            max_tokens=max_tokens, rope_length=options.known_rope_length(model), max_queue=args.max_queue,
            max_upload_bytes=int(args.max_upload_mb * 2**20), api_key=api_key, poll_after_ms=args.poll_after_ms,
            workers=1 if state is None else state.data_degree, wake=worker.wake.set,
        )  # fmt: skip
        app = create_app(store, settings)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))
        thread = threading.Thread(target=server.run, name="http", daemon=True)
        thread.start()
        while not server.started:  # a port in use ends the thread: say so rather than work without an API
            if not thread.is_alive():
                raise OSError(f"could not serve on {args.host}:{args.port} (see the message above)")
            thread.join(0.05)
        key = "required (Authorization: Bearer)" if api_key else "none"
        print(
            f"bernini serve: http://{args.host}:{args.port}/v1 (model {model}; jobs in {store.root}; API key {key})",
            file=sys.stderr, flush=True,
        )  # fmt: skip
    worker.run_forever()
    return 0
