"""Best-of-N, reward-model classification metrics, diversity metrics, run reports, and the
ability-dimension evaluation of public benchmarks (:mod:`.ability`, the `eval` command)."""
