"""Test-session set-up shared by every tier (unit, distributed, gpu).

- Tests marked ``gpu`` are skipped where ``torch.cuda.is_available()`` is False. torch is imported
  only when such a test was collected, so pure-Python tests start fast.
- Nothing is fetched from a model hub: Hugging Face offline mode is on (tests build their tiny
  models and tokenizers themselves), and the setting reaches the processes tests spawn.
- HF tokenizers' own thread pool is off, so tests that fork or spawn ranks after using a tokenizer
  neither warn nor deadlock.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)
