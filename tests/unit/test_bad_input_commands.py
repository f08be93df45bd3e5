"""Bad input to the process-starting commands fails before anything starts (issue 18).

Every case runs the command line as a user does (``megatron_rlhf.cli.main`` in a fresh Python,
with tiny models the tests make) and checks: exit code 2, an ``error:`` line naming the value and
its place (file and key for config, file:line for data, the option for arguments), nothing written
or left behind, and, for the commands that start Ray or vLLM, that neither was imported (the
probe prints the heavy modules the process had loaded when the command returned) and that no
Ray session directory was created (``RAY_TMPDIR`` points into the test's directory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PROBE = (
    "import sys\n"
    "from megatron_rlhf.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('LOADED=' + ','.join(m for m in ('ray', 'vllm', 'megatron.core') if m in sys.modules))\n"
    "sys.exit(code)\n"
)
MATH = {"prompt": "What is 1 + 1?", "domain": "math", "ground_truth": "2"}


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_TMPDIR": str(tmp_path / "ray_tmp")}
    return subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def refused(result: subprocess.CompletedProcess, *named: str) -> str:
    """The ``error:`` message of a refused command that started nothing heavy."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    starts = [index for index, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = "\n".join(lines[starts[0]:])  # a data error lists its lines below the first
    for text in named:
        assert text in message, message
    assert "LOADED=\n" in result.stdout, result.stdout
    return message


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    return make_tiny_hf_model("llama", tmp_path_factory.mktemp("hf") / "llama", seed=1, vocab_size=500,
                              tokenizer=train_tiny_tokenizer(500, seed=0))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


# --- train-rl -------------------------------------------------------------------------------------


def rl_config(tmp_path: Path, model: Path, **changes) -> Path:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [MATH, {**MATH, "domain": "code", "ground_truth": None}])
    config = {"policy_dir": str(model), "out_dir": str(tmp_path / "run"), "prompt_files": [str(prompts)],
              "steps": 1, "prompts_per_step": 2, "n": 2, "max_new_tokens": 8, "max_prompt_tokens": 64}
    config.update(changes)
    path = tmp_path / "run.yaml"
    path.write_text("\n".join(f"{key}: {json.dumps(value)}" for key, value in config.items() if value is not None) + "\n")
    return path


def refused_rl(tmp_path: Path, config: Path, *named: str) -> str:
    message = refused(run_cli(tmp_path, "train-rl", "--config", config), *named)
    assert not (tmp_path / "run").exists(), "a failed train-rl left its out_dir behind"
    assert not (tmp_path / "ray_tmp").exists(), "a Ray session was started"
    return message


@pytest.mark.parametrize("key, value, named", [
    ("n", "four", "n: expected an integer, got 'four'"),
    ("n", 2.5, "n: expected an integer, got 2.5"),
    ("tensorboard", "no", "tensorboard: expected true or false, got 'no'"),
    ("prompt_files", "/abs/prompts.jsonl", "prompt_files: expected a list, got '/abs/prompts.jsonl'"),
    ("actor", {"parallel": {"tensor_parallel": "two"}}, "actor.parallel.tensor_parallel: expected an integer"),
    ("curriculum", {"phases": [{"until_step": "later"}]}, "curriculum"),
])
def test_rl_config_of_the_wrong_type(tmp_path, policy_dir, key, value, named):
    config = rl_config(tmp_path, policy_dir, **{key: value})
    refused_rl(tmp_path, config, f"{config}: {named}")


def test_rl_missing_policy_dir(tmp_path, policy_dir):
    config = rl_config(tmp_path, policy_dir, policy_dir=str(tmp_path / "no_such_model"))
    refused_rl(tmp_path, config, f"{config}: policy_dir", "no_such_model")


def test_rl_policy_with_a_mistyped_hf_config(tmp_path, policy_dir):
    import shutil

    broken = Path(shutil.copytree(policy_dir, tmp_path / "broken"))
    hf_config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**hf_config, "num_hidden_layers": "four"}))
    refused_rl(tmp_path, rl_config(tmp_path, policy_dir, policy_dir=str(broken)),
               str(broken / "config.json"), "num_hidden_layers='four'")


def test_rl_unknown_reward_source_kind(tmp_path, policy_dir):
    rewards = tmp_path / "rewards.yaml"
    rewards.write_text("sources: {m: {kind: math_verifyer}}\ndomains: {math: {sources: {m: 1.0}}}\n")
    refused_rl(tmp_path, rl_config(tmp_path, policy_dir, reward_config=str(rewards)),
               f"{rewards}: sources.m.kind", "'math_verifyer'")


