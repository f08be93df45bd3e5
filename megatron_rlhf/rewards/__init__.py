"""Reward sources behind one interface: rule-based verifiers (math, code in a sandbox, multiple
choice, instruction following), the hybrid router, and the `megatron-rlhf score` command.

Importing this package is cheap: it imports nothing. Use the submodules:
:mod:`.sample` (types), :mod:`.interface` (RewardSource, InfraErrorGuard), :mod:`.router`,
:mod:`.reward_config` (YAML, source kinds), :mod:`.sandbox`, :mod:`.verifiers`.
"""
