"""Independent reference implementations for the algorithm tests, written differently on purpose.

Plain Python over lists of floats (double precision), one sample or token at a time, straight
from the papers' formulas; nothing here imports :mod:`megatron_rlhf.algorithms`. Token-level
inputs are lists of rows; a row's response is its first ``length`` entries (right padding).
"""

from __future__ import annotations

import math
import statistics


def response_rows(rows: list[list[float]], lengths: list[int]) -> list[list[float]]:
    """Each row cut to its response tokens."""
    return [row[:length] for row, length in zip(rows, lengths)]


def pad_rows(rows: list[list[float]], width: int) -> list[list[float]]:
    return [row + [0.0] * (width - len(row)) for row in rows]


def gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list, list]:
    """GAE of one response (rewards and values of its tokens only): advantages, returns."""
    length = len(rewards)
    advantages = [0.0] * length
    for t in range(length):
        total = 0.0
        for k in range(t, length):
            next_value = values[k + 1] if k + 1 < length else 0.0
            delta = rewards[k] + gamma * next_value - values[k]
            total += (gamma * lam) ** (k - t) * delta
        advantages[t] = total
    return advantages, [a + v for a, v in zip(advantages, values)]


def returns_to_go(rewards: list[float], gamma: float) -> list[float]:
    return [
        sum(gamma ** (k - t) * rewards[k] for k in range(t, len(rewards)))
        for t in range(len(rewards))
    ]


def _groups(rewards: list[float], groups: list[int]) -> dict[int, list[float]]:
    members: dict[int, list[float]] = {}
    for reward, group in zip(rewards, groups):
        members.setdefault(group, []).append(reward)
    return members


def grpo(rewards: list[float], groups: list[int], normalize_std: bool, eps: float) -> list[float]:
    """A_i = (r_i - mean_g) / (stdev_g + eps), sample (n - 1) stdev, 0 for one-sample groups."""
    members = _groups(rewards, groups)
    out = []
    for reward, group in zip(rewards, groups):
        rs = members[group]
        if len(rs) == 1:
            out.append(0.0)
            continue
        centred = reward - statistics.fmean(rs)
        out.append(centred / (statistics.stdev(rs) + eps) if normalize_std else centred)
    return out


def rloo(rewards: list[float], groups: list[int]) -> list[float]:
    """A_i = r_i - mean of the other rewards of i's group; 0 when i is alone."""
    out = []
    for i, (reward, group) in enumerate(zip(rewards, groups)):
        others = [r for j, (r, g) in enumerate(zip(rewards, groups)) if g == group and j != i]
        out.append(reward - sum(others) / len(others) if others else 0.0)
    return out


def whiten(values: list[float], eps: float) -> list[float]:
    if len(values) < 2:
        return [0.0] * len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values)
    return [(v - mean) / (std + eps) for v in values]


def kl(estimator: str, logprob: float, ref_logprob: float) -> float:
    x = logprob - ref_logprob
    if estimator == "k1":
        return x
    if estimator == "k2":
        return 0.5 * x * x
    return math.exp(-x) - 1.0 + x


def ppo_token_loss(
    logprob: float,
    old_logprob: float,
    advantage: float,
    low: float,
    high: float,
    dual: float | None,
) -> float:
    ratio = math.exp(logprob - old_logprob)
    clipped_ratio = min(max(ratio, 1.0 - low), 1.0 + high)
    loss = max(-ratio * advantage, -clipped_ratio * advantage)
    if dual is not None and advantage < 0:
        loss = min(loss, -dual * advantage)
    return loss


def value_token_loss(value: float, old_value: float, ret: float, clip: float | None) -> float:
    plain = (value - ret) ** 2
    if clip is None:
        return 0.5 * plain
    clipped = min(max(value, old_value - clip), old_value + clip)
    return 0.5 * max(plain, (clipped - ret) ** 2)


def reduce(rows: list[list[float]], name: str) -> float:
    """rows: per-sequence lists of response-token values (empty list = empty response)."""
    non_empty = [row for row in rows if row]
    if not non_empty:
        return 0.0
    if name == "token_mean":
        tokens = [v for row in non_empty for v in row]
        return sum(tokens) / len(tokens)
    if name == "seq_mean_token_sum":
        return sum(sum(row) for row in non_empty) / len(non_empty)
    return sum(sum(row) / len(row) for row in non_empty) / len(non_empty)


def adaptive_kl(coef: float, kl_value: float, n_steps: int, target: float, horizon: int) -> float:
    error = kl_value / target - 1.0
    error = -0.2 if error < -0.2 else min(error, 0.2)
    return coef * (1.0 + error * n_steps / horizon)
