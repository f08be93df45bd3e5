"""The fit planner: layout validation and per-phase bytes per GPU, before any process starts.

- :mod:`~megatron_rlhf.planning.layout`: the layout and its validation against a model.
- :mod:`~megatron_rlhf.planning.params`: parameter tensors per rank (exact, Megatron order).
- :mod:`~megatron_rlhf.planning.state_bytes`: weights, grads and distributed-optimizer state.
- :mod:`~megatron_rlhf.planning.activations`: saved activations, recompute, pipeline in-flight.
- :mod:`~megatron_rlhf.planning.rollout_memory`: vLLM weights and KV cache per GPU.
- :mod:`~megatron_rlhf.planning.plan`: phases, peak, host memory; :mod:`.report` prints it.
- :mod:`~megatron_rlhf.planning.fit_check`: the check every trainer runs before it starts.

Every module here is pure Python arithmetic (no torch import), so the planner answers in
well under a second and can run before any expensive start-up.
"""
