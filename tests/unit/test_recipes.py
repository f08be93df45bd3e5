"""Every recipe in examples/ loads (bases merged), types strictly, validates its layout and passes
the planner (`megatron-rlhf plan --recipe`: exit 0, last line ``fits=yes``); the tiny-cpu recipes
too (a CPU run: layout validated, planned against an H100). Each recipe's planner verdict is the
one its README's table reports."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RECIPES = sorted(
    path for path in EXAMPLES.glob("*/*.yaml")
    if path.parent.name != "base"
    and (path.name.split("-")[0] in ("grpo", "ppo", "orm", "prm") or path.stem in ("grpo", "ppo", "orm", "prm"))
)


def test_there_are_recipes_for_every_size_gpu_and_variant():
    names = {path.relative_to(EXAMPLES).as_posix() for path in RECIPES}
    for model in ("glm4-9b", "qwen2.5-32b", "qwen3-235b-a22b"):
        for kind in ("grpo", "ppo", "orm", "prm"):
            for gpu in ("h100", "h200"):
                for variant in ("minimum", "recommended"):
                    assert f"{model}/{kind}-{gpu}-{variant}.yaml" in names
    assert {"tiny-cpu/grpo.yaml", "tiny-cpu/ppo.yaml", "tiny-cpu/orm.yaml", "tiny-cpu/prm.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.relative_to(EXAMPLES).as_posix() for p in RECIPES])
def test_recipe_loads_and_fits(recipe, capsys, monkeypatch):
    from megatron_rlhf.cli import main

    monkeypatch.chdir(EXAMPLES.parent)  # fit_check.hf_config paths are relative to the repo root
    code = main(["plan", "--recipe", str(recipe.relative_to(EXAMPLES.parent))])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.strip().splitlines()[-1].endswith("fits=yes")


def test_a_key_no_config_has_is_an_error(tmp_path):
    from megatron_rlhf.config.recipe import load_recipe
    from megatron_rlhf.cli.train_rl import rl_config_from_mapping

    recipe = tmp_path / "typo.yaml"
    recipe.write_text(f"base: [{EXAMPLES / 'base' / 'grpo.yaml'}, {EXAMPLES / 'glm4-9b' / 'model.yaml'}, "
                      f"{EXAMPLES / 'glm4-9b' / 'h100-minimum.yaml'}]\nout_dir: x\nactor: {{wrold_size: 4}}\n")
    with pytest.raises(ValueError, match="wrold_size"):
        rl_config_from_mapping(load_recipe(recipe), str(recipe))
