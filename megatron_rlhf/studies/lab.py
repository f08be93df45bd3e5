"""The scaling lab: which studies exist, and how a folder of them is run (`megatron-rlhf study`).

:func:`studies` is the registry (the reward-model studies, then the RL studies: `study all` runs
them in that order, cheapest first); :func:`run_studies` runs the asked studies in one output
folder with one recipe (the layout and the resume guarantees of :mod:`.runner`) and writes each
study's report (:mod:`.report`). A folder holding shared arms of the older layout (keyed, hence
seeded, by file paths) is refused with what to do; its studies' finished arms are not reused.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from megatron_rlhf.studies.recipe import StudyRecipe
from megatron_rlhf.studies.runner import Study, StudyContext, is_current_key_file

log = logging.getLogger(__name__)


def _forget_shared_arms(study_dir: Path, shared_dir: Path) -> None:
    """Remove the keyed arms (results and files) a study's result files point to, so that a
    restarted study runs them again."""
    for result_file in (study_dir / "arms").glob("*.json"):
        digest = json.loads(result_file.read_text()).get("shared_arm")
        if digest:
            for path in (shared_dir / "arms" / f"{digest}.json", shared_dir / "arms" / f"{digest}.key.json"):
                path.unlink(missing_ok=True)
            shutil.rmtree(shared_dir / "arms" / digest, ignore_errors=True)



def studies() -> dict[str, Study]:
    """Every study, by name, in the order `study all` runs them (cheapest first)."""
    from megatron_rlhf.studies import pre_ppo_study, reward_studies, rl_studies

    return {study.name: study for study in (*reward_studies.STUDIES, *rl_studies.STUDIES, pre_ppo_study.STUDY)}


def run_studies(names: list[str], recipe: StudyRecipe, out_dir: str | Path, restart: bool = False) -> dict[str, Path]:
    """Run the studies ``names`` (arms not yet done) and write their reports; returns study ->
    Markdown report path."""
    from megatron_rlhf.config.errors import UserError
    from megatron_rlhf.studies.report import write_study_report

    registry = studies()
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise UserError(f"unknown study {unknown} (choose from {', '.join(registry)} or all)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "recipe.json"
    if restart:
        for name in names:
            if (out / name).is_dir():
                _forget_shared_arms(out / name, out / "shared")
            shutil.rmtree(out / name, ignore_errors=True)
    if saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(asdict(recipe))):
        if not restart or any((out / name).exists() for name in registry if name not in names):
            raise UserError(f"{out} holds studies run with another recipe ({saved}): use another --out, "
                            f"or --restart (which clears the studies asked for)")
        shutil.rmtree(out / "shared", ignore_errors=True)
    older = sorted(path for path in (out / "shared" / "arms").glob("*.key.json") if not is_current_key_file(path))
    if older:
        raise UserError(f"{out} holds shared arms of an older megatron-rlhf, keyed and seeded by file paths "
                        f"({older[0]}): use another --out, or --restart the studies that ran them (or delete "
                        f"{out / 'shared' / 'arms'} and those studies' folders)")
    saved.write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    reports = {}
    for name in names:
        context = StudyContext(name, recipe, out / name, out / "shared")
        context.out_dir.mkdir(parents=True, exist_ok=True)
        log.info("study %s: %s", name, registry[name].summary)
        result = registry[name].run(context)
        reports[name] = write_study_report(name, result, context.out_dir)["md"]
    return reports
