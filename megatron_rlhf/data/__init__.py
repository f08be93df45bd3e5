"""Datasets (JSONL with file:line errors), chat data, prompt sets, Pre-PPO selection, curricula,
step labelling and the synthetic tasks of the demo."""
