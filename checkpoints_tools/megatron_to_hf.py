"""Write a Megatron distributed checkpoint (any saved layout) as a Hugging Face directory.

Usage: `python checkpoints_tools/megatron_to_hf.py --help`. Same as `megatron-rlhf export-hf`; starts the
processes it needs itself. Works from a source checkout without installing the package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_rlhf.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export-hf", *sys.argv[1:]]))
