"""`bernini serve`: an OpenAI-compatible videos API over one loaded Bernini-R pipeline (docs/serving.md).

- `cli`: the command's flags (imports nothing heavy) and its run function;
- `store`: the SQLite job store (WAL, leases, events);
- `calls`: a request checked and mapped onto one `BerniniPipeline` call;
- `worker`: claims jobs and runs them (one process, or one data group under torchrun);
- `app`: the FastAPI routes.

fastapi, uvicorn and python-multipart are the optional `[serve]` extra; nothing here imports them (or torch) until
the server starts.
"""
