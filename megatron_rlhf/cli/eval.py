"""`megatron-rlhf eval`: ability-dimension evaluation of one policy, or of two with deltas.

Order: the suite file, every task's data file and every policy directory are checked (user
errors exit 2 before any engine or sandbox starts); the graders start; each policy's engine
answers every item and is shut down; the answers are graded; the report is written under
``--out``: ``ability_report.{md,png,json}`` and ``answers/<policy>.jsonl`` (every answer with its
verdict). Building the parser imports nothing heavy.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from megatron_rlhf.cli.args import positive_int

MAX_POLICIES = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", action="append", required=True, metavar="DIR",
                        help="HF model directory of a policy; give it twice to compare (deltas: second - first)")
    parser.add_argument("--suite", required=True, metavar="SUITE.yaml",
                        help="tasks (local files in public benchmark formats) mapped to ability dimensions")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write ability_report.{md,png,json}")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                        help="evaluate only the first N items of every task (a quick look)")


def run(args: argparse.Namespace) -> int:
    from megatron_rlhf.evaluation.ability.generation import answer_items
    from megatron_rlhf.evaluation.ability.grading import grade_answers, open_graders, task_scores
    from megatron_rlhf.evaluation.ability.loaders import load_task
    from megatron_rlhf.evaluation.ability.report import build_report, policy_labels, write_report
    from megatron_rlhf.evaluation.ability.suite import load_suite

    suite = load_suite(args.suite)
    if args.limit is not None:
        suite = replace(suite, tasks=tuple(replace(task, limit=min(task.limit or args.limit, args.limit))
                                           for task in suite.tasks))
    if len(args.policy) > MAX_POLICIES:
        raise ValueError(f"--policy given {len(args.policy)} times; eval compares at most {MAX_POLICIES} policies")
    for policy in args.policy:
        if not (Path(policy) / "config.json").is_file():
            raise FileNotFoundError(f"--policy {policy}: not a Hugging Face model directory (no config.json)")
    items, skipped = [], {}
    for task in suite.tasks:
        loaded = load_task(task)
        items.extend(loaded.items)
        skipped[task.name] = loaded.skipped
        note = f" (skipped {sum(loaded.skipped.values())}: {loaded.skipped})" if loaded.skipped else ""
        print(f"task {task.name}: {len(loaded.items)} {task.format} items -> {task.dimension}{note}")
    labels = policy_labels(args.policy)
    scores = {}
    out = Path(args.out)
    (out / "answers").mkdir(parents=True, exist_ok=True)
    with open_graders({item.grader for item in items}, suite.graders) as graders:
        for label, policy in zip(labels, args.policy):
            answers = answer_items(policy, items, suite.decoding, suite.engine, suite.chat_template)
            graded = grade_answers(items, answers, graders, suite.chat_template)
            scores[label] = task_scores(items, graded)
            with open(out / "answers" / f"{label.replace('/', '_')}.jsonl", "w") as stream:
                for answer in graded:
                    item = items[answer.item]
                    stream.write(json.dumps({"id": item.id, "task": item.task, "kind": answer.kind,
                                             "passed": answer.passed, "verdict": answer.result.verdict.value,
                                             "detail": answer.result.detail, "response": answer.response}) + "\n")
    report = build_report(suite, dict(zip(labels, args.policy)), scores, skipped)
    paths = write_report(report, out)
    for dimension, row in [*report.dimensions.items(), ("overall", report.overall)]:
        shown = "  ".join(f"{label}={value:.3f}" if value is not None else f"{label}=n/a"
                          for label, value in row.scores.items())
        delta = f"  delta={row.delta:+.3f}" if row.delta is not None else ""
        print(f"{dimension:>22}: {shown}{delta}")
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 0
