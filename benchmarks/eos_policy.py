"""A benchmark policy whose responses really stop at EOS.

Why the GRPO benchmark's steps always had exactly ``prompts x n x max_new_tokens`` response
tokens: its policy was a freshly initialised tiny Llama, whose next-token distribution is close
to uniform over the 500-token vocabulary (entropy 6.19 nats of ln 500 = 6.21; p(EOS) = 0.0015
after a prompt), so a 32-token response ends at EOS about 5% of the time and the batch is
padding-free full-length sampling, unlike any real RL run.

:func:`teach_to_stop` fine-tunes the policy briefly (plain PyTorch + transformers, cross-entropy
on the response tokens only) to answer each benchmark prompt with a short sentence and EOS, then
overwrites it in place. Sampled at temperature 1 the responses then have varied lengths, most
ending at EOS and some running to ``max_new_tokens``, as in real RL. Both sides of the
benchmark load the same fine-tuned directory. Deterministic for a seed (single-threaded CPU).
"""

from __future__ import annotations

import json
from pathlib import Path


def answer_text(ground_truth: str) -> str:
    """The response the policy is taught for a prompt whose answer is ``ground_truth``."""
    return f"The answer is {ground_truth}."


def teach_to_stop(policy_dir: str, prompts_file: str, steps: int = 150, batch_size: int = 16, lr: float = 3e-3,
                  seed: int = 0) -> dict[str, float]:
    """Fine-tune ``policy_dir`` in place to answer and stop (module doc); the last losses and the
    share of greedy answers ending at EOS, for the report."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    records = [json.loads(line) for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    examples = []
    for record in records:
        prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": record["prompt"]}],
                                                    add_generation_prompt=True, tokenize=True, return_dict=False))
        response = tokenizer.encode(answer_text(record["ground_truth"]), add_special_tokens=False)
        examples.append((prompt, response + [tokenizer.eos_token_id]))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        picked = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        width = max(len(examples[i][0]) + len(examples[i][1]) for i in picked)
        input_ids = torch.full((batch_size, width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        attention = torch.zeros((batch_size, width), dtype=torch.long)
        for row, index in enumerate(picked):
            prompt, response = examples[index]
            ids = prompt + response
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, len(prompt): len(ids)] = torch.tensor(response)
            attention[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    stopped = 0
    with torch.no_grad():
        for prompt, response in examples[:16]:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=len(response) + 8, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            stopped += int(tokenizer.eos_token_id in out[0, len(prompt):].tolist())
    model.save_pretrained(policy_dir)
    return {"final_loss": sum(losses[-10:]) / 10, "greedy_stops_at_eos": stopped / min(16, len(examples))}
