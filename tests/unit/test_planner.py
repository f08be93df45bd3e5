"""The fit planner against hand-computed figures for the three recipe sizes, its layout checks
and the `megatron-rlhf plan` output contract (last line and exit codes 0 / 1 / 2).

Hand computations (bf16 weights, fp32 grads, Adam with Megatron's distributed optimizer; every
tensor size below is a multiple of 64 and every buffer a multiple of lcm(DP, 128), so the
distributed optimizer adds no padding and state = N x (2 + 4 + 12 / shards) bytes):

GLM-4-9B (h 4096, 40 layers, 32 heads, 2 KV heads, d 128, ffn 13696, vocab 151552, QKV bias):
  layer = QKV 4608*4096 + bias 4608 + proj 4096^2 + fc1 2*13696*4096 + fc2 13696*4096 + 2 norms
        = 203,960,832; total = 40 layers + 2 * 151552*4096 + 4096 = 9,399,951,360.
  TP2: layer matrices / 2 + norms = 101,984,512; x40 + 2 * 75776*4096 + 4096 = 4,700,141,568.
Qwen2.5-32B (h 5120, 64 layers, 40 heads, 8 KV, ffn 27648, vocab 152064 -> 152576 at TP8):
  total 32,763,876,352; TP8 PP2 last stage: 32 * 60,959,616 + 5120 + 19072*5120 = 2,048,361,472.
Qwen3-235B-A22B (h 4096, 94 layers, 64 heads, 4 KV, d 128, 128 experts of 1536, top-8):
  layer = 37,748,736 + 33,554,432 + 256 + 8192 + router 524,288 + experts 2,415,919,104;
  total 235,093,634,560. TP4 EP8 ETP1 PP8 (11/12x6/11) DP4, a 12-layer stage:
  dense 18,358,528 / layer, experts 16 * 3 * 1536 * 4096 = 301,989,888 / layer -> 3,844,180,992;
  optimizer = 12 * (12 * 18,358,528 / 4 + 12 * 301,989,888 / 2) = 22,404,178,944 bytes
  (dense over DP x CP = 4, experts over EDP = 128 / (1 * 8 * 8) = 2).
KV cache per token = 2 (K, V) * layers * KV heads per engine GPU * d * 2 bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_rlhf.models.arch import arch_spec_from_hf_config
from megatron_rlhf.planning.layout import LayoutError, PlanLayout, validate_layout
from megatron_rlhf.planning.params import stage_parameter_count, stage_parameters, total_parameter_count
from megatron_rlhf.planning.plan import PlanRequest, compute_plan
from megatron_rlhf.planning.rollout_memory import kv_cache_bytes_per_token
from megatron_rlhf.planning.state_bytes import TrainingPrecision, trained_state_bytes

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _arch(name: str):
    return arch_spec_from_hf_config(json.loads((EXAMPLES / name / "config.json").read_text()))


def test_total_parameters_of_the_three_sizes():
    assert total_parameter_count(_arch("glm4-9b")) == 9_399_951_360
    assert total_parameter_count(_arch("qwen2.5-32b")) == 32_763_876_352
    assert total_parameter_count(_arch("qwen3-235b-a22b")) == 235_093_634_560


def test_glm4_9b_tp2_dp4_state_bytes():
    arch = _arch("glm4-9b")
    layout = PlanLayout(tensor_parallel=2, data_parallel=4)
    params = 4_700_141_568
    assert stage_parameter_count(arch, layout, 0) == params
    state = trained_state_bytes(stage_parameters(arch, layout, 0), TrainingPrecision(), 4, 4)
    assert (state.weights, state.grads, state.optimizer) == (2 * params, 4 * params, 3 * params)


def test_qwen25_32b_tp8_pp2_dp2():
    arch = _arch("qwen2.5-32b")
    layout = PlanLayout(tensor_parallel=8, pipeline_parallel=2, data_parallel=2)
    assert stage_parameter_count(arch, layout, 1) == 2_048_361_472
    assert stage_parameter_count(arch, layout, 0) == 2_048_356_352
    plan = compute_plan(arch, layout, PlanRequest(seq_len=4096))
    assert plan.params_per_gpu == 2_048_361_472
    assert plan.state_bytes_per_gpu == 12 * 2_048_361_472


def test_qwen3_235b_expert_sharding():
    arch = _arch("qwen3-235b-a22b")
    layout = PlanLayout(tensor_parallel=4, pipeline_parallel=8, data_parallel=4, expert_parallel=8,
                        expert_tensor_parallel=1, first_stage_layers=11, last_stage_layers=11)
    assert layout.expert_data_parallel == 2
    assert validate_layout(arch, layout) == [11] + [12] * 6 + [11]
    assert stage_parameter_count(arch, layout, 1) == 3_844_180_992
    state = trained_state_bytes(stage_parameters(arch, layout, 1), TrainingPrecision(), 4, 2)
    assert state.optimizer == 22_404_178_944
    assert state.weights == 2 * 3_844_180_992


@pytest.mark.parametrize(
    ("name", "engine_tp", "expected"),
    [("glm4-9b", 1, 2 * 40 * 2 * 128 * 2), ("glm4-9b", 4, 2 * 40 * 1 * 128 * 2),
     ("qwen2.5-32b", 1, 2 * 64 * 8 * 128 * 2), ("qwen2.5-32b", 8, 2 * 64 * 1 * 128 * 2),
     ("qwen3-235b-a22b", 1, 2 * 94 * 4 * 128 * 2), ("qwen3-235b-a22b", 8, 2 * 94 * 1 * 128 * 2)],
)
def test_kv_cache_per_token(name, engine_tp, expected):
    assert kv_cache_bytes_per_token(_arch(name), engine_tp) == expected


@pytest.mark.parametrize(
    ("name", "layout", "seq_len", "message"),
    [("glm4-9b", PlanLayout(tensor_parallel=3), None, "does not divide num_attention_heads"),
     ("glm4-9b", PlanLayout(tensor_parallel=4), None, "num_key_value_heads=2"),
     ("glm4-9b", PlanLayout(pipeline_parallel=3), None, "does not divide num_layers=40"),
     ("glm4-9b", PlanLayout(expert_parallel=2), None, "no experts"),
     ("glm4-9b", PlanLayout(tensor_parallel=2, context_parallel=2), 4100, "2 x CP x TP = 8"),
     ("glm4-9b", PlanLayout(pipeline_parallel=4, first_stage_layers=9, last_stage_layers=10), None,
      "do not split equally"),
     ("qwen3-235b-a22b", PlanLayout(expert_parallel=3), None, "does not divide num_experts=128"),
     ("qwen3-235b-a22b", PlanLayout(tensor_parallel=4, data_parallel=4, expert_parallel=8), None,
      "ETPxEPxPP"),
     ("qwen3-235b-a22b", PlanLayout(pipeline_parallel=8), None, "does not divide num_layers=94")],
)
def test_invalid_layouts_are_named(name, layout, seq_len, message):
    with pytest.raises(LayoutError, match=message):
        validate_layout(_arch(name), layout, seq_len)


def test_sequence_parallel_needs_tp():
    with pytest.raises(LayoutError, match="sequence_parallel"):
        validate_layout(_arch("glm4-9b"), PlanLayout(sequence_parallel=True))


def test_recompute_and_sequence_parallel_shrink_activations():
    arch = _arch("qwen2.5-32b")
    base = PlanLayout(tensor_parallel=8, pipeline_parallel=2, data_parallel=2)
    sp = PlanLayout(tensor_parallel=8, pipeline_parallel=2, data_parallel=2, sequence_parallel=True)

    def activations(layout, recompute):
        plan = compute_plan(arch, layout, PlanRequest(seq_len=8192, recompute=recompute))
        return plan.stages[0].phases["train_fwd_bwd"]["activations"]

    assert activations(sp, "none") < activations(base, "none")
    assert activations(base, "full") < activations(base, "selective") < activations(base, "none")


def _run_plan(capsys, *argv):
    from megatron_rlhf.cli import main

    code = main(["plan", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plan_cli_contract_fits(capsys):
    code, out, _ = _run_plan(capsys, "--hf-config", str(EXAMPLES / "glm4-9b" / "config.json"),
                             "--tp", "2", "--pp", "1", "--ep", "1", "--cp", "1", "--dp", "4",
                             "--gpu", "h100", "--seq-len", "4096", "--micro-batch", "1",
                             "--recompute", "full", "--sequence-parallel")
    last = out.strip().splitlines()[-1]
    fields = dict(item.split("=") for item in last.split())
    assert list(fields) == ["params_per_gpu", "weights_grads_optimizer_gib", "peak_gib", "fits"]
    assert int(fields["params_per_gpu"]) == 4_700_141_568
    assert float(fields["weights_grads_optimizer_gib"]) == pytest.approx(9 * 4_700_141_568 / 2**30, abs=1e-3)
    assert fields["fits"] == "yes" and code == 0


def test_plan_cli_contract_does_not_fit(capsys):
    code, out, _ = _run_plan(capsys, "--hf-config", str(EXAMPLES / "qwen2.5-32b" / "config.json"),
                             "--tp", "1", "--dp", "1", "--gpu", "h100")
    assert code == 1
    assert out.strip().splitlines()[-1].endswith("fits=no")
    assert "does not fit: phase" in out and "largest component" in out


def test_plan_cli_invalid_layout_exits_2(capsys):
    code, out, err = _run_plan(capsys, "--hf-config", str(EXAMPLES / "glm4-9b" / "config.json"),
                               "--tp", "3", "--gpu", "h200")
    assert code == 2 and "tensor_parallel=3" in err and "fits=" not in out
