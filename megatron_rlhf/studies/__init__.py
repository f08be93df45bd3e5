"""The scaling lab: each study of the two papers this project implements as one command
(`megatron-rlhf study NAME|all`).

- :mod:`.recipe`: the typed study recipe (model and data sizes, steps, seeds); tiny on CPU by
  default, ``--quick`` shrinks it to smoke size, a YAML file sizes it up;
- :mod:`.trend`: pure functions that turn arm results into a trend line and a verdict against the
  paper's claim ("holds" / "does not hold" / "inconclusive", with the numbers);
- :mod:`.runner`: the shared runner (one result file per arm marks it done, so a rerun resumes);
- :mod:`.report`: Markdown table, PNG plot and JSON of one study;
- :mod:`.math_candidates`: labelled math responses (outcome and step labels) for reward studies;
- :mod:`.reward_studies` and :mod:`.rl_studies`: the studies, thin compositions of the existing
  trainers (``train_reward_model``, ``run_rl``) and evaluations (Best-of-N, held-out accuracy).

Nothing here is imported by ``import megatron_rlhf``; heavy libraries are imported inside the
functions that run a study.
"""
