"""Model provider: one Megatron-Core ``GPTModel`` per pipeline stage, built from an ArchSpec.

:func:`build_model` validates the layout against the architecture first (TP must divide the
heads, KV heads, MLP widths and padded vocabulary; PP must divide the layers; EP must divide
the experts), then builds the stage's ``GPTModel`` with the layer spec chosen by
:class:`ModelBuildConfig.transformer_impl` and wraps it in the head of its role
(:class:`megatron_rlhf.models.heads.RoleModel`).

Guarantee: the model built from an ArchSpec computes the same function as the HF model of that
config (checked in fp32 against transformers for every supported family and layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_rlhf.config.parallel import ParallelConfig, ParallelLayoutError
from megatron_rlhf.config.precision import PrecisionConfig, torch_dtype_fields, transformer_config_fields
from megatron_rlhf.models.arch import ArchSpec
from megatron_rlhf.models.heads import ROLES, SCALAR_ROLES, RoleModel, ScalarHead
from megatron_rlhf.models.layer_spec import (
    build_layer_spec,
    decoder_spec,
    resolve_transformer_impl,
    validate_local_attention,
)
from megatron_rlhf.parallel.megatron_compat import dataclass_with_supported_fields

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelBuildConfig:
    role: str = "lm"
    """Head by role: lm (actor/reference/GenRM), value (critic), reward (ORM), prm."""
    transformer_impl: str = "auto"
    """auto | local | transformer_engine (see megatron_rlhf.models.layer_spec)."""
    params_dtype: str = "float32"
    """float32 | bfloat16 | float16: dtype of the model weights."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times TP (Megatron's convention)."""
    padded_vocab_size: int | None = None
    """Use exactly this padded vocabulary (e.g. the one a checkpoint was saved with)."""
    max_sequence_length: int | None = None
    """Longest sequence the rotary tables cover; None: the HF max_position_embeddings."""
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    moe_token_dispatcher: str = "alltoall"
    """alltoall | allgather: how tokens reach experts under expert parallelism."""
    moe_aux_loss_coeff: float = 0.0
    """Load-balancing auxiliary loss weight; 0 disables it (the forward pass is unaffected)."""
    precision: PrecisionConfig | None = None
    """fp32 | bf16 | fp8 training precision (megatron_rlhf.config.precision); when given it sets
    the weight dtype (``params_dtype`` must then be left at float32 or agree) and the fp8
    fields, and fp8 requires the Transformer Engine spec. None: ``params_dtype`` alone decides
    (bfloat16 weights train with Megatron's bf16 mixed precision)."""
    local_attention: str = "sdpa"
    """sdpa | megatron: core attention of the local spec. sdpa: fused
    torch scaled_dot_product_attention (megatron_rlhf.models.sdpa_attention); megatron:
    Megatron-Core's unfused DotProductAttention. Same function, no parameters either way;
    ignored under Transformer Engine."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r} (choose from {ROLES})")
        if self.params_dtype not in DTYPES:
            raise ValueError(f"params_dtype={self.params_dtype!r} (choose from {tuple(DTYPES)})")
        validate_local_attention(self.local_attention)
        if self.precision is not None:
            if self.params_dtype not in ("float32", self.precision.params_dtype):
                raise ValueError(
                    f"params_dtype={self.params_dtype!r} disagrees with precision.mode="
                    f"{self.precision.mode!r} ({self.precision.params_dtype} weights)"
                )
            if self.precision.uses_transformer_engine and self.transformer_impl == "local":
                raise ValueError(
                    "precision.mode='fp8' runs through Transformer Engine: transformer_impl='local' "
                    "cannot; use auto or transformer_engine"
                )
        if self.make_vocab_size_divisible_by < 1:
            raise ValueError(
                f"make_vocab_size_divisible_by={self.make_vocab_size_divisible_by} must be >= 1"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.moe_token_dispatcher not in ("alltoall", "allgather"):
            raise ValueError(
                f"moe_token_dispatcher={self.moe_token_dispatcher!r} (choose alltoall or allgather)"
            )


    @property
    def weights_dtype(self) -> str:
        """The dtype name the weights are built in (the precision's when one is given)."""
        return self.precision.params_dtype if self.precision is not None else self.params_dtype


def precision_fields(build: ModelBuildConfig) -> dict:
    """TransformerConfig precision kwargs (torch dtypes) for ``build``."""
    if build.precision is not None:
        return torch_dtype_fields(transformer_config_fields(build.precision))
    dtype = DTYPES[build.params_dtype]
    return dict(params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype is torch.bfloat16,
                fp16=dtype is torch.float16)


def padded_vocab_size(vocab_size: int, tensor_parallel: int, divisible_by: int) -> int:
    """Megatron's padding: the smallest multiple of ``divisible_by * TP`` >= ``vocab_size``."""
    multiple = divisible_by * tensor_parallel
    return int(math.ceil(vocab_size / multiple) * multiple)


def resolve_padded_vocab(arch: ArchSpec, parallel: ParallelConfig, build: ModelBuildConfig) -> int:
    if build.padded_vocab_size is None:
        return padded_vocab_size(
            arch.vocab_size, parallel.tensor_parallel, build.make_vocab_size_divisible_by
        )
    padded = build.padded_vocab_size
    if padded < arch.vocab_size:
        raise ParallelLayoutError(
            f"padded_vocab_size={padded} is smaller than the vocabulary ({arch.vocab_size})"
        )
    if padded % parallel.tensor_parallel != 0:
        raise ParallelLayoutError(
            f"tensor_parallel={parallel.tensor_parallel} does not divide the padded vocabulary "
            f"size {padded} (fixed by the checkpoint); choose a TP size that divides it"
        )
    return padded


def validate_layout(arch: ArchSpec, parallel: ParallelConfig, build: ModelBuildConfig) -> int:
    """Check that ``parallel`` can split ``arch``; return the padded vocabulary size."""
    tp = parallel.tensor_parallel
    checks = [
        ("num_attention_heads", arch.num_attention_heads),
        ("num_key_value_heads", arch.num_query_groups),
        ("intermediate_size", arch.ffn_hidden_size),
    ]
    for name, value in checks:
        if value % tp != 0:
            raise ParallelLayoutError(
                f"tensor_parallel={tp} does not divide {name}={value} of {arch.hf_architecture}"
            )
    if parallel.pipeline_parallel > arch.num_layers:
        raise ParallelLayoutError(
            f"pipeline_parallel={parallel.pipeline_parallel} is larger than the number of "
            f"layers ({arch.num_layers})"
        )
    uneven = (parallel.num_layers_in_first_pipeline_stage, parallel.num_layers_in_last_pipeline_stage)
    if uneven == (None, None) and arch.num_layers % parallel.pipeline_parallel != 0:
        raise ParallelLayoutError(
            f"pipeline_parallel={parallel.pipeline_parallel} does not divide the number of layers "
            f"({arch.num_layers}); set num_layers_in_first/last_pipeline_stage for uneven stages"
        )
    if min(parallel.stage_layers(arch.num_layers)) < 1:
        raise ParallelLayoutError(f"a pipeline stage would get no layer: {parallel.stage_layers(arch.num_layers)}")
    if arch.is_moe:
        assert arch.num_experts is not None and arch.moe_ffn_hidden_size is not None
        if arch.num_experts % parallel.expert_parallel != 0:
            raise ParallelLayoutError(
                f"expert_parallel={parallel.expert_parallel} does not divide the number of "
                f"experts ({arch.num_experts})"
            )
        etp = parallel.expert_tensor_parallel_size
        if arch.moe_ffn_hidden_size % etp != 0:
            raise ParallelLayoutError(
                f"expert_tensor_parallel={etp} does not divide moe_intermediate_size="
                f"{arch.moe_ffn_hidden_size}"
            )
    elif parallel.expert_parallel > 1:
        raise ParallelLayoutError(
            f"expert_parallel={parallel.expert_parallel} but {arch.hf_architecture} has no experts"
        )
    if parallel.context_parallel > 1 and not torch.cuda.is_available():
        raise ParallelLayoutError(
            f"context_parallel={parallel.context_parallel} needs CUDA and Transformer Engine attention "
            "(Megatron's ring attention); on CPU use context_parallel=1"
        )
    return resolve_padded_vocab(arch, parallel, build)


def transformer_config(arch: ArchSpec, parallel: ParallelConfig, build: ModelBuildConfig, impl: str):
    """The Megatron ``TransformerConfig`` for ``arch`` under ``parallel``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    fused = on_gpu  # fused kernels exist only on CUDA; on CPU Megatron's torch paths run
    moe_fields = {}
    if arch.is_moe:
        assert arch.moe_layer_pattern is not None
        moe_fields = dict(
            num_moe_experts=arch.num_experts,
            moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            moe_router_topk=arch.moe_router_topk,
            moe_router_pre_softmax=arch.moe_router_pre_softmax,
            moe_router_load_balancing_type="aux_loss" if build.moe_aux_loss_coeff else "none",
            moe_aux_loss_coeff=build.moe_aux_loss_coeff,
            moe_token_dispatcher_type=build.moe_token_dispatcher,
            moe_grouped_gemm=impl == "transformer_engine",
            moe_router_dtype="fp32",
            moe_layer_freq=list(arch.moe_layer_pattern),
        )
    return dataclass_with_supported_fields(
        TransformerConfig,
        off_values={},
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        num_layers_in_first_pipeline_stage=parallel.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=parallel.num_layers_in_last_pipeline_stage,
        recompute_granularity=parallel.recompute_granularity,
        recompute_method=parallel.recompute_method,
        recompute_num_layers=parallel.recompute_num_layers,
        recompute_modules=list(parallel.recompute_modules),
        use_cpu_initialization=not on_gpu,
        **precision_fields(build),
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        rotary_interleaved=arch.rotary_interleaved,
        hidden_dropout=build.hidden_dropout,
        attention_dropout=build.attention_dropout,
        init_method_std=build.init_method_std,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        masked_softmax_fusion=fused,
        apply_rope_fusion=fused and not arch.rotary_interleaved,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **moe_fields,
    )


def build_model(
    arch: ArchSpec,
    parallel: ParallelConfig,
    build: ModelBuildConfig,
    pre_process: bool,
    post_process: bool,
    device: torch.device | None = None,
) -> RoleModel:
    """Build this pipeline stage's model for ``build.role``.

    ``pre_process``/``post_process``: whether this stage holds the embedding / the head
    (first / last pipeline stage). Parallel state must be initialised
    (:func:`megatron_rlhf.parallel.init.initialize_parallel`).
    """
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_rlhf.models import packed_rope

    packed_rope.install()  # one cos/sin table per packed micro-batch instead of per layer (same values)
    impl = resolve_transformer_impl(build.transformer_impl)
    if build.precision is not None and build.precision.uses_transformer_engine and impl != "transformer_engine":
        raise ValueError("precision.mode='fp8' needs the Transformer Engine layer spec; it resolved to local here")
    vocab = validate_layout(arch, parallel, build)
    config = transformer_config(arch, parallel, build, impl)
    is_lm = build.role not in SCALAR_ROLES
    trunk = GPTModel(
        config=config,
        transformer_layer_spec=decoder_spec(build_layer_spec(arch, impl, build.local_attention), config, impl),
        vocab_size=vocab,
        max_sequence_length=build.max_sequence_length or arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process and is_lm,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings and is_lm,
        position_embedding_type="rope",
        rotary_percent=arch.rotary_percent,
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
    )
    head = None
    if not is_lm and post_process:
        head = ScalarHead(
            arch.hidden_size, arch.norm_epsilon, build.init_method_std, parallel.sequence_parallel
        ).to(DTYPES[build.weights_dtype])
    model = RoleModel(build.role, trunk, head, post_process, transformer_impl=impl)
    _cast_parameters(model, DTYPES[build.weights_dtype])
    model.parallel = parallel  # the layout it was built for (the updater reads overlap_grad_reduce)
    if device is not None:
        model.to(device)
    return model


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter in ``dtype``, as Megatron's Float16Module does for bf16/fp16
    training: the local spec creates its norms in float32 whatever ``params_dtype`` says."""
    if dtype is torch.float32:
        return
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


def build_stage_model(
    arch: ArchSpec, parallel: ParallelConfig, build: ModelBuildConfig, device: torch.device | None = None
) -> RoleModel:
    """:func:`build_model` with pre/post-process taken from this rank's pipeline position."""
    from megatron.core import parallel_state

    return build_model(
        arch,
        parallel,
        build,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        device=device,
    )
