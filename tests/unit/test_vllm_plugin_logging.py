"""The plugin's log filter drops only vLLM's RotaryEmbedding reload false alarm (no engine needed)."""

from __future__ import annotations

import logging

from megatron_rlhf.rollout.vllm_plugin import LAYERWISE_LOGGER, RotaryReloadNoise


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(LAYERWISE_LOGGER, logging.WARNING, __file__, 1, message, args, None)


def test_only_the_rotary_failed_to_load_warning_is_dropped():
    noise = RotaryReloadNoise()
    assert not noise.filter(record("%s: Failed to load weights", "RotaryEmbedding"))
    assert noise.filter(record("%s: Failed to load weights", "QKVParallelLinear"))
    assert noise.filter(record("%s: Excessive loading", "RotaryEmbedding"))
    assert noise.filter(record("Allocating %.1f MB of device memory", 3.0))
