"""Machines a run may use: nodes, GPUs per node, CPUs per worker, GPU memory shares.

:class:`ResourcesConfig` is the ``resources`` section of every trainer config. It says what the
cluster offers; the placement code (``megatron_rlhf.workers.placement``) turns it into Ray
bundles: one bundle per rank, with one GPU each when ``gpus_per_node > 0``.

``gpus_per_node = 0`` is a CPU run (ranks are CPU processes; Ray hides every GPU from them).

Guarantees: validation at construction names the field and value; :meth:`ResourcesConfig.check_fits`
says how many GPUs a plan asks for against what the section offers. Importing this module
imports nothing heavy. Not guaranteed: that the cluster really has these resources (Ray waits
for them and the placement code fails after a timeout naming what was asked).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rlhf.config.errors import ConfigError


class ResourcesError(ConfigError):
    """A resources section that is inconsistent or too small for the run."""


@dataclass(frozen=True)
class ResourcesConfig:
    nodes: int = 1
    """Machines in the cluster (>= 1). Ray places ranks on them; a multi-node run joins an
    existing Ray cluster (``ray_address``)."""

    gpus_per_node: int = 0
    """GPUs each node offers to this run (>= 0). 0: a CPU run. Each trainer rank takes one
    whole GPU (colocated groups share it in fractions); each engine takes its vLLM TP size in
    GPUs when it runs on its own."""

    cpus_per_worker: float = 1.0
    """CPU cores reserved per rank bundle (> 0). Colocated actors on a bundle split it."""

    gpu_memory_utilization: float = 0.5
    """Share of a GPU's memory the vLLM engine may take (0 < x <= 1). Colocated, the engine
    shares the actor's GPU, so this leaves the rest to training (the engine sleeps during
    training); an engine on its own GPUs may use more (e.g. 0.9)."""

    def __post_init__(self) -> None:
        _integer_at_least("nodes", self.nodes, 1)
        _integer_at_least("gpus_per_node", self.gpus_per_node, 0)
        if isinstance(self.cpus_per_worker, bool) or not self.cpus_per_worker > 0:
            raise ResourcesError(f"resources.cpus_per_worker={self.cpus_per_worker!r} must be > 0")
        if isinstance(self.gpu_memory_utilization, bool) or not 0 < self.gpu_memory_utilization <= 1:
            raise ResourcesError(
                f"resources.gpu_memory_utilization={self.gpu_memory_utilization!r} must be in (0, 1]"
            )

    @property
    def uses_gpus(self) -> bool:
        """True when ranks run on GPUs."""
        return self.gpus_per_node > 0

    @property
    def total_gpus(self) -> int:
        """GPUs of the whole cluster offered to the run."""
        return self.nodes * self.gpus_per_node

    @property
    def gpus_per_rank(self) -> int:
        """GPUs in one rank bundle: 1 on a GPU run, 0 on a CPU run."""
        return 1 if self.uses_gpus else 0

    def check_fits(self, gpus_needed: int, what: str) -> None:
        """Raise :class:`ResourcesError` when ``gpus_needed`` GPUs exceed the cluster's."""
        if self.uses_gpus and gpus_needed > self.total_gpus:
            raise ResourcesError(
                f"{what} needs {gpus_needed} GPUs but resources offer nodes={self.nodes} x "
                f"gpus_per_node={self.gpus_per_node} = {self.total_gpus}"
            )


def _integer_at_least(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ResourcesError(f"resources.{name}={value!r} must be an integer >= {low}")
