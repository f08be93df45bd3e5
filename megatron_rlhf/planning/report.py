"""The planner's printed report and its machine-readable last line.

Contract (scripts read it): the last line is exactly
``params_per_gpu=<int> weights_grads_optimizer_gib=<float> peak_gib=<float> fits=<yes|no>``,
each figure the maximum over the job's GPUs (GiB = 2**30 bytes).
"""

from __future__ import annotations

from megatron_rlhf.planning.hardware import GIB
from megatron_rlhf.planning.plan import COMPONENTS, Plan


def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def memory_table(plan: Plan) -> str:
    """Per stage and phase: GiB of each component, and the total."""
    rows_of = plan.stages + ([plan.engine] if plan.engine is not None else [])
    shown = [name for name in COMPONENTS
             if any(stage.phases[phase][name] for stage in rows_of for phase in stage.phases)]
    header = ["stage", "phase", *shown, "total"]
    rows = [header]
    engine = [plan.engine] if plan.engine is not None else []
    for stage in plan.stages + engine:
        for phase, components in stage.phases.items():
            rows.append(["engine" if stage.stage < 0 else str(stage.stage), phase, *(_gib(components[name]) for name in shown),
                         _gib(stage.phase_total(phase))])
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.rjust(width) if column > 1 else cell.ljust(width)
                       for column, (cell, width) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join(lines)


def summary_line(plan: Plan) -> str:
    """The contract's last line."""
    return (f"params_per_gpu={plan.params_per_gpu} "
            f"weights_grads_optimizer_gib={plan.state_bytes_per_gpu / GIB:.3f} "
            f"peak_gib={plan.peak[2] / GIB:.3f} fits={'yes' if plan.fits else 'no'}")


def summary_of(plans: list[Plan]) -> str:
    """The contract's last line over several GPU groups of one job (each figure the maximum)."""
    return (f"params_per_gpu={max(plan.params_per_gpu for plan in plans)} "
            f"weights_grads_optimizer_gib={max(plan.state_bytes_per_gpu for plan in plans) / GIB:.3f} "
            f"peak_gib={max(plan.peak[2] for plan in plans) / GIB:.3f} "
            f"fits={'yes' if all(plan.fits for plan in plans) else 'no'}")


def render(plan: Plan, title: str = "", summary: bool = True) -> str:
    """The whole report: header, table, verdict, host memory and the summary line."""
    layout = plan.layout
    stage, phase, peak = plan.peak
    lines = [
        f"plan: {title} layout {layout.describe()} world={layout.world_size} "
        f"EDP={layout.expert_data_parallel} on {plan.gpu.name} "
        f"(usable {_gib(plan.gpu.usable_bytes)} of {_gib(plan.gpu.total_bytes)} GiB)",
        "GiB per GPU:",
        memory_table(plan),
        f"peak: {_gib(peak)} GiB in phase {phase} on "
        + ("an engine GPU" if stage < 0 else f"pipeline stage {stage}"),
        f"host memory per node: {_gib(plan.host_bytes_per_node)} GiB",
    ]
    if plan.has_rollout:
        lines.append(f"KV cache per token per engine GPU: {plan.kv_bytes_per_token} bytes")
    if plan.engine is not None:
        lines.append(f"engine GPU: KV cache for {plan.engine.engine_sequences} full-length sequences at once "
                     f"(vLLM queues the rest of its share)")
    if not plan.fits:
        lines.append(f"does not fit: {plan.overflow()}")
    if summary:
        lines.append(summary_line(plan))
    return "\n".join(lines)
