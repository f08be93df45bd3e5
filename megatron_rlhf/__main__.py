"""`python -m megatron_rlhf ...`: the same as the `megatron-rlhf` command."""

import sys

from megatron_rlhf.cli import main

if __name__ == "__main__":
    sys.exit(main())
