"""Bucketing of the weight stream shared by the gloo and shm transports (no engine needed)."""

from __future__ import annotations

import torch

from megatron_rlhf.rollout.weight_source import iter_buckets, layer_key, payload_bytes


def named(*sizes: int) -> list[tuple[str, torch.Tensor]]:
    return [(f"t{i}", torch.zeros(size, dtype=torch.uint8)) for i, size in enumerate(sizes)]


def test_buckets_are_cut_before_they_would_overflow_and_keep_order():
    buckets = list(iter_buckets(named(40, 50, 10, 30, 80), bucket_bytes=100))
    assert [[name for name, _ in bucket] for bucket in buckets] == [["t0", "t1", "t2"], ["t3"], ["t4"]]
    assert all(sum(payload_bytes(t) for _, t in bucket) <= 100 for bucket in buckets)


def test_a_tensor_larger_than_a_bucket_travels_alone():
    buckets = list(iter_buckets(named(10, 250, 10), bucket_bytes=100))
    assert [[name for name, _ in bucket] for bucket in buckets] == [["t0"], ["t1"], ["t2"]]


def test_size_function_counts_padding_and_empty_streams_give_no_bucket():
    aligned = lambda tensor: -(-payload_bytes(tensor) // 64) * 64
    buckets = list(iter_buckets(named(1, 1, 1), bucket_bytes=128, size_of=aligned))
    assert [len(bucket) for bucket in buckets] == [2, 1]
    assert list(iter_buckets([], bucket_bytes=10)) == []


def layered(*layers: tuple[int, ...]) -> list[tuple[str, torch.Tensor]]:
    pairs = [("model.embed_tokens.weight", torch.zeros(10, dtype=torch.uint8))]
    for index, sizes in enumerate(layers):
        pairs += [(f"model.layers.{index}.w{j}", torch.zeros(size, dtype=torch.uint8)) for j, size in enumerate(sizes)]
    return pairs


def test_layers_are_not_split_across_buckets_when_they_fit():
    buckets = list(iter_buckets(layered((30, 30), (30, 30), (30, 30)), bucket_bytes=100))
    keys = [sorted({layer_key(name) for name, _ in bucket}) for bucket in buckets]
    assert keys == [["model.embed_tokens.weight", "model.layers.0"], ["model.layers.1"], ["model.layers.2"]]


def test_a_layer_larger_than_a_bucket_is_split_by_tensor_and_order_is_kept():
    pairs = layered((60, 60, 60), (10,))
    buckets = list(iter_buckets(pairs, bucket_bytes=100))
    assert [name for bucket in buckets for name, _ in bucket] == [name for name, _ in pairs]
    assert all(sum(payload_bytes(t) for _, t in bucket) <= 100 for bucket in buckets)
    assert layer_key("model.layers.12.mlp.experts.3.w1.weight") == "model.layers.12"
    assert layer_key("lm_head.weight") == "lm_head.weight"
