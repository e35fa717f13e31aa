"""A tiny CPU stand-in for a diffusion pipeline, shaped like what sglang's GPU worker calls.

The real worker builds a `ComposedPipelineBase` and calls `forward`, `forward_batch` or
`forward_batch_sequentially` on it, reads `modules` (the weight updater, the checksum
route and the sleep/wake controller work on its `torch.nn.Module` values), and looks at
`stages`, `memory_usages` and `_stage_name_mapping`. This object provides just that.

What it honours, so the router's tests see real answers: the requested width and height,
`num_inference_steps` (one sleep of `DSROUTER_TEST_STEP_S` and one progress report per
step), `num_outputs_per_prompt`, `num_frames` (video pipelines), the seed, and `rollout`
(log-probabilities, and the DiT trajectory when asked). The pixels depend on the seed and
on the loaded weights, so a refit visibly changes the output. The one module,
`transformer`, is loaded from `<model>/transformer/*.safetensors` as the weight updater
will load it, so `get_weights_checksum` tells two weight versions apart.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dsrouter_sglang_testplugin.pipeline_shape import WIDTH
from dsrouter_sglang_testplugin.settings import (
    FAIL_MARKER,
    LOAD_VAR,
    STEP_VAR,
    WARMUP_VAR,
    seconds,
)

log = logging.getLogger("dsrouter_sglang_testplugin")

WARMUP_SIDE = 16
"""Warm-up outputs are never saved; a small tensor keeps warm-up cheap whatever it asks."""


class TinyModule(torch.nn.Module):
    """One linear layer: real parameters for the weight updater and the checksums."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(WIDTH, WIDTH)


