"""How much GPU work a request asks for, estimated from its body before it is dispatched.

The unit is the megapixel-step: width x height / 1e6 x denoising steps x frames x outputs.
Diffusion requests differ in cost by 10-100x along exactly these axes, and service time is
close to linear in each, so this one number is what the least-work policy balances.

The fields are read with the worker's own rules (`shared/WORKER_API.md` sections 5 and 6,
as `dsrouter.simworker.generation` implements them): integers as Python's `int()` reads
them (`true` is 1, `"30"` is 30, `7.9` is 7), `width`/`height` win over `size` only when
both are given, `n` is clamped to 1..10, a video's frames default to seconds x fps. A price
read any other way is a lever for clients: `{"width": true, "height": true, "size":
"4096x4096"}` renders one pixel, and pricing it as 4096 squared taught the router that the
worker was hundreds of times faster than it is. A request the worker would refuse (400)
costs nothing: it does no GPU work. Only small JSON bodies and the leading text fields of a
multipart form are read; anything else gets the route's defaults.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from dsrouter.config import CostConfig, ModelCost

_SIZE = re.compile(r"^(\d+)[xX](\d+)$")
MAX_PARSED_BODY = 256 * 1024
"""JSON bodies above this are not parsed (they carry inline images, not prices)."""
MAX_FORM_PREFIX = 64 * 1024
"""The part of a multipart body searched for text fields: the OpenAI SDK sends them before
the files."""
MAX_SIDE = 4096
"""The largest side the worker accepts (the simulated worker's limit; 400 beyond)."""
MAX_FACTOR = 1_000_000
"""The largest value steps or frames are read as: a 400-digit integer still gives a finite
price (and ranks as the most expensive request there can be)."""
MAX_OUTPUTS = 10
_NO_OVERRIDE = ModelCost()


class _Refused(Exception):
    """The worker answers this request 400 before doing any work."""


def read_fields(body: bytes | None, content_type: str) -> dict[str, Any]:
    """The request's top-level fields as the worker sees them: a JSON object, or the text
    fields of a multipart form (as strings, the way the OpenAI SDK sends `videos.create`).
    Empty when the body is absent, too large, or not one of those."""
    if not body:
        return {}
    if content_type.startswith("application/json"):
        if len(body) > MAX_PARSED_BODY:
            return {}
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than ~1000
            return {}
        return parsed if isinstance(parsed, dict) else {}
    if content_type.startswith("multipart/form-data"):
        return _form_fields(body[:MAX_FORM_PREFIX], content_type)
    return {}


def _form_fields(prefix: bytes, content_type: str) -> dict[str, Any]:
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if match is None:
        return {}
    decoder = MultipartDecoder(match.group(1).encode("latin-1"), max_form_memory_size=None)
    fields: dict[str, Any] = {}
    name: str | None = None
    value = bytearray()
    try:
        decoder.receive_data(prefix)
        decoder.receive_data(None)
        while True:
            event = decoder.next_event()
            if isinstance(event, NeedData | Epilogue):
                break
            if isinstance(event, File):
                name = None
            elif isinstance(event, Field):
                name, value = event.name, bytearray()
            elif isinstance(event, Data) and name is not None:
                value += event.data
                if not event.more_data:
                    fields.setdefault(name, value.decode("utf-8", "replace"))
                    name = None
    except ValueError:  # a malformed or truncated form: keep the fields read so far
        pass
    return fields


@attrs.frozen
class CostModel:
    config: CostConfig

    def estimate(self, path: str, body: bytes | None, content_type: str) -> float:
        return self.from_params(
            read_fields(body, content_type), video=path.startswith("/v1/videos")
        )

    def from_params(self, payload: dict[str, Any], *, video: bool) -> float:
        """Megapixel-steps the worker will run for `payload`; 0 when it refuses it."""
        try:
            return self._units(payload, video)
        except _Refused:
            return 0.0

    def _units(self, payload: dict[str, Any], video: bool) -> float:
        cfg = self.config
        model = payload.get("model")
        override = cfg.models.get(model, _NO_OVERRIDE) if isinstance(model, str) else _NO_OVERRIDE
        if video:
            default = (cfg.video_width, cfg.video_height)
        else:
            default = (override.width or cfg.image_width, override.height or cfg.image_height)
        width, height = _dimensions(payload, default)
        steps = _int(payload, "num_inference_steps") or override.steps or cfg.default_steps
        frames: float = _int(payload, "num_frames") or 1
        if video:
            seconds = _int(payload, "seconds") or cfg.video_seconds
            fps = _int(payload, "fps") or cfg.video_fps
            frames = _int(payload, "num_frames") or min(seconds * fps, MAX_FACTOR)
        n = _outputs(payload)
        return width * height / 1e6 * min(steps, MAX_FACTOR) * min(frames, MAX_FACTOR) * n


def _to_int(value: Any) -> int:
    """`int(value)` as the worker calls it, or `_Refused` where it raises."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise _Refused from None


def _int(payload: dict[str, Any], key: str) -> int | None:
    """A field the worker reads as a positive integer; None when absent (its default)."""
    value = payload.get(key)
    if value is None:
        return None
    number = _to_int(value)
    if number <= 0:
        raise _Refused
    return number


def _dimensions(payload: dict[str, Any], default: tuple[float, float]) -> tuple[int, int]:
    width, height = _int(payload, "width"), _int(payload, "height")
    if width and height:
        size = (width, height)
    elif payload.get("size"):
        match = _SIZE.match(str(payload["size"]).strip())
        if match is None:
            raise _Refused
        size = (int(match.group(1)), int(match.group(2)))
    else:
        return int(default[0]), int(default[1])
    if not all(0 < side <= MAX_SIDE for side in size):
        raise _Refused
    return size


def _outputs(payload: dict[str, Any]) -> int:
    raw = payload.get("n", payload.get("num_outputs_per_prompt", 1))
    return min(max(_to_int(raw or 1), 1), MAX_OUTPUTS)
