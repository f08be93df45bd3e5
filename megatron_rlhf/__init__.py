"""megatron-rlhf: a Megatron-Core based RLHF training stack.

Importing the package is cheap and side-effect free: it never imports vLLM, Ray, Transformer
Engine or even Megatron-Core. Subpackages import what they need when they are used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
