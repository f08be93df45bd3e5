"""Answering evaluation items with one policy: vLLM through :class:`~megatron_rlhf.rollout.engine.RolloutEngine`.

One engine per policy, started, used for every item of the suite (``prompts_per_call`` items per
request, one request per decoding mode: greedy, temperature 0, one answer; sampled, ``samples``
answers at the suite's temperature and top-p, seeded), and shut down before the function
returns, also on error. Prompts longer
than the engine holds are dropped by the engine and counted (they have no answer).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from megatron_rlhf.evaluation.ability.grading import PolicyAnswers
from megatron_rlhf.evaluation.ability.items import EvalItem
from megatron_rlhf.evaluation.ability.suite import DecodingConfig, EngineConfig

log = logging.getLogger(__name__)


def answer_items(policy_dir: str, items: Sequence[EvalItem], decoding: DecodingConfig, engine_config: EngineConfig,
                 chat_template: bool = True) -> PolicyAnswers:
    """The policy's greedy and/or sampled answers to ``items``."""
    from megatron_rlhf.config.rollout import RolloutConfig
    from megatron_rlhf.rollout.engine import RolloutEngine
    from megatron_rlhf.config.sampling import SamplingSettings

    inputs = [[{"role": "user", "content": item.prompt}] if chat_template else item.text(False) for item in items]
    rollout = RolloutConfig(model_dir=policy_dir, tensor_parallel=engine_config.tensor_parallel,
                            dtype=engine_config.dtype, max_model_len=engine_config.max_model_len,
                            overlong_prompts="drop", seed=decoding.seed, weight_transfer_backend=None)
    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=decoding.max_new_tokens, seed=decoding.seed)
    sampled = SamplingSettings(n=max(decoding.samples, 1), temperature=decoding.temperature, top_p=decoding.top_p,
                               max_new_tokens=decoding.max_new_tokens, seed=decoding.seed)
    answers = PolicyAnswers()
    chunk = engine_config.prompts_per_call
    with RolloutEngine(rollout) as engine:
        for start in range(0, len(inputs), chunk):
            batch_inputs = inputs[start : start + chunk]
            if decoding.greedy:
                for index, text in _decoded(engine.generate(batch_inputs, greedy), engine.tokenizer):
                    answers.greedy[start + index] = text
            if decoding.samples:
                for index, text in _decoded(engine.generate(batch_inputs, sampled), engine.tokenizer):
                    answers.sampled.setdefault(start + index, []).append(text)
            log.info("%s: %d of %d items answered", policy_dir, min(start + chunk, len(inputs)), len(inputs))
    log.info("%s: answered %d of %d items", policy_dir, len(answers.greedy or answers.sampled), len(items))
    return answers


def _decoded(batch: Any, tokenizer: Any) -> list[tuple[int, str]]:
    return list(zip(batch.prompt_index.tolist(), batch.texts(tokenizer)))