def load_transformer(model_path: str) -> TinyModule:
    """The module with the weights of `<model_path>/transformer/*.safetensors` (if any)."""
    from safetensors.torch import load_file

    module = TinyModule()
    files = sorted((Path(model_path) / "transformer").glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    if state:
        module.load_state_dict(state)
    module.requires_grad_(False)
    return module


def build_tiny_pipeline(server_args: Any) -> TinyPipeline:
    """Replaces `gpu_worker.build_pipeline`; `DSROUTER_TEST_LOAD_S` makes loading slow."""
    delay = seconds(LOAD_VAR)
    if delay:
        log.info("dsrouter test plugin: loading for %.1f s", delay)
        time.sleep(delay)
    return TinyPipeline(server_args.model_path, _is_video(server_args))


def _is_video(server_args: Any) -> bool:
    task = server_args.pipeline_config.task_type
    return not task.is_image_gen()


class TinyPipeline:
    """Duck-types the parts of `ComposedPipelineBase` the GPU worker uses."""

    def __init__(self, model_path: str, video: bool) -> None:
        self.model_path = model_path
        self.video = video
        self.modules: dict[str, torch.nn.Module] = {"transformer": load_transformer(model_path)}
        self.stages: list[Any] = []
        self.memory_usages: dict[str, float] = {}
        self._stage_name_mapping: dict[str, Any] = {}

    def get_module(self, name: str) -> torch.nn.Module | None:
        return self.modules.get(name)

    # ---- the three entry points of the GPU worker -----------------------------------------

    def forward(self, req: Any, server_args: Any) -> Any:
        """All outputs of `req` in one tensor `[n, 3, H, W]` (video: `[n, 3, T, H, W]`)."""
        count = max(1, int(req.num_outputs_per_prompt or 1))
        return self._run(req, list(range(count)), count)

    def forward_batch(self, reqs: list[Any], server_args: Any) -> list[Any]:
        return [self.forward(req, server_args) for req in reqs]

    def forward_batch_sequentially(self, reqs: list[Any], server_args: Any) -> Iterator[Any]:
        """One result per output when the pipeline config generates outputs one by one
        (the worker then merges them), else one result per request, as the real base does."""
        sequential = server_args.pipeline_config.supports_sequential_multi_output_inference()
        for req in reqs:
            count = max(1, int(req.num_outputs_per_prompt or 1))
            if sequential and count > 1:
                for index in range(count):
                    yield self._run(copy.copy(req), [index], count)
            else:
                yield self.forward(req, server_args)

    # ---- the "model" ----------------------------------------------------------------------

    def _run(self, req: Any, indices: list[int], total_outputs: int) -> Any:
        prompts = req.prompt if isinstance(req.prompt, list) else [req.prompt]
        if any(FAIL_MARKER in str(p) for p in prompts):
            raise RuntimeError(f"prompt contains {FAIL_MARKER}: generation failed on purpose")
        steps = max(1, int(req.num_inference_steps or 1))
        if req.is_warmup:
            time.sleep(seconds(WARMUP_VAR))
            width = height = WARMUP_SIDE
            frames = 1
        else:
            width, height = int(req.width or 64), int(req.height or 64)
            frames = max(1, int(req.num_frames or 1)) if self.video else 1
            self._denoise(req, steps, indices[0], total_outputs)
        seeds = [_seed_of(req, index) for index in indices]
        req.output = torch.stack([self._picture(s, width, height, frames) for s in seeds])
        if getattr(req, "rollout", False):
            req.rollout_trajectory_data = _trajectory(req, seeds, steps)
        return req

    def _denoise(self, req: Any, steps: int, first_output: int, total_outputs: int) -> None:
        """Sleep per step and report progress as the real denoising loop does."""
        from sglang.multimodal_gen.runtime.managers.progress_reporter import (
            get_progress_reporter,
        )

        reporter = get_progress_reporter() if req.report_progress else None
        request_ids = req.client_request_ids() if reporter is not None else []
        step_s = seconds(STEP_VAR)
        for step in range(steps):
            if step_s:
                time.sleep(step_s)
            if request_ids:
                reporter.step(
                    request_ids=request_ids,
                    completed=first_output * steps + step + 1,
                    total=total_outputs * steps,
                )

    def _picture(self, seed: int, width: int, height: int, frames: int) -> torch.Tensor:
        """A colour ramp whose tint comes from the seed and whose level from the weights."""
        generator = torch.Generator().manual_seed(seed)
        tint = torch.rand(3, 1, 1, generator=generator)
        level = torch.sigmoid(self.modules["transformer"].proj.weight.float().mean()).item()
        ramp = torch.linspace(0.0, 1.0, width).view(1, 1, width).expand(3, height, width)
        image = (0.5 * tint + 0.3 * ramp + 0.2 * level).clamp(0.0, 1.0)
        if not self.video:
            return image
        fade = torch.linspace(0.6, 1.0, frames).view(1, frames, 1, 1)
        return (image.unsqueeze(1) * fade).contiguous()


def _seed_of(req: Any, index: int) -> int:
    seeds = getattr(req, "seeds", None)
    if isinstance(seeds, list) and len(seeds) > index:
        return int(seeds[index])
    seed = req.seed
    if isinstance(seed, list) and seed:
        return int(seed[index % len(seed)])
    return int(seed or 0) + index


def _trajectory(req: Any, seeds: list[int], steps: int) -> Any:
    """What a rollout returns per output: log-probabilities per step, the DiT trajectory
    on request (`[n, steps + 1, 4]` latents, `[steps]` timesteps, `[steps + 1]` sigmas)."""
    from sglang.multimodal_gen.runtime.post_training.rl_dataclasses import (
        RolloutDitTrajectory,
        RolloutTrajectoryData,
    )

    offsets = torch.tensor([float(s % 1000) / 1000 for s in seeds]).view(-1, 1)
    log_probs = -(offsets + torch.arange(steps, dtype=torch.float32).view(1, -1) / steps)
    trajectory = None
    if getattr(req, "rollout_return_dit_trajectory", False):
        sigmas = torch.linspace(1.0, 0.0, steps + 1)
        latents = offsets.view(-1, 1, 1) * sigmas.view(1, -1, 1).expand(len(seeds), steps + 1, 4)
        trajectory = RolloutDitTrajectory(
            latents=latents.contiguous(), timesteps=sigmas[:-1] * 1000, sigmas=sigmas
        )
    return RolloutTrajectoryData(rollout_log_probs=log_probs, dit_trajectory=trajectory)
