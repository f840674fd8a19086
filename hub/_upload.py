"""Streaming bundle uploads: request body -> temp file, under a byte limit.

Starlette's form parser spools whole files before the route sees them; this parser
writes the file part straight to a temp file in the hub's upload folder and stops
reading the moment the limit is passed. Accepts ``multipart/form-data`` (the first
file part, normally the field ``bundle``) or a raw ``application/octet-stream`` body.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from hub.errors import InvalidBundle, InvalidRequest

__all__ = ["receive_bundle"]

_MAX_FIELD_BYTES = 64 * 1024
_SAFE_NAME = 200


def _too_large(limit: int) -> InvalidBundle:
    return InvalidBundle(f"bundle is larger than the upload limit of {limit} bytes")


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    field: bytes = b""
    value: bytes = b""


class _MultipartSink:
    """Callbacks for python-multipart: the first file part goes to ``out``."""

    def __init__(self, out: IO[bytes], limit: int) -> None:
        self.out = out
        self.limit = limit
        self.written = 0
        self.filename: str | None = None
        self.done = False
        self._part = _Part()
        self._to_file = False

    def on_part_begin(self) -> None:
        self._part = _Part()
        self._to_file = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._part.field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._part.value += data[start:end]

    def on_header_end(self) -> None:
        self._part.headers[self._part.field.lower()] = self._part.value
        self._part.field = self._part.value = b""

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self._part.headers.get(b"content-disposition", b""))
        filename = params.get(b"filename")
        if filename is not None and not self.done:
            self.filename = os.path.basename(filename.decode(errors="replace"))[:_SAFE_NAME] or "bundle"
            self._to_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._to_file:
            return
        self.written += end - start
        if self.written > self.limit:
            raise _too_large(self.limit)
        self.out.write(data[start:end])

    def on_part_end(self) -> None:
        if self._to_file:
            self.done = True
            self._to_file = False


async def receive_bundle(request: Request, dest_dir: Path, limit: int) -> tuple[Path, str]:
    """Stream the uploaded bundle into a new temp file in ``dest_dir``.

    Returns the temp file (the caller deletes it) and the client's file name.

    Raises:
        InvalidBundle: the upload is over ``limit`` bytes.
        InvalidRequest: no file in the request, a malformed multipart body, or the
            client went away mid-upload.
    """
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + _MAX_FIELD_BYTES:
        raise _too_large(limit)
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".upload-", suffix=".efb")
    path = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as out:
            if ctype == b"multipart/form-data":
                boundary = params.get(b"boundary")
                if not boundary:
                    raise InvalidRequest("multipart upload without a boundary")
                sink = _MultipartSink(out, limit)
                parser = MultipartParser(
                    boundary,
                    {  # type: ignore[arg-type]
                        "on_part_begin": sink.on_part_begin,
                        "on_header_field": sink.on_header_field,
                        "on_header_value": sink.on_header_value,
                        "on_header_end": sink.on_header_end,
                        "on_headers_finished": sink.on_headers_finished,
                        "on_part_data": sink.on_part_data,
                        "on_part_end": sink.on_part_end,
                    },
                )
                async for chunk in request.stream():
                    await run_in_threadpool(parser.write, chunk)
                parser.finalize()
                if sink.filename is None or not sink.done:
                    raise InvalidRequest("no bundle file in the upload (send it as the form field 'bundle')")
                filename = sink.filename
            elif ctype in (b"application/octet-stream", b""):
                written = 0
                async for chunk in request.stream():
                    written += len(chunk)
                    if written > limit:
                        raise _too_large(limit)
                    await run_in_threadpool(out.write, chunk)
                if written == 0:
                    raise InvalidRequest("empty upload")
                filename = request.query_params.get("filename", "bundle")[:_SAFE_NAME]
            else:
                raise InvalidRequest(
                    f"upload a bundle as multipart/form-data or application/octet-stream, "
                    f"not {ctype.decode(errors='replace')}"
                )
        return path, filename
    except MultipartParseError as e:
        path.unlink(missing_ok=True)
        raise InvalidRequest(f"malformed multipart upload: {e}") from e
    except ClientDisconnect as e:
        path.unlink(missing_ok=True)
        raise InvalidRequest("client disconnected during the upload") from e
    except BaseException:
        path.unlink(missing_ok=True)
        raise
