"""`python -m lopt.tools.bench`: the command, and the subprocess each configuration is measured in (--child)."""

from lopt.tools.bench.cli import main

main()
