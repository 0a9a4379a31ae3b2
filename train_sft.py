#!/usr/bin/env python
"""The reference implementation's SFT entry point, kept so its documented commands run unchanged.

It is `lopt sft` with the same flags (`python train_sft.py --method ll --num_blocks 2 ...`) and the
reference's defaults where lopt's differ: a cosine schedule with 3% warm-up, `--max_samples` drawn
after a seeded shuffle, and its plain-text prompts for Alpaca and prompt/completion records
(`python train_sft.py --help` lists them; any flag overrides them).
"""

import sys

from lopt.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]], reference=True))
