"""Write what the tiny-cpu recipes read: a tiny Llama-style policy (random weights, a tokenizer
trained on synthetic text) and small prompt, reward-model and GenRM data files.

    PYTHONPATH=. python examples/tiny-cpu/prepare.py [--out outputs/tiny-cpu]

Deterministic (fixed seeds). Nothing is downloaded. The policy's config.json equals
examples/tiny-cpu/config.json (the architecture the planner checks before this has run).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

VOCAB = 500


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _problems(count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(count)]


def prepare(out: Path) -> Path:
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    policy = make_tiny_hf_model("llama", out / "policy", seed=3, vocab_size=VOCAB,
                                tokenizer=train_tiny_tokenizer(VOCAB, seed=0))
    problems = _problems(32, seed=1)
    _write_jsonl(out / "prompts.jsonl", [
        {"id": f"m{i}", "prompt": f"What is {a} + {b}?", "domain": "math", "ground_truth": str(a + b)}
        for i, (a, b) in enumerate(problems)])
    _write_jsonl(out / "rm_pairs.jsonl", [
        {"prompt": f"What is {a} + {b}?", "chosen": f"{a + b}", "rejected": f"{a + b + 1}"}
        for a, b in problems])
    _write_jsonl(out / "rm_labelled.jsonl", [
        {"prompt": f"What is {a} + {b}?", "response": f"{a + b + (i % 2)}", "label": 1 - i % 2}
        for i, (a, b) in enumerate(problems)])
    _write_jsonl(out / "prm_steps.jsonl", [
        {"prompt": f"What is {a} + {b}?", "steps": [f"{a} + {b}", f"= {a + b + (i % 2)}"],
         "step_labels": [1.0, float(1 - i % 2)]}
        for i, (a, b) in enumerate(problems)])
    _write_jsonl(out / "genrm_records.jsonl", [
        {"prompt": f"What is {a} + {b}?", "response": f"{a + b + (i % 2)}", "label": 1 - i % 2,
         "reference": str(a + b)}
        for i, (a, b) in enumerate(problems)])
    return policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/tiny-cpu", help="output folder (default: outputs/tiny-cpu)")
    args = parser.parse_args()
    print(f"policy={prepare(Path(args.out))}")


if __name__ == "__main__":
    main()
