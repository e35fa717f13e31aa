"""`dsrouter-test-models DIR`: weight-less model directories the real `sglang serve` accepts.

sglang resolves a local model from its `model_index.json` (`_class_name` picks the pipeline
config, hence the task types, defaults and output kind), so each directory holds a real one
with the usual component entries and an empty folder per component. The only weights are
those the test plugin's pipeline loads: `transformer/diffusion_pytorch_model.safetensors`,
a few hundred bytes, in two versions so a refit has something to change.

Written without torch (the safetensors format is a JSON header and raw little-endian
floats), so the script also runs where sglang is not installed.

    DIR/FLUX.2-dev            Flux2Pipeline (text and optional image to image), weights v1
    DIR/FLUX.2-dev-v2         weights v2 of the same model
    DIR/Wan2.1-T2V-1.3B       WanPipeline (text to video), weights v1
    DIR/Wan2.1-T2V-1.3B-v2    weights v2 of the same model

The names matter: sglang picks a model's native pipeline config by its class name and by
known model names, and only `FLUX.2-dev` gives the Flux2 config, whose task `TI2I` serves
both `/v1/images/generations` and `/v1/images/edits`.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
from pathlib import Path

from dsrouter_sglang_testplugin.pipeline_shape import WEIGHT_SHAPES

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

DIRECTORIES = {"image": "FLUX.2-dev", "video": "Wan2.1-T2V-1.3B"}
MODEL_INDEX = {
    "image": {
        "_class_name": "Flux2Pipeline",
        "_diffusers_version": "0.36.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Mistral3ForConditionalGeneration"],
        "tokenizer": ["transformers", "PixtralProcessor"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
    },
    "video": {
        "_class_name": "WanPipeline",
        "_diffusers_version": "0.33.0",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    },
}
VERSIONS = {"": 1, "-v2": 2}
"""Directory suffix -> seed of the weights."""


def safetensors_bytes(tensors: dict[str, tuple[list[int], list[float]]]) -> bytes:
    """A safetensors file of float32 tensors: name -> (shape, values)."""
    header: dict[str, object] = {}
    payload = b""
    for name, (shape, values) in tensors.items():
        data = struct.pack(f"<{len(values)}f", *values)
        header[name] = {
            "dtype": "F32",
            "shape": shape,
            "data_offsets": [len(payload), len(payload) + len(data)],
        }
        payload += data
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + payload


def weights(seed: int) -> bytes:
    """The transformer weights of one version: small values, different per seed."""
    rng = random.Random(seed)
    tensors = {}
    for name, shape in WEIGHT_SHAPES.items():
        count = 1
        for side in shape:
            count *= side
        tensors[name] = (list(shape), [rng.uniform(-0.5, 0.5) for _ in range(count)])
    return safetensors_bytes(tensors)


def write_model(directory: Path, kind: str, seed: int) -> None:
    """One model directory: model_index.json, empty component folders, the weights."""
    index = MODEL_INDEX[kind]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for component in index:
        if not component.startswith("_"):
            (directory / component).mkdir(exist_ok=True)
    (directory / "transformer" / WEIGHTS_FILE).write_bytes(weights(seed))


def make_models(root: Path) -> dict[str, Path]:
    """Every model directory under `root`, by kind and version: `image`, `image-v2`,
    `video`, `video-v2`."""
    made = {}
    for kind in MODEL_INDEX:
        for suffix, seed in VERSIONS.items():
            path = root / (DIRECTORIES[kind] + suffix)
            write_model(path, kind, seed)
            made[kind + suffix] = path
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dsrouter-test-models",
        description="Write weight-less sglang model directories for the test plugin.",
    )
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    for name, path in make_models(args.directory).items():
        print(f"{name}\t{path.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
