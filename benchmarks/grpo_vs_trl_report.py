"""Summaries, paired ratios and the Markdown report of ``benchmarks/grpo_vs_trl_cpu.py`` (pure).

A *run* is one side's process (``ours`` synchronous, ``ours_async`` one-step-off, ``trl``) in one
repeat; :func:`summarise` takes medians over its steps after the warm-up. Repeats run the sides
in ABBA order (``ours, ours_async, trl`` then ``trl, ours_async, ours``, ...), so slow drift of
the machine falls on both sides; :func:`paired_ratios` divides our median step time by TRL's
*within* each repeat and the report gives the median of those paired ratios.
"""

from __future__ import annotations

import statistics

SIDES = ("ours", "ours_async", "trl")
SIDE_NAMES = {"ours": "ours (sync)", "ours_async": "ours (one-step-off)", "trl": "TRL"}


def side_order(repeat: int) -> tuple[str, ...]:
    """ABBA: the sides forwards on even repeats, backwards on odd ones."""
    return SIDES if repeat % 2 == 0 else tuple(reversed(SIDES))


def summarise(result: dict, warmup: int) -> dict:
    """Medians over a run's steps after dropping the first ``warmup``."""
    steps = result["steps"][warmup:]
    if not steps:
        raise ValueError(f"{result['side']}: no steps left after dropping warmup={warmup}")
    phases = {name: statistics.median(s["phases"][name] for s in steps) for name in steps[0]["phases"]}
    return {"step_s": statistics.median(s["step_s"] for s in steps),
            "step_range": (min(s["step_s"] for s in steps), max(s["step_s"] for s in steps)),
            "tokens": statistics.median(s.get("tokens", 0.0) for s in steps),
            "tok_s": statistics.median(s.get("tokens", 0.0) / s["step_s"] for s in steps),
            "eos": statistics.mean(s.get("eos_fraction", float("nan")) for s in steps),
            "reward": statistics.mean(s.get("reward", 0.0) or 0.0 for s in steps), "phases": phases,
            "first_step_s": result.get("first_step_s"),
            "load": (result["load_before"][0], result["load_after"][0]), "steps": len(steps),
            "wall_s": result["wall_s"], "package": result["package"]}


def paired_ratios(repeats: list[dict[str, dict]]) -> dict[str, list[float]]:
    """Per repeat, ``ours / trl`` and ``ours_async / trl`` median step times."""
    return {"sync": [r["ours"]["step_s"] / r["trl"]["step_s"] for r in repeats],
            "async": [r["ours_async"]["step_s"] / r["trl"]["step_s"] for r in repeats]}


def last_line(repeats: list[dict[str, dict]]) -> str:
    """``ours_over_trl_step_time=<median sync ratio> async_over_trl_step_time=<median async ratio>``."""
    ratios = paired_ratios(repeats)
    return (f"ours_over_trl_step_time={statistics.median(ratios['sync']):.3f} "
            f"async_over_trl_step_time={statistics.median(ratios['async']):.3f}")


PHASE_ROWS = (  # (row, our phase, TRL phases)
    ("generation", "rollout", ("rollout",)),
    ("reward (math verifier)", "reward", ("reward",)),
    ("old-policy log-probs", "actor_logprobs", ()),
    ("reference log-probs", "reference_logprobs", ("reference_logprobs",)),
    ("advantages, experience", "make_experience", ("make_experience",)),
    ("policy update: fwd + bwd + optimizer", "actor_update", ("loss_forward", "backward", "optimizer_and_rest")),
    ("  of which TRL loss forward", None, ("loss_forward",)),
    ("  of which TRL backward", None, ("backward",)),
    ("  of which TRL optimizer + rest", None, ("optimizer_and_rest",)),
    ("waiting for the next batch (one-step-off)", "rollout_wait", ()),
    ("weight sync to the engine", "weight_sync", ()),
    ("other (step minus phases)", "other", ()),
)


def markdown(title: str, settings: str, command: str, source_text: str, versions: dict,
             repeats: list[dict[str, dict]], smoke: bool) -> str:
    lines = [f"## {title}", ""]
    if smoke:
        lines += ["**SMOKE RUN: proves the benchmark runs end to end; its numbers are not measurements** "
                  "(too few steps and repeats, machine shared).", ""]
    lines += ["Command:", "", f"    {command}", "", f"megatron_rlhf benchmarked: {source_text}.", "", settings, "",
              "Versions: " + "; ".join(f"{side}: " + ", ".join(f"{k} {v}" for k, v in found.items())
                                       for side, found in versions.items()), "",
              "| repeat | side | median step s | min-max s | tokens/step | tokens/s | ended at EOS | reward | "
              "first step done at s | process s | load avg start/end |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for index, runs in enumerate(repeats):
        for side in side_order(index):
            s = runs[side]
            first = f"{s['first_step_s']:.0f}" if s.get("first_step_s") is not None else "-"
            lines.append(f"| {index + 1} | {SIDE_NAMES[side]} | {s['step_s']:.2f} | {s['step_range'][0]:.2f}-"
                         f"{s['step_range'][1]:.2f} | {s['tokens']:.0f} | {s['tok_s']:.0f} | {s['eos']:.2f} | "
                         f"{s['reward']:.3f} | {first} | {s['wall_s']:.0f} | {s['load'][0]:.1f} / {s['load'][1]:.1f} |")
    ratios = paired_ratios(repeats)
    lines += ["", "first step done at: ours' ``time/to_first_step`` (seconds from the process start to the end "
              "of the first step). process s: ours' whole `run_rl` (start-up included), TRL's `trainer.train()` (after its model load).", "",
              "Paired ratios (same repeat, ABBA order):", "", "| repeat | ours sync / TRL step time | "
              "ours one-step-off / TRL step time |", "|---|---|---|"]
    for index, (sync, async_) in enumerate(zip(ratios["sync"], ratios["async"])):
        lines.append(f"| {index + 1} | {sync:.2f}x | {async_:.2f}x |")
    lines.append(f"| **median** | **{statistics.median(ratios['sync']):.2f}x** | "
                 f"**{statistics.median(ratios['async']):.2f}x** |")
    lines += ["", "Per-phase medians of each side over its repeats, seconds (phases overlap in one-step-off "
              "mode: its generation runs during the update):", "", "| phase | " +
              " | ".join(SIDE_NAMES[side] for side in SIDES) + " |", "|---|---|---|---|"]
    for row, our_name, trl_names in PHASE_ROWS:
        cells = []
        for side in SIDES:
            names = trl_names if side == "trl" else ((our_name,) if our_name else ())
            values = [sum(r[side]["phases"].get(name, 0.0) for name in names) for r in repeats]
            cells.append(f"{statistics.median(values):.2f}" if names else "-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("| **step** | " + " | ".join(f"**{statistics.median(r[side]['step_s'] for r in repeats):.2f}**"
                                             for side in SIDES) + " |")
    return "\n".join(lines) + "\n"
