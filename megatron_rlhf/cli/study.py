"""`megatron-rlhf study NAME|all`: rerun a scaling study of the two papers (the runner and the
studies: :mod:`megatron_rlhf.studies`).

Each study writes ``<out>/<study>/report.md`` (table, trend line, verdict against the paper's
claim), ``report.png`` and ``report.json``; arms already done (``<out>/<study>/arms/<arm>.json``)
are not rerun, so a killed study resumes. ``--quick`` runs at smoke size (seconds per arm; its
trends are noise and say "inconclusive"); ``--recipe FILE`` sizes a study up (YAML of
:class:`~megatron_rlhf.studies.recipe.StudyRecipe` fields). Prints ``study=<name> verdict=<v>``
per claim and ``report=<path>`` per study. Building the parser imports nothing heavy.
"""

from __future__ import annotations

import argparse

STUDY_NAMES = ("rm-data", "prm-vs-orm", "rm-size", "responses-per-prompt", "policy-size", "ppo-vs-grpo", "pre-ppo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", choices=(*STUDY_NAMES, "all"),
                        help=f"the study: {', '.join(STUDY_NAMES)}, or all")
    parser.add_argument("--quick", action="store_true", help="smoke size (a check that it runs, not of any trend)")
    parser.add_argument("--out", default="outputs/studies", metavar="DIR",
                        help="output folder (default outputs/studies)")
    parser.add_argument("--recipe", default=None, metavar="FILE",
                        help="YAML of study recipe fields (overrides the size)")
    parser.add_argument("--restart", action="store_true", help="clear the studies asked for and run them again")


def run(args: argparse.Namespace) -> int:
    import json

    from megatron_rlhf.studies.recipe import load_study_recipe
    from megatron_rlhf.studies.lab import run_studies, studies

    recipe = load_study_recipe(args.recipe, quick=args.quick)
    names = list(studies()) if args.name == "all" else [args.name]
    reports = run_studies(names, recipe, args.out, restart=args.restart)
    for name, path in reports.items():
        document = json.loads(path.with_suffix(".json").read_text())
        for verdict in document["verdicts"]:
            print(f"study={name} verdict={verdict['verdict']!r} claim={verdict['claim']!r}")
        print(f"report={path}")
    return 0
