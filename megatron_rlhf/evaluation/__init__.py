"""Best-of-N, reward-model classification metrics, diversity metrics and run reports."""
