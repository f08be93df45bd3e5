"""Run a Megatron checkpoint at its saved layout and the HF model on the same random batch; print max_abs_logit_diff=<value> last and exit 1 above tolerance.

Usage: `python checkpoints_tools/verify.py --help`. Same as `megatron-rlhf verify`; starts the
processes it needs itself. Works from a source checkout without installing the package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_rlhf.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["verify", *sys.argv[1:]]))
