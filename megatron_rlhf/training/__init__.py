"""The Megatron training library the worker ranks run: the optimizer step (``megatron_step``), the
PPO update plan (``ppo_update``), actor and critic trainers (``actor_critic``), the LM loss and
per-rank GPU metrics. Below ``workers`` (which call it) and ``trainer`` (the loops that drive
the workers); imports no Ray and no vLLM."""
