"""megatron-rlhf: a Megatron-Core based RLHF training stack.

Importing the package is cheap: it never imports vLLM, Ray, Transformer Engine, torch or even
Megatron-Core. Subpackages import what they need when they are used. Its one side effect: an
import finder that makes Megatron-Core's ``jit_fuser`` a no-op when Megatron is imported later in
a process with a CPU-only torch (:mod:`megatron_rlhf.parallel.megatron_jit`: 1.5 s less per
process importing Megatron, nothing changes on GPU builds).
"""

from megatron_rlhf.parallel import megatron_jit as _megatron_jit

_megatron_jit.install()

__version__ = "0.1.0"

__all__ = ["__version__"]
