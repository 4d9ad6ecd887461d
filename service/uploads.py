"""Reading image uploads from a request: content type, body size limit, multipart parts."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from service.errors import ServiceError, client_gone, invalid
from service.images import FORMATS, sniff_format

MULTIPART = "multipart/form-data"
UNTYPED = ("application/octet-stream", "")  # raw bodies whose bytes say whether they are an image


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str | None = None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def body_too_large(limit: int) -> ServiceError:
    return invalid(413, "body_too_large", f"request body exceeds the {limit}-byte limit")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it (or its declared length) passes ``limit``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise body_too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:  # gone before the whole body arrived: cancelled, not a server error
        raise client_gone() from None
    return b"".join(chunks)


async def read_uploads(request: Request, limit: int, max_files: int, raw_allowed: bool) -> list[Upload]:
    """Every file part of a multipart body, in order; or, if ``raw_allowed``, a raw image body:
    typed image/*, or untyped (octet-stream or no content type) with an image format's leading bytes."""
    media = media_type(request)
    if media == MULTIPART:
        return await _read_multipart(request, limit, max_files)
    if raw_allowed and media.startswith("image/"):
        return [Upload(await read_body(request, limit))]
    if raw_allowed and media in UNTYPED:
        body = await read_body(request, limit)
        if sniff_format(body) is not None:
            return [Upload(body)]
        raise invalid(415, "unsupported_media_type", f"the {media or 'untyped'} body is not an image in a format "
                      f"the server reads ({', '.join(FORMATS)}); send multipart/form-data or image/*")  # fmt: skip
    expected = (
        "multipart/form-data with a 'file' part, or an image/* body"
        if raw_allowed
        else ("multipart/form-data with one file part per image")
    )
    raise invalid(415, "unsupported_media_type", f"expected {expected}; got {media or 'no content type'}")


async def _read_multipart(request: Request, limit: int, max_files: int) -> list[Upload]:
    body = await read_body(request, limit)
    try:
        uploads = file_parts(body, request.headers.get("content-type", ""), max_files)
    except (MultipartError, ValueError) as e:
        raise invalid(422, "invalid_body", f"bad multipart body: {e}") from None
    if not uploads:
        raise invalid(422, "invalid_body", "the multipart body has no file part (send the image as 'file')")
    return uploads


def file_parts(body: bytes, content_type: str, max_files: int) -> list[Upload]:
    """The file parts (those with a filename) of a whole multipart body, in order, in memory.

    Parsed by ``multipart``'s sans-IO parser (Bottle's, RFC 7578), which finds part borders with
    ``bytes.find``: on a 550-byte upload it takes about 20 µs where python-multipart's byte-wise
    state machine and callbacks took about 80 µs, and Starlette's form layer around that spools
    each file into a SpooledTemporaryFile on top. The body is already in memory and capped at
    ``max_body_bytes``; a body that ends before its closing border is refused. Other parts count
    against the same limit.
    """
    _, options = parse_options_header(content_type)
    boundary = options.get("boundary")
    if not boundary:
        raise ValueError("no boundary in the content type")
    uploads: list[Upload] = []
    others = 0
    segment: MultipartSegment | None = None
    data: list[bytes] = []
    with PushMultipartParser(boundary) as parser:
        for event in parser.parse(body):
            if isinstance(event, MultipartSegment):
                segment, data = event, []
            elif event is not None:
                data.append(event)
            elif segment.filename is not None:
                if len(uploads) == max_files:
                    raise ValueError(f"more than {max_files} file part{'s' if max_files > 1 else ''}")
                uploads.append(Upload(b"".join(data), segment.filename))
            elif (others := others + 1) > max_files:
                raise ValueError(f"more than {max_files} non-file parts")
    return uploads
