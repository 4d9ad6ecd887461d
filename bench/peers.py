"""The peers our server is compared with, serving the same weights with the full model (every stage,
no early exit), behind the same request format as ``/classify`` (a multipart part ``file``):

- ``plain``: a plain FastAPI app that runs the model inline in its handler, one request at a time,
  no batching (the endpoint most tutorials write). ``/classify/batch`` runs a client's whole batch
  as one forward, so the batch endpoints can be compared too.
- ``litserve``: LitServe (PyPI) with its dynamic batching; ``max_batch_size``, ``batch_timeout`` and
  ``workers_per_device`` are flags, chosen by the harness (``bench.serving``).

    python -m bench.peers plain --checkpoint PATH --port 8001 [--device cpu] [--threads 2]
    python -m bench.peers litserve --checkpoint PATH --port 8002 --max-batch-size 32 --batch-timeout-ms 2

Both answer ``{"class_index", "label", "probability"}``; readiness: ``GET /readyz`` (plain),
``GET /health`` (LitServe).
"""
from __future__ import annotations

import argparse

import torch
from fastapi import FastAPI, UploadFile

from bench.peer_model import decode, full_model, load

# ------------------------------------------------------------------------------------ plain


def plain_app(checkpoint: str, device: str = "cpu", threads: int = 0):
    loaded = load(checkpoint, device, threads)
    pre = loaded.preprocess
    app = FastAPI(title="per-request ThinkingViT (full model, no batching)")

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    @app.post("/classify")
    async def classify(file: UploadFile) -> dict:
        image = decode(await file.read(), pre).unsqueeze(0).to(device)  # (1, C, H, W)
        return full_model(loaded, image)[0]

    @app.post("/classify/batch")
    async def classify_batch(files: list[UploadFile]) -> dict:
        images = torch.stack([decode(await f.read(), pre) for f in files]).to(device)  # (B, C, H, W)
        answers = full_model(loaded, images)
        return {"results": [{"index": i, "result": a} for i, a in enumerate(answers)]}

    full_model(loaded, torch.zeros(1, loaded.model.config.in_chans, pre.size, pre.size, device=device))
    return app


def run_plain(args) -> None:
    import uvicorn

    app = plain_app(args.checkpoint, args.device, args.threads)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


# ------------------------------------------------------------------------------------ LitServe


def run_litserve(args) -> None:
    import litserve as ls

    from bench.litserve_peer import ThinkingViTFull

    api = ThinkingViTFull(
        args.checkpoint, args.device, args.threads,
        max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_ms / 1000, api_path="/classify",
    )  # fmt: skip
    accelerator = "cuda" if args.device.startswith("cuda") else "cpu"
    server = ls.LitServer(
        api, accelerator=accelerator, devices=1, workers_per_device=args.workers, fast_queue=args.fast_queue
    )
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False, num_api_servers=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("system", choices=["plain", "litserve"])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout-ms", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=1, help="LitServe workers_per_device")
    parser.add_argument("--fast-queue", action="store_true", help="LitServe's ZeroMQ queue")
    args = parser.parse_args(argv)
    (run_plain if args.system == "plain" else run_litserve)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
