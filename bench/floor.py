"""The floor of issue #14: a bare FastAPI endpoint with no model, for the front-end cost to beat.

It reads the same multipart upload (``request.form()``), decodes and preprocesses the PNG exactly
as our API servers do, and returns JSON: what any Python HTTP front end must spend per request.

    python -m bench.floor --port 8003
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI, Request

from model.preprocess import FASHION_MNIST
from service.images import decode_image

app = FastAPI()


@app.post("/classify")
async def classify(request: Request) -> dict:
    form = await request.form()
    image = decode_image(await form["file"].read(), FASHION_MNIST, 25_000_000)
    return {"label": "none", "shape": list(image.shape), "mean": float(image.mean())}


@app.get("/readyz")
async def readyz() -> dict:
    return {"status": "ready"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
