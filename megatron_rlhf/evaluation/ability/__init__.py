"""Ability-dimension evaluation (`megatron-rlhf eval`): public benchmarks graded by the verifiers.

A suite (:mod:`.suite`) maps tasks, each a local file in a public benchmark format (:mod:`.loaders`),
to the ability dimensions of the Seed paper ("Exploring Data Scaling Trends and Effects in
Reinforcement Learning from Human Feedback", Table 1). :mod:`.generation` answers every item with
vLLM (greedy and/or sampled), :mod:`.grading` grades the answers with the project's verifiers, and
:mod:`.report` writes the per-dimension report (Markdown, PNG, JSON) with deltas between two
policies. Nothing is downloaded: every data file is read from disk.
"""