def test_rl_reward_model_source_that_is_not_a_checkpoint(tmp_path, policy_dir):
    rewards = tmp_path / "rewards.yaml"
    rewards.write_text(f"sources: {{rm: {{kind: reward_model, ckpt_dir: {policy_dir}}}}}\n"
                       "domains: {math: {sources: {rm: 1.0}}, code: {sources: {rm: 1.0}}}\n")
    refused_rl(tmp_path, rl_config(tmp_path, policy_dir, reward_config=str(rewards)),
               f"{rewards}: sources.rm.ckpt_dir", str(policy_dir))


def test_rl_prompt_domain_without_a_reward_route(tmp_path, policy_dir):
    rewards = tmp_path / "rewards.yaml"
    rewards.write_text("sources: {m: {kind: math_verifier}}\ndomains: {math: {sources: {m: 1.0}}}\n")
    config = rl_config(tmp_path, policy_dir, reward_config=str(rewards))
    refused_rl(tmp_path, config, f"{tmp_path / 'prompts.jsonl'}:2", "'code'", str(rewards))


def test_rl_malformed_prompt_line_stops_training(tmp_path, policy_dir):
    config = rl_config(tmp_path, policy_dir)
    write_jsonl(tmp_path / "prompts.jsonl", [MATH, '{"prompt": "x", "domain": "math"', MATH])
    message = refused_rl(tmp_path, config, f"{tmp_path / 'prompts.jsonl'}:2", "not valid JSON")
    assert "column 1)" not in message  # the column of the line's end, not of the next line


def test_rl_lengths_beyond_the_model(tmp_path, policy_dir):
    config = rl_config(tmp_path, policy_dir, max_prompt_tokens=250, max_new_tokens=64)
    refused_rl(tmp_path, config, f"{config}: max_prompt_tokens + max_new_tokens", "314", "256")


# --- score ----------------------------------------------------------------------------------------


def test_score_output_that_is_the_input(tmp_path):
    samples = write_jsonl(tmp_path / "y.jsonl", [{"id": 1, **MATH, "response": "\\boxed{2}"}])
    before = samples.read_bytes()
    refused(run_cli(tmp_path, "score", "--input", samples, "--output", samples), "--output", str(samples))
    (tmp_path / "link.jsonl").symlink_to(samples)
    refused(run_cli(tmp_path, "score", "--input", samples, "--output", tmp_path / "link.jsonl"), "link.jsonl")
    assert samples.read_bytes() == before


def test_score_output_in_a_missing_directory(tmp_path):
    samples = write_jsonl(tmp_path / "y.jsonl", [{"id": 1, **MATH, "response": "\\boxed{2}"}])
    refused(run_cli(tmp_path, "score", "--input", samples, "--output", tmp_path / "nodir" / "o.jsonl"),
            "--output", str(tmp_path / "nodir"))
    assert not (tmp_path / "nodir").exists()


def test_score_empty_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    refused(run_cli(tmp_path, "score", "--input", empty, "--output", tmp_path / "o.jsonl"), str(empty), "no sample")
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("content, reason", [
    (b"\x00\x01\x02binary\xff\n\x89PNG\r\n", "not valid JSON"),
    (b'{"id": 1}\n[1, 2]\n', "missing field"),
    (json.dumps({"id": 1, **MATH, "domain": "poetry", "response": "x"}).encode() + b"\n", "'poetry' has no reward route"),
])
def test_score_with_no_scorable_line_writes_every_reason(tmp_path, content, reason):
    source = tmp_path / "in.jsonl"
    source.write_bytes(content)
    result = run_cli(tmp_path, "score", "--input", source, "--output", tmp_path / "o.jsonl")
    assert result.returncode == 1, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert records and all(r["status"] == "malformed" and f"{source}:{r['line']}" in r["detail"] for r in records)
    assert any(reason in r["detail"] for r in records)
    assert "router needs" not in result.stderr


def test_score_unknown_source_kind(tmp_path):
    samples = write_jsonl(tmp_path / "y.jsonl", [{"id": 1, **MATH, "response": "\\boxed{2}"}])
    rewards = tmp_path / "rewards.yaml"
    rewards.write_text("sources: {m: {kind: nope}}\ndomains: {math: {sources: {m: 1.0}}}\n")
    refused(run_cli(tmp_path, "score", "--input", samples, "--output", tmp_path / "o.jsonl", "--config", rewards),
            f"{rewards}: sources.m.kind", "'nope'")
    assert not (tmp_path / "o.jsonl").exists()


# --- train-rm -------------------------------------------------------------------------------------


def rm_recipe(tmp_path: Path, policy_dir: Path, rows: list, **changes) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = {"model": str(policy_dir), "role": "reward", "train_files": [str(data)],
              "output": str(tmp_path / "rm"), "steps": 1,
              "training": {"pairs_per_microbatch": 1, "responses_per_microbatch": 0}, **changes}
    path = tmp_path / "rm.yaml"
    path.write_text("\n".join(f"{key}: {json.dumps(value)}" for key, value in recipe.items()) + "\n")
    return path


