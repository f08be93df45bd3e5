"""Domain curriculum: phases by step, batch composition by the step's weights (exact for the
proportional allocation, close for the sampled one), determinism, and resume."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from megatron_rlhf.data.curriculum import (
    CurriculumConfig,
    CurriculumPhase,
    CurriculumSampler,
    batch_domains,
)
from megatron_rlhf.data.prompts import PromptRecord

SIZES = {"math": 4, "code": 4, "general": 8}


def _records() -> list[PromptRecord]:
    return [PromptRecord(f"{d}-{i}", d, f"{d} prompt {i}", None) for d, n in SIZES.items() for i in range(n)]


def _ids(batch: list[PromptRecord]) -> list[str]:
    return [record.id for record in batch]


def test_phase_boundaries() -> None:
    config = CurriculumConfig((CurriculumPhase(3, {"math": 1.0}), CurriculumPhase(5, {"code": 1.0})))
    assert [config.phase_at(s).domain_weights for s in (0, 2, 3, 4, 5, 100)] == [
        {"math": 1.0}, {"math": 1.0}, {"code": 1.0}, {"code": 1.0}, {"code": 1.0}, {"code": 1.0}
    ]


def test_math_and_code_first_then_all_domains_by_size() -> None:
    sampler = CurriculumSampler.from_records(_records(), CurriculumConfig.first_then_all(("math", "code"), 2), 8)
    early = [Counter(r.domain for r in sampler.next_batch()) for _ in range(2)]
    assert early == [Counter({"math": 4, "code": 4})] * 2
    assert sampler.probabilities_at(2) == {"code": 0.25, "general": 0.5, "math": 0.25}
    late = [Counter(r.domain for r in sampler.next_batch()) for _ in range(3)]
    assert late == [Counter({"math": 2, "code": 2, "general": 4})] * 3


def test_proportional_allocation_fills_the_batch_by_largest_remainder() -> None:
    rng = random.Random(0)
    counts = Counter(batch_domains({"a": 0.5, "b": 0.3, "c": 0.2}, 7, rng, "proportional"))
    # quotas 3.5, 2.1, 1.4 -> floors 3, 2, 1 and the remaining slot to the largest remainder (a)
    assert counts == Counter({"a": 4, "b": 2, "c": 1})


def test_sampled_allocation_follows_the_weights_on_average() -> None:
    config = CurriculumConfig((CurriculumPhase(None, {"math": 1.0, "code": 1.0, "general": 2.0}),), allocation="sample")
    sampler = CurriculumSampler.from_records(_records(), config, 10)
    counts = Counter(r.domain for _ in range(200) for r in sampler.next_batch())
    # 2000 draws: binomial std is about 19-22, so 0.04 (80 draws) is about 4 standard deviations
    assert abs(counts["math"] / 2000 - 0.25) < 0.04 and abs(counts["general"] / 2000 - 0.5) < 0.04
    assert sum(counts.values()) == 2000


def test_same_config_same_batches_and_resume_gives_the_same_continuation() -> None:
    config = CurriculumConfig.first_then_all(("math", "code"), 3, seed=7)
    first = CurriculumSampler.from_records(_records(), config, 6, seed=1)
    second = CurriculumSampler.from_records(_records(), config, 6, seed=1)
    assert [_ids(first.next_batch()) for _ in range(4)] == [_ids(second.next_batch()) for _ in range(4)]

    state = json.loads(json.dumps(first.state_dict()))
    expected = [_ids(first.next_batch()) for _ in range(5)]
    resumed = CurriculumSampler.from_records(_records(), config, 6, seed=1)
    resumed.load_state_dict(state)
    assert resumed.step == 4
    assert [_ids(resumed.next_batch()) for _ in range(5)] == expected

    reference = CurriculumSampler.from_records(_records(), config, 6, seed=1)
    other_seed = CurriculumSampler.from_records(_records(), CurriculumConfig.first_then_all(("math", "code"), 3, seed=8), 6, seed=1)
    assert [_ids(other_seed.next_batch()) for _ in range(4)] != [_ids(reference.next_batch()) for _ in range(4)]


def test_weights_naming_an_unknown_domain_fail_at_construction() -> None:
    config = CurriculumConfig((CurriculumPhase(None, {"math": 1.0, "poetry": 1.0}),))
    with pytest.raises(ValueError, match=r"domains without prompts: \['poetry'\]"):
        CurriculumSampler.from_records(_records(), config, 4)


def test_from_mapping_accepts_phases_and_the_shorthand() -> None:
    phases = CurriculumConfig.from_mapping({
        "phases": [{"until_step": 10, "domain_weights": {"math": 2, "code": 1}}, {"until_step": None}], "seed": 3,
    })
    assert phases == CurriculumConfig((CurriculumPhase(10, {"math": 2, "code": 1}), CurriculumPhase(None, None)), seed=3)
    shorthand = CurriculumConfig.from_mapping({"first_domains": ["math", "code"], "until_step": 10})
    assert shorthand == CurriculumConfig.first_then_all(("math", "code"), 10)


@pytest.mark.parametrize("raw, message", [
    ({"phases": [{"until_step": 5}, {"until_step": 5}]}, "phase 1: until_step must be an integer > 5"),
    ({"phases": [{"until_step": None}, {"until_step": 5}]}, "only for the last phase"),
    ({"phases": [{"until_step": 5, "domain_weights": {"math": -1}}]}, "'math' must be a finite number >= 0"),
    ({"phases": [{"until_step": 5, "domain_weights": {"math": 0}}]}, "at least one domain weight"),
    ({"phases": [{"until": 5}]}, r"phases\[0\]"),
    ({"first_domains": ["math"]}, "shorthand"),
])
def test_bad_curricula_are_rejected_with_the_phase_named(raw, message) -> None:
    with pytest.raises(ValueError, match=message):
        CurriculumConfig.from_mapping(raw, where="config.yaml:curriculum")
