"""What :func:`megatron_rlhf.checkpoint.role_model.load_role_model` refuses before it builds anything.

The loads themselves (HF directories and Megatron checkpoints, every role and layout) run on gloo
ranks in tests/distributed (the workers, SFT, reward models, conversion and verification all go
through this one function); here, on CPU without process groups, the checks that come first.
"""

from __future__ import annotations

import pytest

from megatron_rlhf.checkpoint.role_model import HFWeights, MegatronCheckpoint, load_role_model
from megatron_rlhf.config.parallel import ParallelConfig, ParallelLayoutError
from megatron_rlhf.models.arch import arch_spec_from_hf_config
from megatron_rlhf.models.provider import ModelBuildConfig
from megatron_rlhf.models.tiny import tiny_hf_config


@pytest.fixture(scope="module")
def arch():
    return arch_spec_from_hf_config(tiny_hf_config("llama").to_dict())


def test_a_source_of_another_type_is_refused_by_name(arch) -> None:
    with pytest.raises(TypeError, match="some/hf_dir"):
        load_role_model(arch, ParallelConfig(), ModelBuildConfig(role="lm"), "some/hf_dir")  # type: ignore[arg-type]


@pytest.mark.parametrize("source", [HFWeights("missing"), MegatronCheckpoint("missing")])
def test_a_layout_that_cannot_split_the_model_fails_before_the_build(arch, source) -> None:
    tensor_parallel = arch.num_attention_heads + 1  # divides no head count
    with pytest.raises(ParallelLayoutError, match=f"tensor_parallel={tensor_parallel}"):
        load_role_model(arch, ParallelConfig(tensor_parallel=tensor_parallel), ModelBuildConfig(role="lm"), source)
