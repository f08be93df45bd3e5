"""Recipe inheritance: bases merge key by key (nested mappings recursively, later files win), the
result types through the trainer's strict loader (unknown keys stay errors), and broken chains
name the file."""

from __future__ import annotations

import pytest

from megatron_rlhf.config.recipe import RecipeError, load_recipe, merge_mappings


def _write(path, text):
    path.write_text(text)
    return path


def test_bases_merge_key_by_key(tmp_path):
    (tmp_path / "base").mkdir()
    _write(tmp_path / "base" / "common.yaml",
           "steps: 5\nactor: {world_size: 2, parallel: {tensor_parallel: 2}}\nprompt_files: [a.jsonl]\n")
    _write(tmp_path / "model.yaml", "policy_dir: /models/x\nactor: {parallel: {pipeline_parallel: 1}}\n")
    recipe = _write(tmp_path / "run.yaml",
                    "base: [base/common.yaml, model.yaml]\nsteps: 7\nactor: {world_size: 4}\nprompt_files: [b.jsonl]\n")
    assert load_recipe(recipe) == {
        "steps": 7, "policy_dir": "/models/x", "prompt_files": ["b.jsonl"],
        "actor": {"world_size": 4, "parallel": {"tensor_parallel": 2, "pipeline_parallel": 1}},
    }


def test_bases_chain_and_later_base_wins(tmp_path):
    _write(tmp_path / "a.yaml", "n: 1\nsteps: 1\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\nn: 2\n")
    _write(tmp_path / "c.yaml", "n: 3\nseed: 9\n")
    assert load_recipe(_write(tmp_path / "r.yaml", "base: [b.yaml, c.yaml]\n")) == {"n": 3, "steps": 1, "seed": 9}


def test_merge_does_not_alias_inputs():
    inherited = {"actor": {"parallel": {"tensor_parallel": 2}}}
    merged = merge_mappings(inherited, {"actor": {"world_size": 2}})
    merged["actor"]["parallel"]["tensor_parallel"] = 8
    assert inherited["actor"]["parallel"]["tensor_parallel"] == 2


@pytest.mark.parametrize(
    ("files", "message"),
    [({"r.yaml": "base: missing.yaml\n"}, "missing.yaml does not exist"),
     ({"r.yaml": "base: s.yaml\n", "s.yaml": "base: r.yaml\n"}, "cycle"),
     ({"r.yaml": "base: [1, 2]\n"}, "must be a path or a list of paths"),
     ({"r.yaml": "base: s.yaml\n", "s.yaml": "- a\n- b\n"}, "expected a mapping"),
     ({"r.yaml": "steps: [\n"}, "not valid YAML")],
)
def test_broken_recipes_name_the_file(tmp_path, files, message):
    for name, text in files.items():
        _write(tmp_path / name, text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(tmp_path / "r.yaml")


def test_unknown_key_from_a_base_is_still_an_error(tmp_path):
    from megatron_rlhf.cli.train_rl import rl_config_from_mapping

    _write(tmp_path / "base.yaml", "policy_dir: p\nout_dir: o\nprompt_files: [x.jsonl]\nstepz: 3\n")
    merged = load_recipe(_write(tmp_path / "r.yaml", "base: base.yaml\n"))
    with pytest.raises(ValueError, match="stepz"):
        rl_config_from_mapping(merged, str(tmp_path / "r.yaml"))
