"""The packed-RoPE fast path gives Megatron's values bit for bit, and hands every other case to
Megatron's own function (:mod:`megatron_rlhf.models.packed_rope`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_rlhf.models import packed_rope


class OneRankGroup:
    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def _config(**changes):
    fields = dict(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False, mrope_section=None)
    return SimpleNamespace(**{**fields, **changes})


def _freqs(max_len: int, rotary_dim: int) -> torch.Tensor:
    inverse = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inverse)
    return torch.cat((angles, angles), dim=-1)[:, None, None, :]


def _packed(lengths, heads=3, head_dim=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    cu_seqlens = torch.tensor([0] + list(lengths)).cumsum(0).to(torch.int32)
    t = torch.randn(int(cu_seqlens[-1]), heads, head_dim, generator=generator, requires_grad=True)
    return t, cu_seqlens


def _both(t, freqs, config, cu_seqlens, mscale=1.0):
    from megatron.core.models.common.embeddings import rope_utils

    outputs, grads = [], []
    for function in (rope_utils.apply_rotary_pos_emb, packed_rope.apply_rotary_pos_emb):
        t.grad = None
        out = function(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=OneRankGroup())
        weights = torch.linspace(-1.0, 2.0, out.numel()).reshape(out.shape)
        (out * weights).sum().backward()
        outputs.append(out.detach())
        grads.append(t.grad.clone())
    return outputs, grads


@pytest.mark.parametrize("lengths,mscale", [([5, 1, 17, 9], 1.0), ([40, 3, 3, 64, 2], 0.7071), ([1], 1.0)])
def test_packed_rows_match_megatron_bit_for_bit_forward_and_backward(lengths, mscale):
    t, cu_seqlens = _packed(lengths)
    freqs = _freqs(128, 32)
    assert packed_rope.handles(t, freqs, _config(), cu_seqlens, OneRankGroup())
    (expected, got), (expected_grad, got_grad) = _both(t, freqs, _config(), cu_seqlens, mscale)
    assert torch.equal(got, expected)
    assert torch.equal(got_grad, expected_grad)


@pytest.mark.parametrize("case", ["partial-rotary", "interleaved", "fused", "positions-of-the-whole-pack", "not-packed",
                                  "context-parallel"])
def test_other_cases_go_to_megatrons_function(case):
    t, cu_seqlens = _packed([6, 10, 4])
    freqs, config, group = _freqs(64, 32), _config(), OneRankGroup()
    if case == "partial-rotary":
        freqs = _freqs(64, 16)
    elif case == "interleaved":
        config = _config(rotary_interleaved=True)
    elif case == "fused":
        config = _config(apply_rope_fusion=True)
    elif case == "positions-of-the-whole-pack":
        freqs = _freqs(int(cu_seqlens[-1]), 32)
    elif case == "not-packed":
        cu_seqlens = None
    else:
        group = SimpleNamespace(size=lambda: 2, rank=lambda: 0)
    assert not packed_rope.handles(t, freqs, config, cu_seqlens, group)
    if case in ("partial-rotary", "interleaved", "positions-of-the-whole-pack"):  # runnable on CPU: same values
        (expected, got), (expected_grad, got_grad) = _both(t, freqs, config, cu_seqlens)
        assert torch.equal(got, expected) and torch.equal(got_grad, expected_grad)


def test_one_table_per_pack_is_shared_by_every_layer_and_rebuilt_for_the_next():
    freqs = _freqs(64, 32)
    _, first = _packed([6, 10, 4])
    _, second = _packed([7, 13])
    cos_a, _ = packed_rope.packed_cos_sin(freqs, first, 1.0, torch.float32)
    cos_b, _ = packed_rope.packed_cos_sin(freqs, first, 1.0, torch.float32)
    cos_c, _ = packed_rope.packed_cos_sin(freqs, second, 1.0, torch.float32)
    assert cos_a is cos_b and cos_c is not cos_a
    assert not cos_a.requires_grad and cos_a.shape == (20, 1, 32) and cos_c.shape == (20, 1, 32)
    expected = torch.cos(freqs[torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])]).squeeze(1)
    assert torch.equal(cos_c, expected)


def test_install_replaces_the_function_megatrons_attention_calls():
    from megatron.core.transformer import attention

    packed_rope.install()
    assert attention.apply_rotary_pos_emb is packed_rope.apply_rotary_pos_emb
