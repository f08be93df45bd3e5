"""Assets shared by every study of an output folder, each made once under ``shared/`` and marked
done by a file: the tiny tokenizer, tiny base models by hidden size, and the held-out Best-of-N
candidates (math problems, labelled candidate responses, graded by the real math verifier).

Models: llama, ``recipe.num_layers`` layers, head_dim 32 (vLLM on CPU needs >= 32), one KV head
per attention head, random weights seeded by the recipe and the size. A model folder is written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from megatron_rlhf.studies.recipe import StudyRecipe


def base_model(shared_dir: Path, recipe: StudyRecipe, hidden_size: int | None = None) -> str:
    """The HF folder of the tiny llama of ``hidden_size`` (default: the recipe's), made if missing."""
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    hidden_size = hidden_size or recipe.hidden_size
    folder = shared_dir / "models" / f"llama_h{hidden_size}"
    if folder.is_dir():
        return str(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    heads = hidden_size // 32
    make_tiny_hf_model("llama", partial, seed=recipe.seed + hidden_size, vocab_size=recipe.vocab_size,
                       tokenizer=train_tiny_tokenizer(recipe.vocab_size, seed=recipe.seed), hidden_size=hidden_size,
                       num_hidden_layers=recipe.num_layers, num_attention_heads=heads, num_key_value_heads=heads,
                       head_dim=32, intermediate_size=2 * hidden_size, max_position_embeddings=512)
    partial.rename(folder)
    return str(folder)


def math_split(recipe: StudyRecipe) -> tuple[list[Any], list[Any]]:
    """(held-out problems for Best-of-N, training problems for reward models): disjoint prompts."""
    from megatron_rlhf.studies.math_candidates import math_problems

    problems = math_problems(recipe.bon_prompts + recipe.rm_data_size, recipe.math_operations, recipe.seed)
    return problems[: recipe.bon_prompts], problems[recipe.bon_prompts :]


def bon_candidates(shared_dir: Path, recipe: StudyRecipe) -> tuple[list[Any], Any]:
    """``bon_n_max`` candidates per held-out problem as RewardSamples ``[P][N]`` and their grades
    ``correct [P, N]`` by the math verifier (computed once, then read from ``shared/``)."""
    import random

    import torch

    from megatron_rlhf.rewards.sample import RewardSample
    from megatron_rlhf.studies.math_candidates import candidate

    held_out, _ = math_split(recipe)
    rng = random.Random(f"study-bon:{recipe.seed}")
    samples = [[RewardSample(sample_id=f"{p}/{k}", domain="math", prompt=problem.prompt,
                             response=candidate(problem, recipe.candidate_correct_rate, rng).response,
                             ground_truth=problem.answer) for k in range(recipe.bon_n_max)]
               for p, problem in enumerate(held_out)]
    grades_file = shared_dir / "bon_grades.json"
    if not grades_file.is_file():
        from megatron_rlhf.rewards.verifiers.math_verifier import MathVerifier, MathVerifierConfig

        verifier = MathVerifier(MathVerifierConfig())
        try:
            results = verifier.score([sample for group in samples for sample in group])
        finally:
            verifier.close()
        flat = [bool(result.passed) for result in results]
        grades = [flat[p * recipe.bon_n_max : (p + 1) * recipe.bon_n_max] for p in range(len(samples))]
        shared_dir.mkdir(parents=True, exist_ok=True)
        grades_file.write_text(json.dumps(grades) + "\n")
    correct = torch.tensor(json.loads(grades_file.read_text()), dtype=torch.bool)
    return samples, correct
