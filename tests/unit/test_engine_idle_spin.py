"""How long an idle vLLM worker busy-waits (megatron_rlhf.rollout.vllm_plugin.apply_idle_spin).

vLLM's shared-memory queue reader spins for ``SpinCondition(busy_loop_s=1)`` after its last read;
the plugin makes ``MEGATRON_RLHF_ENGINE_IDLE_SPIN_S`` that default in vLLM's processes, CPU
engines set it to 50 ms, a user's value wins and a bad one is refused by name before vLLM starts.
(The effect itself, a worker that stops using CPU 50 ms after a generation instead of a second,
was measured from /proc: see the README's CPU threads section.)
"""

from __future__ import annotations

import pytest

from megatron_rlhf.config.rollout import RolloutConfig
from megatron_rlhf.rollout.engine_environment import CPU_IDLE_SPIN_S, cpu_process_environment
from megatron_rlhf.rollout.vllm_plugin import IDLE_SPIN_ENV, apply_idle_spin, idle_spin_seconds


@pytest.fixture
def spin_condition():
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    saved = SpinCondition.__init__.__defaults__
    yield SpinCondition
    SpinCondition.__init__.__defaults__ = saved


def test_the_variable_becomes_the_readers_default_spin(spin_condition, monkeypatch):
    monkeypatch.setenv(IDLE_SPIN_ENV, "0.05")
    assert apply_idle_spin() == 0.05
    assert spin_condition.__init__.__defaults__[-1] == 0.05


def test_unset_leaves_vllms_default(spin_condition, monkeypatch):
    monkeypatch.delenv(IDLE_SPIN_ENV, raising=False)
    before = spin_condition.__init__.__defaults__
    assert apply_idle_spin() is None
    assert spin_condition.__init__.__defaults__ == before


@pytest.mark.parametrize("raw", ["soon", "-1", "nan"])
def test_a_bad_value_is_refused_naming_the_variable(raw):
    with pytest.raises(ValueError, match=f"{IDLE_SPIN_ENV}={raw!r}"):
        idle_spin_seconds(raw)


def test_cpu_engines_get_a_short_spin_unless_the_user_set_one(monkeypatch, tmp_path):
    config = RolloutConfig(model_dir=str(tmp_path))
    monkeypatch.delenv(IDLE_SPIN_ENV, raising=False)
    assert cpu_process_environment(config)[IDLE_SPIN_ENV] == str(CPU_IDLE_SPIN_S)
    monkeypatch.setenv(IDLE_SPIN_ENV, "0.2")
    assert IDLE_SPIN_ENV not in cpu_process_environment(config)  # inherited as the user set it
    monkeypatch.setenv(IDLE_SPIN_ENV, "later")
    with pytest.raises(ValueError, match=IDLE_SPIN_ENV):
        cpu_process_environment(config)
