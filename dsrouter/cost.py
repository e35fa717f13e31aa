"""How much GPU work a request asks for, estimated from its body before it is dispatched.

The unit is the megapixel-step: width x height / 1e6 x denoising steps x frames x outputs.
Diffusion requests differ in cost by 10-100x along exactly these axes, and service time is
close to linear in each, so this one number is what the least-work policy balances.
Only small JSON bodies are read; multipart uploads and large bodies get the route's default.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import attrs

from dsrouter.config import CostConfig, ModelCost

_SIZE = re.compile(r"^\s*(\d{1,7})\s*[xX*]\s*(\d{1,7})\s*$")
MAX_PARSED_BODY = 256 * 1024
MAX_FACTOR = 1_000_000
"""The largest value one cost factor (a side in pixels, steps, frames) is read as."""
_NO_OVERRIDE = ModelCost()


@attrs.frozen
class CostModel:
    config: CostConfig

    def estimate(self, path: str, body: bytes | None, content_type: str) -> float:
        video = path.startswith("/v1/videos")
        payload: dict[str, Any] = {}
        if body and len(body) <= MAX_PARSED_BODY and content_type.startswith("application/json"):
            try:
                parsed = json.loads(body)
            except (ValueError, RecursionError):  # RecursionError: nesting deeper than ~1000
                parsed = None
            if isinstance(parsed, dict):
                payload = parsed
        return self.from_params(payload, video=video)

    def from_params(self, payload: dict[str, Any], *, video: bool) -> float:
        cfg = self.config
        model = payload.get("model")
        override = cfg.models.get(model, _NO_OVERRIDE) if isinstance(model, str) else _NO_OVERRIDE
        width, height = _size(payload)
        if width is None or height is None:
            width = override.width or (cfg.video_width if video else cfg.image_width)
            height = override.height or (cfg.video_height if video else cfg.image_height)
        steps = _positive(payload.get("num_inference_steps")) or override.steps or cfg.default_steps
        frames = 1.0
        if video:
            frames = _positive(payload.get("num_frames")) or (
                (_positive(payload.get("seconds")) or cfg.video_seconds)
                * (_positive(payload.get("fps")) or cfg.video_fps)
            )
        elif _positive(payload.get("num_frames")):
            frames = float(payload["num_frames"])
        n = _positive(payload.get("n")) or _positive(payload.get("num_outputs_per_prompt")) or 1
        n = min(max(n, 1), 10)
        return width * height / 1e6 * float(steps) * frames * n


def _positive(value: Any) -> float | None:
    """A positive, finite number no larger than `MAX_FACTOR`, or None.

    Clients send anything: `"Infinity"`, `1e400` (JSON reads it as inf) or an integer of
    400 digits (which `float()` refuses) must give an estimate, not an exception or an
    infinite cost that no worker could be compared by.
    """
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = min(value, MAX_FACTOR)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(min(value, MAX_FACTOR))
    return None


def _size(payload: dict[str, Any]) -> tuple[int | None, int | None]:
    width, height = _positive(payload.get("width")), _positive(payload.get("height"))
    if width and height:
        return int(width), int(height)
    size = payload.get("size")
    if isinstance(size, str):
        match = _SIZE.match(size)
        if match:
            return min(int(match.group(1)), MAX_FACTOR), min(int(match.group(2)), MAX_FACTOR)
    return None, None
