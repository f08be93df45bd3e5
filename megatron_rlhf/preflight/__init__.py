"""Pre-flight: everything a user can get wrong, checked before any process, engine or cluster starts.

Every command that starts processes (``train-rl``, ``eval-bon``, ``score``; the SPMD trainers
check their own plans before they spawn ranks) calls its pre-flight first. A pre-flight reads only
config files, data files and the small metadata files of models and checkpoints; it never imports
Ray or vLLM and never loads weights. It raises :class:`~megatron_rlhf.config.errors.UserError`
naming the value and its place (``file: key`` for config, ``file:line`` for data, the directory for
models and checkpoints), which the command line prints as ``error: ...`` with exit code 2.

- :mod:`.checks`: the reusable checks (HF model directory, model length limit, prompt files and
  their reward routes, reward config and its scorers, output path).
- :mod:`.rl`: :func:`~megatron_rlhf.preflight.rl.preflight_rl`, the whole RL run configuration.

Not checked here: what only a running job can know (memory, a dataset line's token count under
a tokenizer, a reward server's health).

Layering: this package sits above config/data/models/rewards/checkpoint (it imports them lazily)
and below trainer/evaluation/cli (which call it).
"""
