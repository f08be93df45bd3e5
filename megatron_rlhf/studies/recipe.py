"""The typed recipe of the scaling studies: every size a study uses, in one dataclass.

The defaults are the "tiny" size (CPU, minutes per study); :data:`QUICK` shrinks it to a smoke
test (seconds per arm, a check that the pipeline runs, not that any trend shows); a YAML file
(``--recipe``) overrides any field, typed strictly by :func:`~megatron_rlhf.config.typed_load.dataclass_from_mapping`
(unknown keys and wrong types are errors naming the file and key). The same recipe at cluster
size works the same way: sizes are the only difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StudyRecipe:
    seed: int = 0
    """Seed of data generation, model initialisation and sampling (each arm derives its own)."""
    hidden_size: int = 64
    """Hidden size of the default (small) model. A multiple of 32 (head_dim 32: vLLM CPU needs >= 32)."""
    num_layers: int = 2
    """Layers of the default model."""
    vocab_size: int = 512
    """Tokenizer / model vocabulary."""
    model_sizes: tuple[int, ...] = (64, 128)
    """Hidden sizes compared by ``rm-size`` and ``policy-size`` (layers: ``num_layers``)."""
    rm_steps: int = 60
    """Optimizer steps of each reward model."""
    rm_lr: float = 1e-3
    rm_data_size: int = 256
    """Labelled responses each ``rm-data`` arm trains on (prompts x responses per prompt)."""
    rm_data_responses_per_prompt: tuple[int, ...] = (1, 4)
    """``rm-data`` arms: responses per prompt at equal data size (prompts = size / this)."""
    bon_prompts: int = 64
    """Held-out prompts of the Best-of-N evaluations."""
    bon_n_max: int = 16
    """Candidates per held-out prompt (N runs over 1, 2, 4, ..., this)."""
    candidate_correct_rate: float = 0.3
    """Probability that a generated candidate response is correct (the rest err at a random step)."""
    math_operations: int = 3
    """Operations per math problem (= reasoning steps before the answer)."""
    rl_steps: int = 8
    """RL steps of each RL arm."""
    rl_prompts_per_step: int = 4
    """Prompts per RL step (fixed across ``responses-per-prompt`` arms)."""
    rl_n: int = 4
    """Responses per prompt of the RL arms other than ``responses-per-prompt``."""
    responses_per_prompt: tuple[int, ...] = (1, 2, 4, 8, 16)
    """``responses-per-prompt`` arms."""
    rl_prompts_per_domain: int = 32
    """RL training prompts per domain."""
    eval_prompts_per_domain: int = 16
    """Held-out prompts per domain for the accuracy of RL arms."""
    max_new_tokens: int = 32
    rl_lr: float = 2e-4
    held_out_eval: bool = True
    """RL arms: evaluate the final policy on held-out prompts (a vLLM engine per arm); False: report
    the training rollouts' accuracy of the last half of the steps instead."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "vocab_size", "rm_steps", "rm_data_size", "bon_prompts",
                     "bon_n_max", "math_operations", "rl_steps", "rl_prompts_per_step", "rl_n",
                     "rl_prompts_per_domain", "eval_prompts_per_domain", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for size in (self.hidden_size, *self.model_sizes):
            if size % 32:
                raise ValueError(f"hidden sizes must be multiples of 32 (head_dim 32), got {size}")
        for name in ("model_sizes", "rm_data_responses_per_prompt", "responses_per_prompt"):
            values = getattr(self, name)
            if len(set(values)) < 2 or any(value < 1 for value in values):
                raise ValueError(f"{name} must list at least two distinct positive integers (a study compares "
                                 f"arms), got {values!r}")
        for k in self.rm_data_responses_per_prompt:
            if self.rm_data_size % k or self.rm_data_size // k < 1:
                raise ValueError(f"rm_data_size={self.rm_data_size} must be a multiple of every "
                                 f"rm_data_responses_per_prompt value, got {k}")
        if not 0 < self.candidate_correct_rate < 1:
            raise ValueError(f"candidate_correct_rate={self.candidate_correct_rate} must be in (0, 1)")
        if not self.rm_lr > 0 or not self.rl_lr > 0:
            raise ValueError(f"learning rates must be > 0, got rm_lr={self.rm_lr}, rl_lr={self.rl_lr}")


QUICK: dict[str, Any] = dict(
    vocab_size=300, model_sizes=(32, 64), rm_steps=4, rm_data_size=16, rm_data_responses_per_prompt=(1, 4),
    bon_prompts=8, bon_n_max=4, math_operations=2, rl_steps=1, rl_prompts_per_step=2, rl_n=2,
    responses_per_prompt=(1, 2), rl_prompts_per_domain=4, eval_prompts_per_domain=2, max_new_tokens=8,
    held_out_eval=False,
)
"""``--quick``: smoke size. Shows that each study runs end to end and writes its report; with
untrained tiny models and a handful of prompts its trends are noise (reported "inconclusive").
``responses_per_prompt`` holds ``rl_n`` and ``model_sizes`` the default hidden size, so that
``responses-per-prompt``, ``policy-size`` and ``ppo-vs-grpo`` share one GRPO arm (one run)."""


def load_study_recipe(path: str | Path | None = None, quick: bool = False) -> StudyRecipe:
    """The defaults, then :data:`QUICK` if ``quick``, then the YAML file at ``path`` (if given)."""
    from megatron_rlhf.config.errors import UserError
    from megatron_rlhf.config.typed_load import dataclass_from_mapping

    fields: dict[str, Any] = dict(QUICK) if quick else {}
    if path is not None:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise UserError(f"--recipe {path}: no such file")
        mapping = yaml.safe_load(path.read_text()) or {}
        if not isinstance(mapping, dict):
            raise UserError(f"{path}: a study recipe is a mapping of StudyRecipe fields")
        fields.update(mapping)
    typed = {key: (list(value) if isinstance(value, tuple) else value) for key, value in fields.items()}
    return dataclass_from_mapping(StudyRecipe, typed, str(path) if path else "study recipe")
