"""GenRM as the Seed paper uses it, inside `train-rl`: general prompts get a reference response
(the Bradley-Terry reward model's Best-of-N pick among the policy's samples,
:func:`~megatron_rlhf.evaluation.bon_reference.attach_bon_references`), and a ``kind: genrm``
source with ``reference: required`` judges every general rollout against it, next to the math
verifier for math prompts (the hybrid reward's routing).

Real components: the policy's vLLM engine (references), a BT reward model trained here by
``train_reward_model`` (4 steps on the synthetic preference pairs) and scored in its own process,
``run_rl`` with its Ray workers on the tier's session Ray, the GenRM source with its own vLLM
engine in the driver, and the verdict parser. The judge is a tiny llama whose weights make it
write one fixed judgement greedily: every attention and MLP output projection is zero (the
residual stream is the current token's embedding) and the LM head maps each token of the chain
"<generation prompt> -> Score: 9/10 -> <eos>" to its successor. So the reward of every judged
response is known (0.9) and the test checks the plumbing, not a judge's quality.

Property: the run's general reward is 0.9 at every step with no infra error (a general prompt
without a reference would be an INFRA_ERROR under ``reference: required``), and every general
prompt of the RL prompt file carries the reward model's pick as its ground truth.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]

VOCAB = 300
JUDGEMENT = "Score: 9/10"
STEPS = 1


def _fixed_judge(base_dir: str, out_dir: str) -> str:
    """A copy of ``base_dir`` that greedily writes ``JUDGEMENT`` then end-of-sequence."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    prompt_end = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                               tokenize=True)["input_ids"][-1]
    chain = [prompt_end, *tokenizer.encode(JUDGEMENT, add_special_tokens=False), tokenizer.eos_token_id]
    assert len(set(chain[:-1])) == len(chain) - 1, f"the chain needs distinct tokens: {chain}"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embeddings = model.model.embed_tokens.weight
        normed = embeddings / embeddings.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        head = torch.zeros_like(model.lm_head.weight)
        for current, successor in zip(chain, chain[1:]):
            head[successor] += 30.0 * normed[current] / normed.shape[1]
        model.lm_head.weight.copy_(head)
    model.config.max_position_embeddings = 2048
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_rlhf.config.optimizer import OptimizerSettings
    from megatron_rlhf.data.synthetic_tasks import DemoDatasetSizes, write_demo_datasets
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer
    from megatron_rlhf.trainer.reward_model import RewardTrainingConfig
    from megatron_rlhf.trainer.reward_model_run import TrainRMConfig, train_reward_model

    root = tmp_path_factory.mktemp("genrm_rl")
    policy = str(make_tiny_hf_model(
        "llama", root / "policy", seed=1, vocab_size=VOCAB, tokenizer=train_tiny_tokenizer(VOCAB, seed=0),
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
        intermediate_size=128, max_position_embeddings=512))
    judge = _fixed_judge(policy, str(root / "judge"))
    files = write_demo_datasets(root / "data", seed=0, sizes=DemoDatasetSizes(
        sft_per_domain=0, sft_eval_per_domain=0, prompts_per_domain=2, eval_prompts_per_domain=0,
        preference_pairs=16, preference_eval_pairs=0))
    train_reward_model(TrainRMConfig(
        model=policy, role="reward", train_files=(str(files.preference_train),), output=str(root / "rm"), steps=4,
        training=RewardTrainingConfig(pairs_per_microbatch=4, responses_per_microbatch=0),
        optimizer=OptimizerSettings(lr=1e-3)))
    rows = [json.loads(line) for line in files.prompts_train.read_text().splitlines()]
    prompts = root / "prompts_math_general.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows if row["domain"] in ("math", "general")))
    return {"root": root, "policy": policy, "judge": judge, "rm": str(root / "rm" / "checkpoint"),
            "prompts": str(prompts)}


def test_genrm_judges_general_rollouts_against_the_reward_models_best_of_n(setup, ray_cluster):
    from megatron_rlhf.config.optimizer import OptimizerSettings
    from megatron_rlhf.config.ppo_update import PPOUpdateConfig
    from megatron_rlhf.config.rollout import RolloutConfig
    from megatron_rlhf.data.jsonl import write_jsonl
    from megatron_rlhf.data.prompts import load_prompt_dataset
    from megatron_rlhf.evaluation.bon_reference import BoNReferenceConfig, attach_bon_references
    from megatron_rlhf.evaluation.metrics_file import read_metrics_jsonl
    from megatron_rlhf.rewards.reward_config import reward_config_from_mapping
    from megatron_rlhf.rewards.reward_model_source import RewardModelSourceConfig, SpawnedRewardModelSource
    from megatron_rlhf.rollout.engine import RolloutEngine
    from megatron_rlhf.trainer.rl_config import RLConfig, grpo_algorithm
    from megatron_rlhf.trainer.rl_loop import run_rl

    records, _ = load_prompt_dataset(setup["prompts"])
    rm = SpawnedRewardModelSource(RewardModelSourceConfig(ckpt_dir=setup["rm"]))
    with RolloutEngine(RolloutConfig(model_dir=setup["policy"], seed=0, weight_transfer_backend=None)) as engine:
        rows = attach_bon_references(records, engine, rm, BoNReferenceConfig(n=4, max_new_tokens=8))
    general = [row for row in rows if row["domain"] == "general"]
    assert general and all(isinstance(row.get("ground_truth"), str) for row in general), general
    assert [row.get("ground_truth") for row in rows if row["domain"] == "math"] == [
        record.ground_truth for record in records if record.domain == "math"]
    with_references = setup["root"] / "prompts_with_references.jsonl"
    write_jsonl(with_references, rows)

    rewards = reward_config_from_mapping({
        "sources": {"math": {"kind": "math_verifier"},
                    "genrm": {"kind": "genrm", "reference": "required", "verdict_format": "score",
                              "max_new_tokens": 16,
                              "rollout": {"model_dir": setup["judge"], "max_model_len": 2048, "seed": 0}}},
        "domains": {"math": {"sources": {"math": 1.0}}, "general": {"sources": {"genrm": 1.0}}},
    }, "test rewards")
    result = run_rl(RLConfig(
        policy_dir=setup["policy"], out_dir=str(setup["root"] / "rl"), prompt_files=(str(with_references),),
        algorithm=grpo_algorithm(kl_mode="none"), steps=STEPS, prompts_per_step=4, n=2, max_new_tokens=8,
        max_prompt_tokens=128,
        update=PPOUpdateConfig(num_minibatches=1, micro_batch_size=8), actor_optimizer=OptimizerSettings(lr=1e-4),
        reward_config=rewards, checkpoint_every=0, seed=0, tensorboard=False, console=False))
    metrics = read_metrics_jsonl(result.metrics_file)
    assert [row["step"] for row in metrics] == list(range(STEPS))
    for row in metrics:
        assert row["reward/infra_errors"] == 0, row
        assert row["score/general"] == pytest.approx(0.9), row
