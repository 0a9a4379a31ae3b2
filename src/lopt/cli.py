"""The `lopt` command. Subcommands map one-to-one onto recipes."""

from __future__ import annotations

import sys

from lopt.errors import LoptError

USAGE = """usage: lopt <command> [flags]

commands:
  sft     supervised fine-tuning, --method lopt (local learning, default) or e2e
  demo    a short LoPT SFT of the embedded SmolLM2-135M with a before/after answer
  bench   activation memory and step time of E2E vs LoPT (local and joint backward)

`lopt <command> --help` lists a command's flags."""


def _sft(argv: list[str]) -> None:
    from lopt.config import SFTConfig, parse_config
    from lopt.training.sft import console, run_sft

    config = parse_config(argv, SFTConfig, prog="lopt sft", description="Supervised fine-tuning (E2E or LoPT).")
    result = run_sft(config)
    console.print(
        f"done: {result.steps} steps in {result.elapsed_s:.1f} s, task loss {result.first_loss:.4f} -> "
        f"{result.last_loss:.4f}; model saved to {result.output_dir}"
    )


def _demo(argv: list[str]) -> None:
    from lopt.demo import main as demo_main

    demo_main(argv)


def _bench(argv: list[str]) -> None:
    from lopt.bench import main as bench_main

    bench_main(argv)


COMMANDS = {"sft": _sft, "demo": _demo, "bench": _bench}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"lopt: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        COMMANDS[command](rest)
    except LoptError as exc:
        print(f"lopt {command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
