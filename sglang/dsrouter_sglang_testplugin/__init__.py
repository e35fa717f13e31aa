"""A test-only plugin that lets the real `sglang serve` 0.5.23 run on a CPU machine.

dsrouter's real-worker tests (`tests/real/`) hold the router to the unmodified diffusion
server: its CLI, process structure, readiness, ports, error shapes, encoders, weight
updater and sleep/wake code. Only the model pipeline cannot run here, so this plugin swaps
it for a tiny CPU one (`pipeline.py`) and makes the sleep/wake path skip the CUDA calls it
makes even when every module is already on the CPU (`patches.py`).

sglang loads every plugin of the entry point group `sglang.multimodal_gen.plugins` in the
launcher and again in each spawned scheduler. Installed by accident next to a real GPU
worker this one must do nothing, so `register` hooks nothing unless `DSROUTER_TEST_PLUGIN=1`
(not an `SGL_*` name: sglang renames those to `SGLANG_*` and warns).

Knobs, read from the environment by every worker process (see `settings.py`):
`DSROUTER_TEST_STEP_S` (sleep per denoising step), `DSROUTER_TEST_LOAD_S` (extra time with
the port closed, as while weights load), `DSROUTER_TEST_WARMUP_S` (extra time of the
warm-up generation, while `/health` is an empty 503). A prompt containing `DSROUTER_FAIL`
makes the generation raise, as a failing model would.
"""

from __future__ import annotations

from dsrouter_sglang_testplugin.settings import ENABLE_VAR, enabled

__all__ = ["ENABLE_VAR", "register"]

_DIFFUSION = "sglang.multimodal_gen.runtime"
BUILD_PIPELINE = f"{_DIFFUSION}.managers.gpu_worker.build_pipeline"
CONTROLLER = (
    f"{_DIFFUSION}.managers.memory_managers.memory_occupation_controller.MemoryOccupationController"
)


def register() -> None:
    """sglang's plugin entry point: register the hooks, applied later by sglang itself.

    Hook targets are dotted names resolved by `apply_plugin_hooks()`; nothing of the worker
    runtime is imported here (sglang asks plugins not to at this stage).
    """
    if not enabled():
        return
    from sglang.multimodal_gen.runtime.platforms.plugins import HookRegistry, HookType

    from dsrouter_sglang_testplugin import patches
    from dsrouter_sglang_testplugin.pipeline import build_tiny_pipeline

    HookRegistry.register(BUILD_PIPELINE, build_tiny_pipeline, HookType.REPLACE)
    HookRegistry.register(
        f"{CONTROLLER}._clear_torch_device_cache", patches.clear_cache_on_cpu, HookType.REPLACE
    )
    HookRegistry.register(
        f"{CONTROLLER}._move_modules", patches.move_modules_without_cuda, HookType.AROUND
    )
