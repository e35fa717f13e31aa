"""dsrouter: a router for SGLang diffusion workers."""

__version__ = "0.1.0"
