"""How much GPU work a request asks for, estimated from its body before it is dispatched.

The unit is the megapixel-step: width x height / 1e6 x denoising steps x frames x outputs.
Diffusion requests differ in cost by 10-100x along exactly these axes, and service time is
close to linear in each, so this one number is what the least-work policy balances.
Only small JSON bodies are read; multipart uploads and large bodies get the route's default.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

from dsrouter.config import CostConfig, ModelCost

_SIZE = re.compile(r"^\s*(\d+)\s*[xX*]\s*(\d+)\s*$")
MAX_PARSED_BODY = 256 * 1024
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
            except ValueError:
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
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def _size(payload: dict[str, Any]) -> tuple[int | None, int | None]:
    width, height = _positive(payload.get("width")), _positive(payload.get("height"))
    if width and height:
        return int(width), int(height)
    size = payload.get("size")
    if isinstance(size, str):
        match = _SIZE.match(size)
        if match:
            return int(match.group(1)), int(match.group(2))
    return None, None
