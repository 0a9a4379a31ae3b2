#!/usr/bin/env python
"""The reference implementation's GRPO entry point, kept so its documented commands run unchanged.

It is `lopt grpo` with the same flags (`python train_grpo.py --method ll --num_blocks 2 --task gsm8k ...`)
and the reference's defaults where lopt's differ: a cosine schedule with 3% warm-up and `--max_samples`
drawn after a seeded shuffle (`python train_grpo.py --help` lists them; any flag overrides them).
"""

import sys

from lopt.cli import main

if __name__ == "__main__":
    sys.exit(main(["grpo", *sys.argv[1:]], reference=True))
