"""Rule-based reasoning-task verifiers: math answers, code (in the sandbox), multiple choice,
verifiable instruction-following constraints. Each is a :class:`~megatron_rlhf.rewards.interface.RewardSource`."""
