"""Megatron-Core's ``jit_fuser`` is a no-op where torch has no GPU backend (a CPU-only build).

Why: ``megatron.core.jit`` sets ``jit_fuser = torch.compile`` and some 40 Megatron functions are
decorated with it when their modules load (the bias-GeLU/SwiGLU/GeGLU, bias-dropout-add and
cross-entropy fusions, a few activations). Decorating imports TorchDynamo and Inductor: measured on
the 2-core CPU machine, ``import megatron.core`` took 4.3-4.5 s, 2.7-3.0 s without them, in every
process that imports Megatron (each Megatron rank, each Ray worker of an RL run, each gloo rank of
a distributed test). On CPU none of those functions runs in this stack (the fusions must stay off
there: :mod:`megatron_rlhf.parallel.cpu_support`), and where one would (a CPU-only torch has no
other device), Inductor would compile it on first call, seconds of CPU time for an elementwise
kernel; Megatron's own ``disable_jit_fuser`` leaves it eager.

How: :func:`install` puts a finder on ``sys.meta_path`` that notices ``megatron.core.jit`` being
loaded and, right after that module has run and before any other Megatron module takes the name
(``from megatron.core.jit import jit_fuser`` runs at their import), calls its
``disable_jit_fuser()`` when torch is a CPU-only build (``torch.version.cuda`` and
``torch.version.hip`` both None). ``megatron_rlhf/__init__.py`` installs it, so any process that
imports this package before Megatron gets it; the finder imports nothing itself (``import
megatron_rlhf`` stays cheap).

Guarantees: nothing changes on a torch build with CUDA or ROCm (the fusions' compiled kernels are
kept for GPU runs); a Megatron imported before this package is left as it is; other modules load
exactly as without the finder; installing twice installs one finder. :func:`jit_fuser_disabled`
says what happened in this process.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

JIT_MODULE = "megatron.core.jit"


def cpu_only_torch() -> bool:
    """True when the imported torch was built without CUDA and ROCm (no GPU can run its kernels)."""
    import torch

    return getattr(torch.version, "cuda", None) is None and getattr(torch.version, "hip", None) is None


class _JitLoader(importlib.abc.Loader):
    """Runs ``megatron.core.jit`` with its own loader, then turns its fuser off on CPU-only torch."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def __getattr__(self, name: str):  # get_source, get_filename, is_package, ...: the file loader's
        return getattr(self.loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        if cpu_only_torch() and callable(getattr(module, "disable_jit_fuser", None)):
            module.disable_jit_fuser()
            module._megatron_rlhf_jit_disabled = True


class _JitFinder(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core.jit`` through the other finders and wraps its loader."""

    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if name != JIT_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _JitLoader(spec.loader)
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once per process)."""
    if not any(isinstance(finder, _JitFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _JitFinder())


def jit_fuser_disabled() -> bool:
    """Whether this process's Megatron was imported with its ``jit_fuser`` turned off here."""
    module = sys.modules.get(JIT_MODULE)
    return bool(getattr(module, "_megatron_rlhf_jit_disabled", False))
