"""No import in the package runs from a lower layer up to a higher one.

The layers, lowest first, are decided from DESIGN.md's layout and from what the code imports
(every ``import`` and ``from ... import`` of every module, including those inside functions,
read with :mod:`ast`; nothing is imported):

==================  ==============================================================================
config              typed settings (parallel layout, optimizer, PPO update plan): no package imports
types               batches passed between stages; running moments (a value type of several layers)
parallel            process groups, Megatron parallel state, CPU support, pipeline collectives
algorithms          pure tensor functions (advantages, losses, KL)
models              layer specs, heads, provider, log-probs
planning            the fit planner: layout validation and bytes per GPU (reads the model families)
mapping             HF <-> Megatron names and slicing (reads the model families of ``models``)
checkpoint          Megatron dist checkpoints, HF import / export
data                datasets, chat templates, curricula, reward-model data
rollout             the vLLM engine and the weight sync into it
rewards             reward sources (verifiers, RM / PRM scoring, GenRM) and the router
evaluation          Best-of-N, held-out evaluation, reports; pipelines over engine + rewards
preflight           checks every process-starting command runs first (files, routes, scorers, limits)
training            the Megatron training library the workers run on their ranks (updater, PPO
                    update, actor / critic trainers, LM loss, per-rank GPU metrics)
workers             Ray workers holding model shards
trainer             the loops and controllers (RL loop and step, SFT, reward-model training); also
                    ``studies``, the scaling studies, which compose those loops with the evaluations
                    (one layer with the trainers they call, below the ``study`` command)
cli                 entry points: the ``cli`` package (one module per command) and ``__main__``;
                    command bodies that compose the layers below (``demo``, ``demo_stages``,
                    ``demo_genrm``, ``conversion_demo``)
==================  ==============================================================================

A module's layer is its package's, except the modules listed in ``MODULE_LAYERS`` (each with the
reason it sits elsewhere than its folder suggests). A module may import its own layer and any
lower one; an upward import is a failure naming the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "megatron_rlhf"

LAYERS = (
    "config", "types", "parallel", "algorithms", "models", "planning", "mapping", "checkpoint", "data", "rollout",
    "rewards", "evaluation", "preflight", "training", "workers", "trainer", "cli",
)

PACKAGE_LAYERS = {
    "config": "config", "types": "types", "running_moments": "types", "parallel": "parallel", "algorithms": "algorithms",
    "models": "models", "mapping": "mapping", "checkpoint": "checkpoint", "data": "data",
    "rollout": "rollout", "rewards": "rewards", "evaluation": "evaluation", "workers": "workers",
    "planning": "planning", "preflight": "preflight", "trainer": "trainer", "training": "training", "studies": "trainer",
    "cli": "cli", "__main__": "cli", "demo": "cli",
    "demo_stages": "cli", "demo_genrm": "cli", "conversion_demo": "cli",
}
"""Layer of each top-level package or module of ``megatron_rlhf``."""

MODULE_LAYERS: dict[str, str] = {
    # installed by the package's own __init__ (the lowest layer) before any Megatron import, and
    # imports nothing of the package itself
    "parallel.megatron_jit": "config",
}
"""Modules whose layer is not their folder's, with the reason."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """Layer of ``module`` (a dotted name relative to ``megatron_rlhf``; "" is the package)."""
    if not module:
        return "config"  # the package's own __init__ imports only parallel.megatron_jit (see MODULE_LAYERS)
    for name, layer in MODULE_LAYERS.items():
        if module == name or module.startswith(name + "."):
            return layer
    return PACKAGE_LAYERS[module.split(".")[0]]


def _submodule_or_self(package: str, name: str) -> str:
    candidate = f"{package}.{name}".strip(".")
    path = PACKAGE_ROOT.joinpath(*candidate.split("."))
    return candidate if path.is_dir() or path.with_suffix(".py").is_file() else package


def package_imports(path: Path) -> list[tuple[str, int]]:
    """``(imported module relative to megatron_rlhf, line)`` for every package import in ``path``."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                if not node.module or not (node.module == "megatron_rlhf" or node.module.startswith("megatron_rlhf.")):
                    continue
                target = node.module.removeprefix("megatron_rlhf").lstrip(".")
            # ``from package import name``: name is a module when a file or folder has it, else an attribute
            names = [_submodule_or_self(target, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name.removeprefix("megatron_rlhf").lstrip(".") for alias in node.names
                     if alias.name.split(".")[0] == "megatron_rlhf"]
        found.extend((name, node.lineno) for name in names if name)
    return found


def test_every_module_has_a_layer():
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        assert layer_of(_module_name(path)) in LAYERS, path


def test_no_import_runs_from_a_lower_layer_up_to_a_higher_one():
    rank = {layer: index for index, layer in enumerate(LAYERS)}
    upward = []
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        source = _module_name(path)
        for target, line in package_imports(path):
            if rank[layer_of(target)] > rank[layer_of(source)]:
                upward.append(f"{path.relative_to(PACKAGE_ROOT.parent)}:{line}: {layer_of(source)} module "
                              f"{source} imports {layer_of(target)} module {target}")
    assert not upward, "imports running up the layers:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checker itself: a lazy, relative import from rollout up into trainer is found."""
    module = tmp_path / "megatron_rlhf" / "rollout" / "probe.py"
    module.parent.mkdir(parents=True)
    module.write_text("def f():\n    from ..trainer.rl_step import rl_step\n    return rl_step\n")
    global PACKAGE_ROOT
    saved, PACKAGE_ROOT = PACKAGE_ROOT, tmp_path / "megatron_rlhf"
    try:
        assert package_imports(module) == [("trainer.rl_step", 2)]
        assert layer_of("rollout.probe") == "rollout" and layer_of("trainer.rl_step") == "trainer"
    finally:
        PACKAGE_ROOT = saved
