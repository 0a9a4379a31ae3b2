#!/usr/bin/env python
"""The reference implementation's SFT entry point, kept so its documented commands run unchanged.

It is `lopt sft` with the same flags: `python train_sft.py --method ll --num_blocks 2 ...`.
"""

import sys

from lopt.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
