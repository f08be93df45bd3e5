"""Test-session set-up shared by every tier (unit, distributed, gpu).

- Tests marked ``gpu`` are skipped where ``torch.cuda.is_available()`` is False. torch is imported
  only when such a test was collected, so pure-Python tests start fast.
- Tests marked ``vllm`` need the vLLM engine: skipped where it is not installed, except under CI
  (``CI`` set), which installs it, so there a missing engine stops the run instead of skipping.
- Nothing is fetched from a model hub: Hugging Face offline mode is on (tests build their tiny
  models and tokenizers themselves), and the setting reaches the processes tests spawn.
- HF tokenizers' own thread pool is off, so tests that fork or spawn ranks after using a tokenizer
  neither warn nor deadlock.
- Every test is marked with its directory's tier (``unit``, ``distributed``, ``vllm``, ``e2e``,
  ``gpu``; some also ``slow``) and the time per tier is printed at the end; the longest modules
  come first, each module's tests together (pytest-xdist's workers take whole modules; see
  tests/tiers.py).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from tests.tiers import TierTimer, apply_tier_markers, order_for_workers, xdist_workers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: its reports reach the controller's timer
        return
    config.pluginmanager.register(TierTimer(config.rootpath, xdist_workers(config)), "megatron-rlhf-tier-timer")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # First, so that `-m` selects on the tier markers added here.
    apply_tier_markers(items)
    order_for_workers(items)
    _require_vllm([item for item in items if item.get_closest_marker("vllm") is not None])
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


def _require_vllm(vllm_items: list[pytest.Item]) -> None:
    if not vllm_items or importlib.util.find_spec("vllm") is not None:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(
            f"{len(vllm_items)} collected tests are marked vllm but vLLM is not installed; CI installs it "
            "with `bash scripts/bootstrap_env.sh --with-vllm` (a missing engine must fail, not skip)"
        )
    skip = pytest.mark.skip(reason="vLLM is installed by `bash scripts/bootstrap_env.sh --with-vllm`")
    for item in vllm_items:
        item.add_marker(skip)
