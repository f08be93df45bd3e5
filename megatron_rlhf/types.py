"""Typed batches passed between stages. Shapes and meanings are stated per field.

Token tensors are right-padded with ``pad_token_id``; masks mark real tokens. ``B`` is the number
of samples (prompts x n), ``P`` the longest prompt and ``R`` the longest response in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RolloutBatch:
    """Responses sampled by the rollout engine, with what the trainer needs to score them."""

    prompt_ids: torch.Tensor
    """[B, P] long: prompt token ids, right-padded."""
    prompt_lengths: torch.Tensor
    """[B] long: real prompt tokens per sample."""
    response_ids: torch.Tensor
    """[B, R] long: sampled response token ids, right-padded."""
    response_mask: torch.Tensor
    """[B, R] float: 1.0 on real response tokens, 0.0 on padding."""
    sampling_logprobs: torch.Tensor
    """[B, R] float32: log pi_sampler(token) under the engine's weights (0.0 on padding)."""
    finish_reasons: list[str]
    """[B]: 'stop' (EOS or stop string), 'length' (max new tokens) or 'abort'."""
    group_index: torch.Tensor
    """[B] long: which prompt of the request each sample answers (samples of a prompt share it)."""
    prompt_index: torch.Tensor
    """[B] long: index of the prompt in the caller's list (dropped prompts never appear)."""
    pad_token_id: int
    stats: dict[str, int] = field(default_factory=dict)
    """Counters: prompts_in, prompts_truncated, prompts_dropped_too_long, prompts_dropped_empty."""
    response_texts: list[str] | None = None
    """[B]: each response as text, equal to ``tokenizer.decode(ids, skip_special_tokens=True)``
    (the engine reuses vLLM's detokenised text where that is provably the same); None when the
    producer did not provide it (then decode). Rank shares (``parallel.data_dispatch``) drop it."""

    @property
    def num_samples(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def response_lengths(self) -> torch.Tensor:
        """[B] long: real response tokens per sample."""
        return self.response_mask.sum(dim=1).to(torch.long)

    def texts(self, tokenizer: Any) -> list[str]:
        """[B] each response as text: ``response_texts`` when the producer gave them, else
        ``tokenizer.decode(ids, skip_special_tokens=True)`` (the same text either way)."""
        if self.response_texts is not None:
            return list(self.response_texts)
        lengths = self.response_lengths.tolist()
        return [tokenizer.decode(self.response_ids[row, :length].tolist(), skip_special_tokens=True)
                for row, length in enumerate(lengths)]

    def texts_by_prompt(self, tokenizer: Any, num_prompts: int) -> list[list[str]]:
        """The response texts of each of the caller's ``num_prompts`` prompts, in sample order
        (an empty list for a prompt the engine dropped)."""
        grouped: list[list[str]] = [[] for _ in range(num_prompts)]
        for index, text in zip(self.prompt_index.tolist(), self.texts(tokenizer)):
            grouped[index].append(text)
        return grouped

    def full_sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt and response concatenated without inner padding.

        Returns ``(input_ids [B, L], response_start [B])`` where ``L = max(prompt + response)``
        and sample ``b``'s response occupies ``input_ids[b, response_start[b]:][:len_b]``.
        """
        lengths = self.prompt_lengths + self.response_lengths
        width = int(lengths.max().item()) if lengths.numel() else 0
        input_ids = torch.full((self.num_samples, width), self.pad_token_id, dtype=torch.long)
        for row in range(self.num_samples):
            prompt_length = int(self.prompt_lengths[row])
            response_length = int(self.response_lengths[row])
            input_ids[row, :prompt_length] = self.prompt_ids[row, :prompt_length]
            input_ids[row, prompt_length : prompt_length + response_length] = self.response_ids[
                row, :response_length
            ]
        return input_ids, self.prompt_lengths.clone()
