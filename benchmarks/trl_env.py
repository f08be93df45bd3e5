"""TRL in an environment of its own for ``benchmarks/grpo_vs_trl_cpu.py`` (never in the project's ``.venv``).

:func:`ensure_trl_python` returns a Python that imports the pinned ``trl`` of
``benchmarks/requirements-trl.txt``: the one at ``<repo>/.trl-venv`` (git-ignored) when it is
already there and complete, else it creates that venv (``python -m venv`` from the running
interpreter's base, Python 3.11) and ``pip install``\\ s the pinned requirements through the
machine's ordinary pip configuration (torch's CPU build comes from pip's find-links where the
machine has them, as for the project's ``.venv``; set ``PIP_EXTRA_INDEX_URL`` to PyTorch's CPU
index elsewhere to avoid the CUDA build).

Guarantee: the returned interpreter imports ``trl`` at the pinned version (checked after the
install; a failed or partial install raises, naming the log). Not guaranteed: an offline machine
without the wheels cannot create it (pass ``--trl-python`` to use an existing environment).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "benchmarks" / "requirements-trl.txt"
DEFAULT_VENV = ROOT / ".trl-venv"


def pinned_version(package: str, requirements: Path = REQUIREMENTS) -> str:
    """The ``==`` version pinned for ``package`` in a requirements file."""
    for line in requirements.read_text().splitlines():
        match = re.fullmatch(rf"\s*{re.escape(package)}==([^\s#]+)\s*(#.*)?", line)
        if match:
            return match.group(1)
    raise ValueError(f"{requirements} pins no version of {package}")


def _has_trl(python: Path, version: str) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", "import importlib.metadata as m, trl; print(m.version('trl'))"],
                           capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() == version


def ensure_trl_python(venv: Path = DEFAULT_VENV, log=print) -> str:
    """A Python with the pinned TRL: ``venv``'s, created and installed when missing (see module doc)."""
    python = venv / "bin" / "python"
    version = pinned_version("trl")
    if _has_trl(python, version):
        return str(python)
    log(f"setting up TRL {version} in {venv} (once; pip output in {venv}/install.log) ...")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    with open(venv / "install.log", "w") as install_log:
        code = subprocess.run([str(python), "-m", "pip", "install", "-r", str(REQUIREMENTS)],
                              stdout=install_log, stderr=subprocess.STDOUT).returncode
    if code != 0 or not _has_trl(python, version):
        raise RuntimeError(f"installing {REQUIREMENTS} into {venv} failed (exit {code}); see {venv}/install.log")
    return str(python)


if __name__ == "__main__":
    print(ensure_trl_python())
