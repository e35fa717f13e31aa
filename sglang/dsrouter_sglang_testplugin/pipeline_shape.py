"""The parameters of the test pipeline's `transformer`, shared by the pipeline and the model
script (which must not import torch)."""

WIDTH = 8
WEIGHT_SHAPES: dict[str, tuple[int, ...]] = {"proj.weight": (WIDTH, WIDTH), "proj.bias": (WIDTH,)}
