"""Pure parts of sequence parallelism on the local layer spec: the norms (marked for Megatron's
TP gradient sum only under SP, same modules and parameter names otherwise), the local spec's
norm slots, and the padding of lengths that SP/CP cannot split. The distributed step itself is
checked in tests/distributed/test_moe_tp_ep.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_rlhf.models.local_norm import LocalNorm
from megatron_rlhf.models.sequence_padding import pad_microbatch, run_padded, schedule_seq_length


def _config(**fields):
    defaults = dict(normalization="RMSNorm", sequence_parallel=False, layernorm_zero_centered_gamma=False,
                    persist_layer_norm=False, memory_efficient_layer_norm=False,
                    tensor_model_parallel_size=2, context_parallel_size=1)
    return SimpleNamespace(**{**defaults, **fields})


@pytest.mark.parametrize("kind, names", [("RMSNorm", ["weight"]), ("LayerNorm", ["weight", "bias"])])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_local_norm_marks_its_parameters_only_under_sequence_parallelism(kind, names, sequence_parallel):
    norm = LocalNorm(config=_config(normalization=kind, sequence_parallel=sequence_parallel), hidden_size=8, eps=1e-6)
    assert type(norm) is getattr(torch.nn, kind)  # a plain torch module: checkpoints do not change
    assert [name for name, _ in norm.named_parameters()] == names
    assert all(p.sequence_parallel is sequence_parallel for p in norm.parameters())


def test_local_norm_refuses_fused_kernel_options_by_name():
    with pytest.raises(ValueError, match="persist_layer_norm=True"):
        LocalNorm(config=_config(persist_layer_norm=True), hidden_size=8)


def test_local_spec_uses_the_local_norm_in_every_norm_slot():
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_rlhf.models.arch import arch_spec_from_hf_config
    from megatron_rlhf.models.layer_spec import build_layer_spec
    from megatron_rlhf.models.tiny import tiny_hf_config

    for family, qk_norm in (("qwen3", LocalNorm), ("llama", IdentityOp)):
        layer = build_layer_spec(arch_spec_from_hf_config(tiny_hf_config(family).to_dict()), "local").submodules
        assert layer.input_layernorm is LocalNorm and layer.pre_mlp_layernorm is LocalNorm
        attention = layer.self_attention.submodules
        assert attention.q_layernorm is qk_norm and attention.k_layernorm is qk_norm


@pytest.mark.parametrize("tp, sp, cp, length, expected", [
    (2, True, 1, 11, 12), (2, False, 1, 11, 11), (4, True, 1, 12, 12), (2, True, 2, 11, 16), (1, False, 2, 5, 8),
])
def test_schedule_length_is_padded_to_what_sp_and_cp_split(tp, sp, cp, length, expected):
    config = _config(tensor_model_parallel_size=tp, sequence_parallel=sp, context_parallel_size=cp)
    assert schedule_seq_length(config, length) == expected


def test_padding_continues_positions_and_is_cut_from_per_token_outputs():
    microbatch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 4]]), "sequence_lengths": torch.tensor([3, 2])}
    padded = pad_microbatch(microbatch, 4)
    assert padded["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 4, 0]]
    assert padded["position_ids"].tolist() == [[0, 1, 2, 3]] * 2
    assert padded["sequence_lengths"] is microbatch["sequence_lengths"]

    def causal(batch):  # a running sum: each position sees only the tokens before it
        return batch["input_ids"].float().cumsum(dim=1)

    assert torch.equal(run_padded(causal, microbatch, 4, is_last_stage=True), causal(microbatch))
    assert run_padded(causal, microbatch, 4, is_last_stage=False).shape == (2, 4)
    per_sequence = run_padded(lambda batch: batch["input_ids"].sum(dim=1), microbatch, 4, is_last_stage=True)
    assert per_sequence.shape == (2,)
