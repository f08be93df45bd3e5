"""Convert a Hugging Face checkpoint into a Megatron distributed checkpoint at a given TP/PP/EP layout.

Usage: `python checkpoints_tools/hf_to_megatron.py --help`. Same as `megatron-rlhf convert-hf`; starts the
processes it needs itself. Works from a source checkout without installing the package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_rlhf.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert-hf", *sys.argv[1:]]))