PAIR = {"prompt": "1+1?", "chosen": "2", "rejected": "3"}


@pytest.mark.parametrize("bad, reason", [
    ({**PAIR, "rejected": "2"}, "'chosen' and 'rejected' are the same text"),
    ({"prompt": "1+1?", "response": "2", "label": True}, "'label' must be 0 or 1"),
])
def test_train_rm_bad_record(tmp_path, policy_dir, bad, reason):
    recipe = rm_recipe(tmp_path, policy_dir, [PAIR, bad])
    refused(run_cli(tmp_path, "train-rm", "--config", recipe), f"{tmp_path / 'train.jsonl'}:2", reason)
    assert not (tmp_path / "rm").exists()


def test_train_rm_optimizer_of_the_wrong_type(tmp_path, policy_dir):
    recipe = rm_recipe(tmp_path, policy_dir, [PAIR], optimizer={"lr": "fast"})
    refused(run_cli(tmp_path, "train-rm", "--config", recipe), f"{recipe}: optimizer.lr", "'fast'")


def test_train_rm_output_in_the_way_names_a_remedy_it_has(tmp_path, policy_dir):
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "keep.txt").write_text("mine")
    message = refused(run_cli(tmp_path, "train-rm", "--config", rm_recipe(tmp_path, policy_dir, [PAIR])),
                      "output", str(tmp_path / "rm"))
    assert "--overwrite" not in message and (tmp_path / "rm" / "keep.txt").read_text() == "mine"


# --- eval-bon -------------------------------------------------------------------------------------


def eval_bon(tmp_path: Path, policy_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [MATH])
    return run_cli(tmp_path, "eval-bon", "--policy", policy_dir, "--prompts", prompts, "--out", tmp_path / "bon",
                   "--n-max", "2", "--max-new-tokens", "16", *extra)


def test_eval_bon_max_model_len_beyond_the_model(tmp_path, policy_dir):
    refused(eval_bon(tmp_path, policy_dir, "--scorer", "random"), "--max-model-len = 2048", "256")
    assert not (tmp_path / "bon").exists()


def test_eval_bon_rm_scorer_that_is_not_a_reward_model(tmp_path, policy_dir):
    result = eval_bon(tmp_path, policy_dir, "--max-model-len", "128", "--scorer", f"rm:{policy_dir}")
    refused(result, f"--scorer rm:{policy_dir}", "not a reward-model checkpoint")
    assert not (tmp_path / "bon").exists()


SOLUTION = {"id": "a", "prompt": "What is 1 + 1?", "steps": ["1 + 1 = 2", "The answer is 2"],
            "ground_truth": "2", "domain": "math"}


def label_steps(tmp_path: Path, policy: Path, *extra: str) -> subprocess.CompletedProcess:
    solutions = write_jsonl(tmp_path / "solutions.jsonl", [SOLUTION])
    return run_cli(tmp_path, "label-steps", "--policy", policy, "--input", solutions, *extra)


def test_label_steps_missing_policy(tmp_path):
    refused(label_steps(tmp_path, tmp_path / "no_model", "--output", tmp_path / "steps.jsonl"),
            "--policy", "no_model")
    assert not (tmp_path / "steps.jsonl").exists()


def test_label_steps_max_model_len_beyond_the_model(tmp_path, policy_dir):
    refused(label_steps(tmp_path, policy_dir, "--output", tmp_path / "steps.jsonl"), "--max-model-len = 2048", "256")
    assert not (tmp_path / "steps.jsonl").exists()


def test_label_steps_output_is_the_input(tmp_path, policy_dir):
    result = label_steps(tmp_path, policy_dir, "--max-model-len", "128", "--output", tmp_path / "solutions.jsonl")
    refused(result, "--output", "solutions.jsonl", "is the input")
    assert (tmp_path / "solutions.jsonl").read_text() == json.dumps(SOLUTION) + "\n"  # untouched


# --- the one user-error type ----------------------------------------------------------------------


def test_only_user_errors_exit_2_and_other_errors_keep_their_traceback(monkeypatch, capsys):
    """Issue 17 defect 4: a ValueError from a defect is not reported as a user error."""
    from megatron_rlhf import cli
    from megatron_rlhf.cli import verify
    from megatron_rlhf.config.errors import UserError

    def internal(args):
        raise ValueError("an internal invariant broke")

    def user(args):
        raise UserError("run.yaml: n: expected an integer")

    monkeypatch.setattr(verify, "run", internal)
    with pytest.raises(ValueError, match="internal invariant"):
        cli.main(["verify", "--hf", "h", "--ckpt", "c"])
    monkeypatch.setattr(verify, "run", user)
    assert cli.main(["verify", "--hf", "h", "--ckpt", "c"]) == 2
    assert capsys.readouterr().err == "error: run.yaml: n: expected an integer\n"
