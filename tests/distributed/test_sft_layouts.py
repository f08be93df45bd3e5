"""SFT gives the same losses and weights under TP2, PP2 and DP2 as under TP1 PP1.

Each layout loads the same tiny llama (vocab 300, hidden 64, 2 layers) and runs
:func:`~megatron_rlhf.trainer.sft.train_sft` on the same 13 chat conversations (single- and
multi-turn, with and without a system turn; one cut by ``max_length``, one whose assistant turn
is cut away entirely and must be dropped): 2 epochs x 3 optimizer steps of 4 conversations,
microbatches of 2, Megatron's distributed Adam with a cosine LR schedule and gradient clipping,
validation on 5 held-out conversations before training and after each epoch. Checked against
TP1 PP1 within 1e-5 (fp32): every step loss, gradient norm and validation loss, and every
exported tensor.
The exact global token mean is exercised because DP2 runs 1 microbatch per step and the others
2, with unequal token counts, and the 5 validation conversations split 3 / 2 over DP2.

Independent checks with transformers on the original HF model: the first validation loss and the
first step's loss equal the token-mean cross-entropy over the assistant tokens (same
tokenisation, same shuffled first batch from :func:`epoch_order`).

Optimizer: Adam with adam_eps=1e-3, for the reason documented in test_train_step_layouts.py.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig

pytestmark = pytest.mark.distributed

VOCAB = 300
TOLERANCE = 1e-5
MAX_LENGTH = 80
LAYOUTS = {
    "TP1PP1": (ParallelConfig(), 1),
    "TP2": (ParallelConfig(tensor_parallel=2), 1),
    "PP2": (ParallelConfig(pipeline_parallel=2), 1),
    "DP2": (ParallelConfig(), 2),
}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "intermediate_size": 128}


def _conversations(seed: int, count: int) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for index in range(count):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        messages = [{"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"{a} + {b} = {a + b}." + " Done." * (index % 3)}]
        if index % 2:
            messages.insert(0, {"role": "system", "content": "Be brief."})
        if index % 4 == 3:
            messages += [{"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome!"}]
        examples.append({"messages": messages})
    return examples


TRAIN = _conversations(1, 12) + [{"prompt": "Please " * 60, "response": "cut away"}]
TRAIN[5] = {"prompt": "Count to ten.", "response": "one two three four five six seven eight nine ten " * 3}
VALIDATION = _conversations(2, 5)


def _settings():
    from megatron_rlhf.training.megatron_step import OptimizerSettings
    from megatron_rlhf.trainer.sft import SFTConfig

    config = SFTConfig(epochs=2, global_batch_size=4, micro_batch_size=2, max_length=MAX_LENGTH,
                       seed=3, progress_bar=False)
    optimizer = OptimizerSettings(lr=1e-3, min_lr=1e-4, adam_eps=1e-3, clip_grad=1.0,
                                  lr_decay_style="cosine")
    return config, optimizer


def _worker(layouts: list[str], hf_dir: str) -> dict[str, dict]:
    """Run SFT at each layout in turn (same world size) in this rank's process."""
    from transformers import AutoTokenizer

    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.mapping.engine import export_hf_weights, load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model, validate_layout
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.trainer.sft import train_sft

    arch = arch_spec_from_hf_dir(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    config, optimizer = _settings()
    results = {}
    for layout in layouts:
        parallel = LAYOUTS[layout][0]
        state = initialize_parallel(parallel, seed=1)
        build = ModelBuildConfig(transformer_impl="local")
        model = build_stage_model(arch, parallel, build)
        load_hf_weights(model, HFWeightReader(hf_dir), arch, "lm", validate_layout(arch, parallel, build))
        report = train_sft(model, arch, tokenizer, TRAIN, config, optimizer, VALIDATION)
        weights = {name: tensor.detach().clone() for name, tensor in export_hf_weights(model, arch, "lm")}
        results[layout] = {"report": report, "weights": weights if state.rank == 0 else None}
    return results


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(VOCAB, seed=0)
    root = tmp_path_factory.mktemp("sft_layouts")
    path = make_tiny_hf_model("llama", root / "llama", seed=5, vocab_size=VOCAB, tokenizer=tokenizer, **TINY)
    return str(path)


@pytest.fixture(scope="module")
def all_results(hf_dir, rank_pool) -> dict[str, dict]:
    """Two launches: TP1PP1 on one rank; TP2, PP2 and DP2 one after another on two ranks."""
    merged: dict[str, dict] = {}
    by_world_size: dict[int, list[str]] = {}
    for layout, (parallel, data_parallel) in LAYOUTS.items():
        by_world_size.setdefault(parallel.world_size(data_parallel), []).append(layout)
    for world_size, layouts in sorted(by_world_size.items()):
        per_rank = rank_pool.run(_worker, world_size, layouts, hf_dir)
        for layout in layouts:
            merged[layout] = {"ranks": [r[layout]["report"] for r in per_rank], **per_rank[0][layout]}
    return merged


@pytest.fixture(scope="module")
def results(all_results):
    return all_results.__getitem__


def _hf_token_mean_ce(hf_dir: str, examples: list[dict]) -> float:
    """Token-mean cross-entropy of the HF model over the assistant tokens of ``examples``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rlhf.data.chat import as_chat_examples, tokenize_chat_batch

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    batch = tokenize_chat_batch(tokenizer, as_chat_examples(examples, "test"), MAX_LENGTH)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    attention = (torch.arange(batch.input_ids.shape[1]) < batch.sequence_lengths[:, None]).long()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=attention).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    weights = batch.loss_mask[:, 1:]
    return float(-(logprobs * weights).sum() / weights.sum())


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "TP1PP1"])
def test_step_and_validation_losses_match_tp1pp1(layout, results):
    expected = results("TP1PP1")["report"]
    for report in results(layout)["ranks"]:
        assert [s.loss for s in report.steps] == pytest.approx(
            [s.loss for s in expected.steps], abs=TOLERANCE
        )
        assert [v.loss for v in report.validation] == pytest.approx(
            [v.loss for v in expected.validation], abs=TOLERANCE
        )
        assert [s.tokens for s in report.steps] == [s.tokens for s in expected.steps]
        # Clipping and Adam hide a uniformly mis-scaled gradient from the weights; the norm does not.
        assert [s.grad_norm for s in report.steps] == pytest.approx(
            [s.grad_norm for s in expected.steps], rel=1e-5
        )


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "TP1PP1"])
def test_updated_weights_match_tp1pp1(layout, results):
    actual, expected = results(layout)["weights"], results("TP1PP1")["weights"]
    assert sorted(actual) == sorted(expected)
    worst = max((actual[name] - expected[name]).abs().max().item() for name in expected)
    assert worst <= TOLERANCE, f"{layout}: max weight difference {worst:.3e}"


def test_report_counts_schedule_and_movement(hf_dir, results):
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader

    report = results("TP1PP1")["report"]
    assert report.num_examples == 12 and report.num_without_targets == 1
    assert report.num_truncated == 2  # the long response (kept, cut) and the long prompt (dropped)
    assert report.steps_per_epoch == 3 and len(report.steps) == 6
    assert [v.step for v in report.validation] == [0, 3, 6]
    assert report.skipped_steps == 0 and not any(s.skipped for s in report.steps)
    rates = [s.learning_rate for s in report.steps]
    assert rates[0] == pytest.approx(1e-3) and all(a > b for a, b in itertools.pairwise(rates))
    assert report.final_validation_loss < report.initial_validation_loss
    reader = HFWeightReader(hf_dir)
    weights = results("TP1PP1")["weights"]
    assert [name for name, value in weights.items() if torch.equal(value, reader.get(name))] == []


def test_first_losses_are_the_exact_token_mean_of_the_hf_model(hf_dir, results):
    from megatron_rlhf.trainer.sft import epoch_order

    report = results("DP2")["report"]
    expected = _hf_token_mean_ce(hf_dir, VALIDATION)
    assert report.initial_validation_loss == pytest.approx(expected, abs=TOLERANCE)
    usable = TRAIN[:-1]  # the last conversation has no assistant token within MAX_LENGTH
    first_batch = [usable[i] for i in epoch_order(len(usable), seed=3, epoch=0)[:4]]
    assert report.steps[0].loss == pytest.approx(_hf_token_mean_ce(hf_dir, first_batch), abs=TOLERANCE)
