"""`lopt bench`'s figures from the records: ratios to `e2e`, the equal-memory pairs, the budgets, and the tables
printed to the terminal."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from lopt.tools.bench.measure import Record

# Wide enough for the whole table when printed to a file or a CI log (rich assumes 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 150)


def add_ratios(records: list[Record]) -> None:
    for r in records:
        e2e = next((x for x in records if x.method == "e2e" and (x.batch, x.seq) == (r.batch, r.seq)), None)
        if e2e is None:
            continue
        r.device_peak_ratio = r.device_peak_bytes / e2e.device_peak_bytes
        r.step_time_ratio = r.step_s / e2e.step_s
        if r.accounted:
            r.activation_ratio = r.activation_bytes / e2e.activation_bytes
            r.gradients_activations_ratio = r.gradients_activations_peak_bytes / e2e.gradients_activations_peak_bytes
            r.whole_step_ratio = r.whole_step_bytes / e2e.whole_step_bytes


# The LoPT configurations set against E2E with checkpointing at equal memory.
EQUAL_MEMORY_METHODS = ("lopt", "lopt+bs", "lopt+bs+8bit")


def equal_memory_pairs(records: list[Record]) -> list[dict]:
    """LoPT without checkpointing (plain, with block steps, and with 8-bit state too) against E2E with
    checkpointing, at each batch shape.

    Checkpointing buys memory with recomputation. Where LoPT's accounted step stays within E2E+ckpt's, LoPT gets
    that memory without the recomputation, and the step-time ratio at the same batch says what that buys; the
    largest batch LoPT fits in E2E+ckpt's memory says what else it could do with it.
    """
    pairs = []
    for r in records:
        ckpt = next((x for x in records if x.method == "e2e+ckpt" and (x.batch, x.seq) == (r.batch, r.seq)), None)
        if r.method not in EQUAL_MEMORY_METHODS or ckpt is None:
            continue
        pairs.append(
            {
                "method": r.method,
                "k": r.k,
                "batch": r.batch,
                "seq": r.seq,
                "lopt_whole_step_bytes": r.whole_step_bytes,
                "e2e_ckpt_whole_step_bytes": ckpt.whole_step_bytes,
                "fits_e2e_ckpt_memory": r.whole_step_bytes <= ckpt.whole_step_bytes,
                "largest_batch_in_e2e_ckpt_memory": r.largest_batch(ckpt.whole_step_bytes),
                "lopt_device_peak_bytes": r.device_peak_bytes,
                "e2e_ckpt_device_peak_bytes": ckpt.device_peak_bytes,
                "lopt_activation_bytes": r.activation_bytes,
                "e2e_ckpt_activation_bytes": ckpt.activation_bytes,
                "step_time_ratio": r.step_s / ckpt.step_s,
            }
        )
    return pairs


def fits(records: list[Record], budgets_gib: list[float]) -> list[dict]:
    """Per accounted configuration and sequence length: the largest micro-batch whose step fits in each budget."""
    return [
        {
            "config": r.label, "seq": r.seq,
            "activation_bytes_per_sample": r.activation_bytes_per_sample,
            "largest_batch": {f"{b:g}": r.largest_batch(b * 2**30) for b in budgets_gib},
        }
        for r in records
        if r.accounted
    ]  # fmt: skip


def print_tables(records: list[Record], losses: list[dict], pairs: list[dict], budgets: list[dict]) -> None:
    table = Table(title="lopt bench: one training step (forward + backward + optimizer step)")
    peak_kind = "device peak MiB" if records[0].device_peak_kind == "cuda_max_allocated" else "process peak RSS MiB"
    for column in (
        "config",
        "batch x seq",
        "activation MiB",
        "x e2e",
        peak_kind,
        "x e2e",
        "step s",
        "x e2e",
        "tokens/s",
        "trainable M",
        "optimizer state MiB",
        "last step's loss",
    ):
        table.add_column(column, justify="right")
    for r in records:
        table.add_row(
            r.label,
            f"{r.batch} x {r.seq}",
            f"{r.activation_bytes / 2**20:.1f}" if r.accounted else "-",
            _ratio(r.activation_ratio),
            f"{r.device_peak_bytes / 2**20:.0f}",
            _ratio(r.device_peak_ratio),
            f"{r.step_s:.3f}",
            _ratio(r.step_time_ratio),
            f"{r.tokens_per_s:.0f}",
            f"{r.trainable_params / 1e6:.2f}",
            f"{r.optimizer_state_bytes / 2**20:.1f}" if r.accounted else "-",
            f"{r.final_loss:.4f}",
        )
    console.print(table)
    accounting = Table(title="the whole step, accounted (deterministic MiB): parameters + optimizer state + the peak "
                       "of gradients and activations alive together")  # fmt: skip
    for column in ("config", "parameters", "optimizer state", "gradient peak", "activation peak", "grads + acts peak",
                   "x e2e", "whole step", "x e2e"):  # fmt: skip
        accounting.add_column(column, justify="right")
    for r in (r for r in records if r.accounted):
        accounting.add_row(
            r.label, *(f"{b / 2**20:.1f}" for b in (
                r.parameter_bytes, r.optimizer_state_bytes, r.gradient_peak_bytes, r.activation_bytes,
                r.gradients_activations_peak_bytes)),
            _ratio(r.gradients_activations_ratio), f"{r.whole_step_bytes / 2**20:.1f}", _ratio(r.whole_step_ratio),
        )  # fmt: skip
    console.print(accounting)
    if budgets:
        print_budgets(budgets)
    loss_table = Table(title="the loss alone: saved-for-backward bytes")
    with_liger = "liger" in losses[0]
    for column in ("batch x seq", "vocab", "full fp32 logits MiB", "chunked MiB", "reduction") + (
        ("liger MiB",) if with_liger else ()
    ):
        loss_table.add_column(column, justify="right")
    for r in losses:
        loss_table.add_row(
            f"{r['batch']} x {r['seq']}",
            str(r["vocab"]),
            f"{r['full_logits'] / 2**20:.1f}",
            f"{r['chunked'] / 2**20:.1f}",
            f"{r['reduction']:.1f}x",
            *((f"{r['liger'] / 2**20:.1f}",) if with_liger else ()),
        )
    console.print(loss_table)
    for trl in (r for r in records if r.method == "trl-sft"):
        e2e = next(r for r in records if r.method == "e2e" and (r.batch, r.seq) == (trl.batch, trl.seq))
        console.print(
            f"lopt e2e vs TRL SFTTrainer at {e2e.batch} x {e2e.seq}: step time {e2e.step_s / trl.step_s:.2f}x, "
            f"{peak_kind} {e2e.device_peak_bytes / trl.device_peak_bytes:.2f}x, last step's loss "
            f"{e2e.final_loss:.4f} vs {trl.final_loss:.4f}"
        )
    if not pairs:
        return
    pair_table = Table(title="equal memory: LoPT without checkpointing vs E2E with checkpointing (accounted MiB)")
    for column in (
        "config",
        "batch x seq",
        "lopt whole step",
        "e2e+ckpt whole step",
        "within e2e+ckpt memory",
        "largest batch in it",
        f"lopt {peak_kind}",
        f"e2e+ckpt {peak_kind}",
        "step s lopt / e2e+ckpt",
    ):
        pair_table.add_column(column, justify="right")
    for p in pairs:
        extra = (p["lopt_whole_step_bytes"] - p["e2e_ckpt_whole_step_bytes"]) / 2**20
        pair_table.add_row(
            f"{p['method']} k={p['k']}",
            f"{p['batch']} x {p['seq']}",
            f"{p['lopt_whole_step_bytes'] / 2**20:.0f}",
            f"{p['e2e_ckpt_whole_step_bytes'] / 2**20:.0f}",
            "yes" if p["fits_e2e_ckpt_memory"] else f"no (+{extra:.0f} MiB)",
            str(p["largest_batch_in_e2e_ckpt_memory"]),
            f"{p['lopt_device_peak_bytes'] / 2**20:.0f}",
            f"{p['e2e_ckpt_device_peak_bytes'] / 2**20:.0f}",
            f"{p['step_time_ratio']:.2f}",
        )
    console.print(pair_table)


def print_budgets(rows: list[dict]) -> None:
    budgets = list(rows[0]["largest_batch"])
    table = Table(title="the largest micro-batch whose accounted step fits in B GiB (a lower bound from two measured "
                  "batches: the step grows per sample by at most the activations' growth)")  # fmt: skip
    for column in ("config", "seq", "activation MiB per sample", *(f"{b} GiB" for b in budgets)):
        table.add_column(column, justify="left" if column == "config" else "right")
    for r in rows:
        table.add_row(
            r["config"], str(r["seq"]), f"{r['activation_bytes_per_sample'] / 2**20:.1f}",
            *(str(r["largest_batch"][b]) for b in budgets),
        )  # fmt: skip
    console.print(table)


def print_packing(rows: list[dict]) -> None:
    first = rows[0]
    table = Table(
        title=f"--packing: one training pass over {first['examples']} examples, batch {first['batch']}, "
        f"--max_seq_length {first['seq']}"
    )
    for column in ("config", "data", "rows", "steps", "padding", "pass s", "real tokens/s", "x unpacked"):
        table.add_column(column, justify="left" if column in ("config", "data") else "right")
    for r in rows:
        table.add_row(
            r["method"], r["variant"], str(r["rows"]), str(r["steps"]), f"{r['padding_share']:.1%}",
            f"{r['pass_s']:.2f}", f"{r['real_tokens_per_s']:.0f}", _ratio(r["tokens_per_s_ratio"]),
        )  # fmt: skip
    console.print(table)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
