"""Streaming multipart parsing for uploads (image edits, video and mesh references).

Uploads through the router can be hundreds of MB, so the simulator parses them as they
arrive and keeps only text fields and the first bytes of each file (enough to read an
image's dimensions). The parser is werkzeug's sans-IO decoder, which Quart already
installs. A malformed or truncated body is not an error of its own: like Starlette's parser
on a real worker, it yields the fields read so far, and the route then reports what is
missing (a 422 for the prompt of an image edit).
"""

from __future__ import annotations

import attrs
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from dsrouter.simworker.asgi import HTTPError, Request

FILE_HEAD = 64 * 1024
MAX_FIELD = 1024 * 1024


@attrs.define
class Upload:
    filename: str
    content_type: str
    size: int = 0
    head: bytes = b""


@attrs.define
class Form:
    fields: dict[str, list[str]] = attrs.Factory(dict)
    files: dict[str, list[Upload]] = attrs.Factory(dict)

    def text(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[0] if values else None

    def uploads(self, *names: str) -> list[Upload]:
        return [upload for name in names for upload in self.files.get(name, [])]


def boundary_of(content_type: str) -> bytes | None:
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value:
            return value.strip('"').encode("latin-1")
    return None


async def read_form(request: Request, boundary: bytes) -> Form:
    form = Form()
    decoder = MultipartDecoder(boundary)
    current: tuple[str, Upload | None] | None = None
    text = bytearray()

    def consume() -> bool:
        nonlocal current, text
        while True:
            event = decoder.next_event()
            if isinstance(event, NeedData):
                return False
            if isinstance(event, Epilogue):
                return True
            if isinstance(event, File):
                upload = Upload(event.filename or "", event.headers.get("content-type", ""))
                form.files.setdefault(event.name, []).append(upload)
                current = (event.name, upload)
            elif isinstance(event, Field):
                current, text = (event.name, None), bytearray()
            elif isinstance(event, Data) and current is not None:
                name, upload = current
                if upload is not None:
                    if len(upload.head) < FILE_HEAD:
                        upload.head += event.data[: FILE_HEAD - len(upload.head)]
                    upload.size += len(event.data)
                else:
                    text += event.data
                    if len(text) > MAX_FIELD:
                        raise HTTPError(400, {"detail": f"form field {name!r} exceeds 1 MB"})
                    if not event.more_data:
                        form.fields.setdefault(name, []).append(text.decode(errors="replace"))

    broken = False
    async for chunk in request.chunks():
        if broken:
            continue  # read the rest, so the connection stays usable
        try:
            decoder.receive_data(chunk)
            consume()
        except ValueError:
            broken = True
    if not broken:
        try:
            decoder.receive_data(None)
            consume()
        except ValueError:
            pass
    return form
