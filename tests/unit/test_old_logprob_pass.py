"""When an RL step may skip its old-policy log-prob pass (:mod:`megatron_rlhf.config.ppo_update`),
and the entropy-without-gradient path of :mod:`megatron_rlhf.models.logprobs` it relies on.

The predicate is pure: one epoch of one minibatch, no KL penalty in the rewards, no dropout and
no ``force_old_logprob_pass`` skip the pass; anything else keeps it and says why. The detached
entropy leaves the log-probs' values and the logits' gradient bitwise those of today's path.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.config.ppo_update import (
    PPOUpdateConfig,
    old_logprob_pass_reason,
    skips_old_logprob_pass,
    update_is_on_policy,
)


@pytest.mark.parametrize("kl_mode", ["loss", "none"])
def test_on_policy_plan_skips_the_pass(kl_mode):
    update = PPOUpdateConfig(micro_batch_size=4)
    assert update_is_on_policy(update)
    assert old_logprob_pass_reason(update, kl_mode) is None
    assert skips_old_logprob_pass(update, kl_mode, dropout=0.0)


@pytest.mark.parametrize(("update", "kl_mode", "dropout", "named"), [
    (PPOUpdateConfig(ppo_epochs=2), "loss", 0.0, "ppo_epochs=2"),
    (PPOUpdateConfig(num_minibatches=4), "none", 0.0, "num_minibatches=4"),
    (PPOUpdateConfig(ppo_epochs=3, num_minibatches=2), "loss", 0.0, "ppo_epochs=3"),
    (PPOUpdateConfig(), "penalty", 0.0, "kl_mode='penalty'"),
    (PPOUpdateConfig(), "loss", 0.1, "dropout=0.1"),
    (PPOUpdateConfig(force_old_logprob_pass=True), "none", 0.0, "force_old_logprob_pass"),
])
def test_the_pass_is_kept_and_the_reason_named(update, kl_mode, dropout, named):
    reason = old_logprob_pass_reason(update, kl_mode, dropout)
    assert reason is not None and named in reason
    assert not skips_old_logprob_pass(update, kl_mode, dropout)


def test_off_policy_plans_are_not_on_policy():
    assert not update_is_on_policy(PPOUpdateConfig(ppo_epochs=2))
    assert not update_is_on_policy(PPOUpdateConfig(num_minibatches=2))
    assert update_is_on_policy(PPOUpdateConfig(force_old_logprob_pass=True))  # on-policy, pass forced


def _logits_and_targets(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 17, generator=generator, dtype=torch.float32) * 3
    targets = torch.randint(0, 15, (3, 5), generator=generator)
    upstream = torch.randn(3, 5, generator=generator)
    return logits, targets, upstream


def test_detached_entropy_keeps_logprobs_and_gradient_bitwise():
    from megatron_rlhf.models.logprobs import logprobs_and_entropy, vocab_parallel_logprobs

    logits, targets, upstream = _logits_and_targets()
    with_grad = logits.clone().requires_grad_()
    logprobs, entropy = logprobs_and_entropy(with_grad, targets, None, temperature=0.7, valid_vocab_size=15)
    (logprobs * upstream).sum().backward()  # today's path: the entropy computed, unused by the loss

    detached = logits.clone().requires_grad_()
    logprobs_d, entropy_d = logprobs_and_entropy(detached, targets, None, temperature=0.7, valid_vocab_size=15,
                                                 entropy_grad=False)
    assert not entropy_d.requires_grad and logprobs_d.requires_grad
    (logprobs_d * upstream).sum().backward()

    alone = logits.clone().requires_grad_()
    logprobs_a = vocab_parallel_logprobs(alone, targets, None, temperature=0.7, valid_vocab_size=15)
    (logprobs_a * upstream).sum().backward()

    assert torch.equal(logprobs_d, logprobs) and torch.equal(entropy_d, entropy.detach())
    assert torch.equal(detached.grad, with_grad.grad) and torch.equal(detached.grad, alone.grad)
    assert (detached.grad[..., 15:] == 0).all()  # padded ids: no gradient
