"""``thinkingvit classify``: send images to a running server and print its answers.

A light module (httpx and tqdm, no torch): it only talks HTTP to ``POST /classify``. Folders are
searched for images; requests go out with bounded concurrency behind a progress bar.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import httpx
from tqdm import tqdm

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
COLUMNS = ("file", "label", "confidence", "exit stage", "GMACs", "ms")


class ClientError(Exception):
    """A problem the user fixes (a missing file, an unreachable server, a refused token): one line."""


@dataclass
class Answer:
    path: Path
    body: dict  # the server's JSON: a classification or {"error": {...}}
    ok: bool
    ms: float  # round trip as the client saw it


def collect_images(paths: list[str]) -> list[Path]:
    """Files as given; folders searched recursively for image files, in name order."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise ClientError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            found += images
        elif path.is_file():
            found.append(path)
        else:
            raise ClientError(f"{path}: no such file or folder")
    return found


def classify(
    paths: list[Path], url: str, threshold: float | None = None, top_k: int | None = None,
    token: str | None = None, concurrency: int = 8, timeout_s: float = 60.0,
) -> list[Answer]:
    """One ``POST /classify`` per image, at most ``concurrency`` at a time; answers in input order."""
    params = {k: v for k, v in (("threshold", threshold), ("top_k", top_k)) if v is not None}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return asyncio.run(_classify_all(paths, url.rstrip("/"), params, headers, concurrency, timeout_s))


async def _classify_all(paths, url, params, headers, concurrency, timeout_s) -> list[Answer]:
    slots = asyncio.Semaphore(max(1, concurrency))
    limits = httpx.Limits(max_connections=max(1, concurrency))
    with tqdm(total=len(paths), desc="classify", unit="img", file=sys.stderr, disable=len(paths) < 2 or None) as bar:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=limits) as client:

            async def one(path: Path) -> Answer:
                async with slots:
                    answer = await _post(client, path, params)
                bar.update()
                return answer

            return await asyncio.gather(*(one(p) for p in paths))


async def _post(client: httpx.AsyncClient, path: Path, params: dict) -> Answer:
    start = time.perf_counter()
    try:
        response = await client.post("/classify", params=params, files={"file": (path.name, path.read_bytes())})
    except httpx.TransportError as e:
        raise ClientError(f"cannot reach the server at {client.base_url}: {str(e) or type(e).__name__}") from None
    ms = (time.perf_counter() - start) * 1000
    if response.status_code == 401:
        raise ClientError(f"the server at {client.base_url} wants a bearer token: pass --token")
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"status": response.status_code, "message": response.text[:200]}}
    return Answer(path, body, response.is_success and "error" not in body, ms)


def error_text(body: dict) -> str:
    error = body.get("error") or {}
    return f"error {error.get('status', '?')}: {error.get('message', body)}"


def write_table(answers: list[Answer], out: TextIO) -> None:
    rows = []
    for a in answers:
        b = a.body
        if a.ok:
            rows.append((str(a.path), b["label"], f"{b['confidence']:.3f}", str(b["exit_stage"]),
                         f"{b['gmacs']:.4g}", f"{a.ms:.1f}"))  # fmt: skip
        else:
            rows.append((str(a.path), error_text(b), "", "", "", f"{a.ms:.1f}"))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    for row in (COLUMNS, *rows):
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")


def write_json_lines(answers: list[Answer], out: TextIO) -> None:
    for a in answers:
        out.write(json.dumps({"file": str(a.path), **a.body, "client_ms": round(a.ms, 1)}) + "\n")


def run(args) -> int:
    """The command: 0 when every image got an answer, 1 when the server refused some."""
    paths = collect_images(args.images)
    answers = classify(paths, args.url, args.threshold, args.top_k, args.token, args.concurrency, args.timeout)
    (write_json_lines if args.json else write_table)(answers, sys.stdout)
    failed = sum(not a.ok for a in answers)
    if failed:
        print(f"thinkingvit classify: the server refused {failed} of {len(answers)} images", file=sys.stderr)
    return 1 if failed else 0
