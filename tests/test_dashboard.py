"""The terminal dashboard: panels drawn from fabricated runs, the live listener's queue and terminal
handling, `lopt watch` following run folders (also in a real terminal, through tmux)."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import shutil
import sys
import threading
import types
from pathlib import Path

import pytest
from rich.console import Console

from lopt import runs
from lopt.config import DPOConfig, GRPOConfig, SFTConfig
from lopt.dashboard import hardware, watch
from lopt.dashboard.follow import JsonlFollower
from lopt.dashboard.hardware import NO_GPU, HardwareSample, HardwareSampler
from lopt.dashboard.live import Dashboard, tui_enabled
from lopt.dashboard.panels import (
    DashboardView,
    bars,
    by_step,
    events_panel,
    hardware_panel,
    progress_panel,
    rl_panel,
    run_panel,
    summary,
    training_panel,
)
from lopt.dashboard.state import DashboardState, Series, StudyRun
from lopt.errors import LoptError
from lopt.training.callbacks import Callbacks, MetricsFile, RunInfo
from lopt.training.metrics import StepMetrics
from terminal import Terminal
from tiny_models import tiny_model_dir

MiB = 2**20
SPARK = set("▁▂▃▄▅▆▇█")


def run_info(out: Path, recipe: str = "sft", method: str = "lopt") -> RunInfo:
    blocks = [range(0, 15), range(15, 30)] if method == "lopt" else [range(0, 30)]
    return RunInfo(
        recipe=recipe, method=method, blocks=blocks, backward="local", total_steps=100, start_step=0,
        output_dir=out, world_size=2, backend="FSDP2", details={"examples": 1000, "skipped_truncated": 3},
    )  # fmt: skip


def step_metrics(step: int, recipe: str = "sft", method: str = "lopt", elapsed_per_step: float = 2.0) -> StepMetrics:
    columns = {
        "sft": {},
        "grpo": {"reward": 0.2 + step / 100, "reward_std": 0.3, "completion_length": 143.0, "step_time_s": 2.0},
        "dpo": {"reward_accuracy": 0.75, "reward_margin": 0.42, "reward_chosen": 0.3, "reward_rejected": -0.12},
    }[recipe]
    return StepMetrics(
        step=step, epoch=step / 100, task_loss=2.5 * math.exp(-step / 40) + 0.8,
        aux_loss=[0.3 * math.exp(-step / 30) + 0.02] if method == "lopt" else [], lr=2e-5, lr_k1=1e-5,
        grad_norm=1.25, tokens_per_s=1234.5, peak_mem_bytes=(3072 if method == "e2e" else 2048) * MiB,
        activation_peak_bytes=(800 if method == "e2e" else 420) * MiB, elapsed_s=step * elapsed_per_step,
        recipe=columns,
    )  # fmt: skip


def completion_row(step: int, index: int) -> dict:
    return {
        "step": step,
        "prompt": "What is 12 + 30?\nAnswer with a number.",
        "completion": f"12 + 30 = {41 + index}.\nThe answer is {41 + index}.",
        "rewards": {"accuracy": float(index == 1), "format": 0.5},
        "reward": float(index == 1) + 0.25,
    }


def state_after(steps: int, recipe: str = "sft", method: str = "lopt") -> DashboardState:
    """A run's state after `steps` steps, logged every second step."""
    state = DashboardState.for_run(run_info(Path("out"), recipe, method))
    state.args = {"model_name_or_path": "smollm2-135m", "dataset_preset": "gsm-symbolic"}
    for step in range(2, steps + 1, 2):
        state.record_step(step, step_metrics(step, recipe, method).task_loss)
        state.record_metrics(step_metrics(step, recipe, method))
    return state


def text_of(renderable, width: int = 120, height: int | None = None) -> str:
    console = Console(record=True, width=width, height=height or 25, color_system=None)
    console.print(renderable, height=height)
    return console.export_text()


def write_run(folder: Path, recipe="sft", method="lopt", steps=60, max_steps=100, final=False, layers=30) -> None:
    """A run folder as lopt leaves it: training_args.json, metrics.jsonl, a checkpoint, completions (GRPO)."""
    folder.mkdir(parents=True, exist_ok=True)
    args = {"model_name_or_path": "smollm2-135m", "method": method, "num_blocks": 2, "backward": "local",
            "max_steps": max_steps, "num_train_epochs": 1.0, "output_dir": str(folder)}  # fmt: skip
    args.update(
        {
            "sft": {"dataset_preset": "gsm-symbolic", "max_seq_length": 256, "liger": False},
            "grpo": {"task": "gsm-symbolic", "num_generations": 4, "max_prompt_length": 512, "use_vllm": False},
            "dpo": {"dataset_preset": "gsm-symbolic-pairs", "beta": 0.1, "loss_type": "sigmoid", "max_seq_length": 512},
        }[recipe]
    )
    (folder / "training_args.json").write_text(json.dumps(args))
    rows = [step_metrics(step, recipe, method).to_json() for step in range(2, steps + 1, 2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    checkpoint = folder / "checkpoint-40"
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    (checkpoint / "training_state.pt").write_text("")
    if recipe == "grpo":
        lines = [json.dumps(completion_row(step, i)) for step in range(1, steps + 1) for i in range(4)]
        (folder / "completions.jsonl").write_text("\n".join(lines) + "\n")
    if final:
        (folder / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))


# Charts and state.


def test_bars_draw_sparklines_and_curves_with_block_characters():
    assert bars([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]) == ["▁▂▃▄▅▆▇█"]
    assert bars([2.0, 2.0, 2.0]) == ["▄▄▄"]  # a flat series sits at half height
    assert bars([0.0, None, 1.0]) == ["▁ █"]
    tall = bars([0.0, 1.0], height=2)
    assert tall == [" █", "▁█"]  # top row first
    # by step: a run at step 50 of 100 fills half the columns; the rest is not trained yet
    columns = by_step([(step, float(step)) for step in range(1, 51)], 10, 1, 100)
    assert all(value is not None for value in columns[:5]) and columns[5:] == [None] * 5


def test_series_stays_bounded_and_rewinds_to_a_resumed_step():
    series = Series(capacity=8)
    for step in range(1, 101):
        series.put(step, float(step))
    assert len(series.points) <= 8 and series.points[-1][0] == 100  # the whole run, coarser
    series.put(97, -1.0)  # a resumed run retrains from 97: its value replaces 97 and later
    assert series.points[-1] == (97, -1.0) and all(step < 97 for step, _ in series.points[:-1])


def test_state_treats_a_repeated_step_as_a_resumed_run():
    state = state_after(20)
    state.record_metrics(step_metrics(12))
    assert state.metrics.step == 12 and state.task_loss.points[-1][0] == 12
    assert any("resumed" in event.text for event in state.events)


# Panels.


def test_run_panel_shows_model_method_block_ranges_data_and_processes():
    text = text_of(run_panel(state_after(10)))
    assert "smollm2-135m" in text and "LoPT · k=2 · local backward" in text
    assert "layers 0-14 | 15-29" in text
    assert "gsm-symbolic · 1,000 examples · 3 skipped truncated" in text
    assert "2 · FSDP2" in text and "out" in text
    assert "E2E (end-to-end, one block)" in text_of(run_panel(state_after(10, method="e2e")))


def test_progress_panel_shows_steps_epoch_eta_speed_and_the_study():
    state = state_after(40)
    state.study = [StudyRun("e2e", "done"), StudyRun("lopt-k2", "training"), StudyRun("lopt-k4", "pending")]
    text = text_of(progress_panel(state))
    assert "40 / 100" in text and "0.40" in text
    assert "0:01:20" in text and "ETA 0:02:00" in text  # 2 s per step, 60 steps left
    assert "1,234 tokens/s" in text and "2.00 s/step" in text
    assert "✓ e2e" in text and "● lopt-k2" in text and "○ lopt-k4" in text


def test_training_panel_shows_each_loss_with_a_sparkline_rates_and_what_e2e_would_need():
    state = state_after(40)
    state.e2e_activation_bytes = 840 * MiB
    lines = text_of(training_panel(state)).splitlines()
    task = next(line for line in lines if "task loss · block 2" in line)
    recon = next(line for line in lines if "recon loss · block 1" in line)
    assert f"{step_metrics(40).task_loss:.4f}" in task and SPARK & set(task)
    assert f"{step_metrics(40).aux_loss[0]:.4f}" in recon and SPARK & set(recon)
    text = "\n".join(lines)
    assert "2.00e-05" in text and "lr_k1 1.00e-05" in text and "1.250" in text
    assert "420.0 MiB" in text and "840.0 MiB" in text and "50% of it" in text


def test_grpo_panel_shows_rewards_per_function_means_and_the_latest_completions():
    state = state_after(10, recipe="grpo")
    for step in (9, 10):
        for index in range(4):
            state.record_completion(completion_row(step, index))
    text = text_of(rl_panel(state), width=140)
    assert "reward mean" in text and "0.300" in text and "reward std" in text
    assert "accuracy" in text and "0.250" in text and "format" in text and "0.500" in text  # step 10's 4 completions
    assert "143" in text and "12 + 30 = 42. The answer is 42." in text and "1.25" in text  # newlines flattened


def test_dpo_panel_shows_reward_accuracy_and_margin():
    text = text_of(rl_panel(state_after(10, recipe="dpo")))
    assert "reward accuracy" in text and "75%" in text and "reward margin" in text and "0.420" in text
    assert "0.300 / -0.120" in text
    assert rl_panel(state_after(10)) is None  # SFT has no rewards panel


def test_hardware_panel_says_no_gpu_on_cpu_and_names_nvidia_ml_py_when_cuda_has_no_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` fails, as when it is not installed
    monkeypatch.setattr(hardware, "cuda_visible", lambda: False)
    state = state_after(4)
    state.record_hardware(HardwareSampler().sample())
    text = text_of(hardware_panel(state))
    assert "CPU" in text and "RSS" in text and NO_GPU in text and "2.0 GiB" in text
    monkeypatch.setattr(hardware, "cuda_visible", lambda: True)
    state.record_hardware(HardwareSampler(process=False).sample())
    assert "pip install nvidia-ml-py" in text_of(hardware_panel(state), width=160)


def test_hardware_panel_shows_each_gpu_through_nvml(monkeypatch):
    class NVMLError(Exception):
        pass

    fake = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda index: index, nvmlDeviceGetName=lambda handle: b"NVIDIA H100",
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(used=(handle + 1) * 10 * 2**30, total=80 * 2**30),
        nvmlDeviceGetUtilizationRates=lambda handle: types.SimpleNamespace(gpu=87),
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    state = state_after(4)
    sampler = HardwareSampler(process=False)
    state.record_hardware(sampler.sample())
    sampler.close()
    text = text_of(hardware_panel(state), width=140)
    assert "GPU 0" in text and "GPU 1" in text and "NVIDIA H100: 10.0 GiB / 80.0 GiB  util 87%" in text
    assert "20.0 GiB / 80.0 GiB" in text and NO_GPU not in text


def test_events_panel_and_the_full_view_fit_the_height_they_are_given():
    state = state_after(30)
    for i in range(40):
        state.record_event("WARNING", f"warning number {i}")
    state.record_checkpoint(Path("out/checkpoint-30"))
    assert "warning number 39" in text_of(events_panel(state)) and "warning number 20" not in text_of(
        events_panel(state)
    )
    screen = text_of(DashboardView(state), width=160, height=48)
    assert len(screen.splitlines()) == 48
    assert "checkpoint saved: out/checkpoint-30" in screen and "task loss by step" in screen
    for title in ("run · sft", "progress", "training", "hardware", "events"):
        assert title in screen
    state.hardware = HardwareSample(cpu_percent=1.0, rss_bytes=100 * MiB, gpu_note=NO_GPU)
    assert "no GPU" in text_of(DashboardView(state), width=160)


def test_summary_holds_the_final_numbers_and_the_last_events():
    state = state_after(100)
    state.record_event("stderr", "lopt: stopped after step 100; Resume with the same command plus ...")
    state.end(100)
    text = text_of(summary(state))
    assert "finished 100 steps" in text and f"{step_metrics(100).task_loss:.4f}" in text
    assert "2.0 GiB" in text and "Resume with the same command" in text


# The live dashboard.


def test_dashboard_drops_updates_when_its_queue_is_full_and_metrics_still_reach_metrics_jsonl(tmp_path):
    metrics_file = MetricsFile()
    dashboard = Dashboard(io.StringIO(), queue_size=4)
    callbacks = Callbacks([metrics_file, dashboard])
    run = run_info(tmp_path)
    metrics_file.on_train_begin(run)  # the dashboard is not started: nothing drains its queue

    def train():
        for step in range(1, 101):
            callbacks.on_step_end(step, 1.0)
            callbacks.on_log(step_metrics(step))

    loop = threading.Thread(target=train)
    loop.start()
    loop.join(timeout=5)
    assert not loop.is_alive()  # a full queue never blocks the training loop
    metrics_file.on_train_end(100)
    assert dashboard.updates.qsize() == 4 and dashboard.dropped == 196
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 101))
    # the summary has the last step's numbers, though its update was dropped
    dashboard.start()
    dashboard.on_train_end(100)
    assert f"{step_metrics(100).task_loss:.4f}" in dashboard.console.file.getvalue()


def test_dashboard_on_a_stream_that_is_not_a_terminal_takes_no_screen(tmp_path):
    stream = io.StringIO()
    stdout, stderr = sys.stdout, sys.stderr
    dashboard = Dashboard(stream)
    dashboard.on_train_begin(run_info(tmp_path))
    assert sys.stdout is stdout and sys.stderr is stderr  # nothing captured: there is no screen to protect
    dashboard.on_log(step_metrics(2))
    dashboard.on_train_end(2)
    dashboard.on_train_end(2)  # stopping twice is harmless
    assert "\x1b[?1049h" not in stream.getvalue()  # never switched to the full screen
    assert "stopped at step 2 of 100" in stream.getvalue()  # only the summary


def test_dashboard_on_a_terminal_draws_full_screen_shows_the_process_output_and_restores_all(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # room for the temporary folder's path in the summary
    stream = io.StringIO()
    stdout, stderr = sys.stdout, sys.stderr
    root_handlers = list(logging.getLogger().handlers)
    terminal_logger = logging.getLogger("lopt.test_dashboard.terminal")
    terminal_logger.propagate = False
    terminal_handler = logging.StreamHandler(sys.stderr)
    terminal_logger.addHandler(terminal_handler)
    (tmp_path / "training_args.json").write_text(json.dumps({"model_name_or_path": "tiny-model"}))
    logging.getLogger("lopt.test_dashboard").setLevel(logging.INFO)  # the dashboard's level filters, not the logger's
    dashboard = Dashboard(stream, force_terminal=True, refresh_per_second=50)
    try:
        dashboard.on_train_begin(run_info(tmp_path))
        assert sys.stdout is not stdout and terminal_handler not in terminal_logger.handlers
        print("a line printed during training")
        print("a line on stderr", file=sys.stderr)
        logging.getLogger("lopt.test_dashboard").warning("a logged warning")
        logging.getLogger("lopt.test_dashboard").info("an info line below the level")
        terminal_logger.error("an error from a logger that does not propagate")
        for step in range(1, 5):
            dashboard.on_step_end(step, 2.0 / step)
        dashboard.on_log(step_metrics(4))
        dashboard.on_save(tmp_path / "checkpoint-4")
    finally:
        dashboard.on_train_end(4)
        restored = terminal_handler in terminal_logger.handlers
        terminal_logger.removeHandler(terminal_handler)
        logging.getLogger("lopt.test_dashboard").setLevel(logging.NOTSET)
    assert sys.stdout is stdout and sys.stderr is stderr
    assert logging.getLogger().handlers == root_handlers and restored
    output = stream.getvalue()
    assert "\x1b[?1049h" in output and "\x1b[?1049l" in output  # entered and left the full screen
    assert "tiny-model" in output  # a frame was drawn, with the run's training_args.json read
    after = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", output.rsplit("\x1b[?1049l", 1)[1])  # what stays: the summary
    assert "stopped at step 4 of 100" in after and "checkpoints: 1" in after
    events = [(event.kind, event.text) for event in dashboard.state.events]
    assert ("stdout", "a line printed during training") in events and ("stderr", "a line on stderr") in events
    assert ("WARNING", "lopt.test_dashboard: a logged warning") in events
    assert ("ERROR", "lopt.test_dashboard.terminal: an error from a logger that does not propagate") in events
    assert not any("below the level" in text for _, text in events)


def test_dashboard_gives_the_terminal_back_when_training_raises(tmp_path):
    stream, stdout = io.StringIO(), sys.stdout
    dashboard = Dashboard(stream, force_terminal=True)
    with pytest.raises(RuntimeError, match="step failed"):
        dashboard.on_train_begin(run_info(tmp_path))
        try:
            raise RuntimeError("step failed")
        finally:  # as the recipes call it
            dashboard.on_train_end(0)
    assert sys.stdout is stdout and stream.getvalue().count("\x1b[?1049l") == 1
    assert dashboard.stop() is False  # already stopped


def test_tui_enabled_follows_the_flag_or_lopt_tui_and_needs_a_terminal(monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("LOPT_TUI", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert tui_enabled(None, Terminal()) is False and tui_enabled(True, Terminal()) is True
    monkeypatch.setenv("LOPT_TUI", "1")
    assert tui_enabled(None, Terminal()) is True and tui_enabled(False, Terminal()) is False
    assert capsys.readouterr().err == ""
    assert tui_enabled(None, io.StringIO()) is False
    assert "not a terminal" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    assert tui_enabled(True, Terminal()) is False and capsys.readouterr().err == ""  # only rank 0 draws


# Following run files.


def test_follower_keeps_a_truncated_last_line_until_its_newline_arrives(tmp_path):
    path = tmp_path / "metrics.jsonl"
    follower = JsonlFollower(path)
    assert follower.read_new() == []  # not written yet
    rows = [step_metrics(step).to_json() for step in range(1, 41)]
    lines = "".join(json.dumps(row) + "\n" for row in rows).encode()
    cuts = [0, 7, len(lines) // 3, len(lines) // 3 + 1, len(lines) - 5, len(lines)]
    read = []

    def write():
        with path.open("ab") as file:
            for start, end in zip(cuts, cuts[1:], strict=False):
                file.write(lines[start:end])
                file.flush()
                written.set()
                more.wait(timeout=5)
                more.clear()

    written, more = threading.Event(), threading.Event()
    writer = threading.Thread(target=write)
    writer.start()
    for _ in cuts[1:]:
        written.wait(timeout=5)
        written.clear()
        read += follower.read_new()  # mid-line reads return only the complete lines
        more.set()
    writer.join(timeout=5)
    assert read == rows and follower.unreadable_lines == 0
    path.write_text(json.dumps(rows[0]) + "\n")  # started afresh (a new run in the folder)
    assert follower.read_new() == [rows[0]]


def test_watch_once_prints_the_panels_of_a_finished_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    write_run(tmp_path / "grpo-run", recipe="grpo", steps=100, final=True)
    watch.main([str(tmp_path / "grpo-run"), "--once"])
    out = capsys.readouterr().out
    assert "lopt grpo" in out and "finished" in out and "100 / 100" in out
    assert "layers 0-14 | 15-29" in out and "smollm2-135m" in out and "gsm-symbolic" in out
    assert "reward mean" in out and "latest completions" in out and "The answer is 42." in out
    assert "task loss by step" in out and "reward by step" in out and "checkpoint saved" in out


def test_watch_follows_a_folder_while_a_thread_writes_it(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    followed = watch.RunFolder(folder)
    assert followed.poll().run is None and "no run files yet" in text_of(DashboardView(followed.state))
    (folder / "training_args.json").write_text(json.dumps({"method": "lopt", "num_blocks": 2, "max_steps": 20}))
    lines = "".join(json.dumps(step_metrics(step).to_json()) + "\n" for step in range(1, 21)).encode()
    half = len(lines) // 2 + 3  # mid-way through a line

    def write(chunk: bytes):
        with (folder / "metrics.jsonl").open("ab") as file:
            file.write(chunk)

    for chunk in (lines[:half], lines[half:]):
        writer = threading.Thread(target=write, args=(chunk,))
        writer.start()
        writer.join(timeout=5)
        state = followed.poll()
        assert [step for step, _ in state.task_loss.points] == list(range(1, state.step + 1))
    assert state.step == 20 and state.run.recipe == "sft" and state.run.total_steps == 20
    assert not state.finished
    write(b'not json\n{"step": 21}\n')  # neither is a row of the contract: skipped and said so
    assert followed.poll().step == 20
    assert state.events[-1].kind == "WARNING" and "2 lines" in state.events[-1].text


def test_watch_replaces_the_steps_a_resumed_run_retrained(tmp_path):
    folder = tmp_path / "run"
    write_run(folder, steps=30)
    followed = watch.RunFolder(folder)
    assert followed.poll().step == 30
    with (folder / "metrics.jsonl").open("a") as file:  # resumed from checkpoint-20: steps 22.. again
        for step in range(22, 41, 2):
            file.write(json.dumps(step_metrics(step, elapsed_per_step=1.0).to_json()) + "\n")
    state = followed.poll()
    steps = [step for step, _ in state.task_loss.points]
    assert steps == list(range(2, 41, 2)) and state.step == 40
    assert state.seconds_per_step() == pytest.approx(1.0)  # this launch's speed, not the first one's


def test_watch_shows_several_runs_side_by_side(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    write_run(tmp_path / "e2e", method="e2e", steps=100, final=True)
    write_run(tmp_path / "lopt", steps=60)
    (tmp_path / "empty").mkdir()
    watch.main([str(tmp_path / name) for name in ("e2e", "lopt", "empty")] + ["--once"])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "e2e" in line and "lopt" in line and "empty" in line)
    assert header.index("e2e") < header.index("lopt") < header.index("empty")  # one column per run
    assert "E2E (end-to-end, one block)" in out and "LoPT · k=2 · local backward" in out
    assert "3.0 GiB" in out and "2.0 GiB" in out and "800.0 MiB" in out and "420.0 MiB" in out
    assert "baseline" in out and "52% of E2E" in out and "no run files yet" in out
    assert "█" in out and "100 / 100  finished" in out and "60 / 100" in out


def test_watch_tells_the_recipe_from_the_metrics_columns_or_the_training_args():
    for name, config in (("sft", SFTConfig), ("grpo", GRPOConfig), ("dpo", DPOConfig)):
        assert runs.recipe_of(config(output_dir="out").to_json(), None) == name
        assert runs.recipe_of({}, step_metrics(2, recipe=name).to_json()) == name
    assert watch.step_metrics({"step": 1}) is None  # a row missing fields is not a step


def test_watch_says_what_is_wrong_with_its_arguments(tmp_path):
    with pytest.raises(LoptError, match="does not exist; pass a run's --output_dir"):
        watch.main([str(tmp_path / "missing"), "--once"])
    with pytest.raises(LoptError, match="--interval 0.0: must be a positive number"):
        watch.main([str(tmp_path), "--interval", "0"])
    with pytest.raises(LoptError, match="pass --once"):
        watch.main([str(tmp_path)])  # pytest's stdout is not a terminal


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed: it provides the real terminal")
def test_watch_in_a_real_terminal_draws_the_panels_and_ctrl_c_gives_the_shell_back(tmp_path):
    write_run(tmp_path / "run", steps=40, layers=12)
    terminal = Terminal("watch")
    try:
        terminal.type(
            f"{sys.executable} -m lopt.dashboard.watch {tmp_path / 'run'} --interval 0.2; echo watch-exit-$?", "Enter"
        )
        terminal.wait_for("task loss by step", "layers 0-5 | 6-11", "40 / 100", "checkpoint saved")
        terminal.type("C-c")
        shown = terminal.wait_for("watch-exit-0")
        assert "task loss by step" not in shown  # the full screen is gone: the shell's own screen is back
        assert shown.rstrip().splitlines()[-1] == "ready$"
    finally:
        terminal.close()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed: it provides the real terminal")
def test_sft_tui_in_a_real_terminal_draws_the_run_and_ctrl_c_saves_and_gives_the_terminal_back(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "What is 1 + 1?", "input": "", "output": "2"}\n' * 64)
    out = tmp_path / "run"
    command = (
        f"{sys.executable} -m lopt.cli sft --model_name_or_path {model} --train_file {data} --output_dir {out} "
        "--max_steps 100000 --per_device_train_batch_size 2 --max_seq_length 64 --logging_steps 2 --save_steps 0 "
        "--tui; echo sft-exit-$?"
    )
    terminal = Terminal("sft")
    try:
        terminal.type(command, "Enter")
        terminal.wait_for("task loss by step", "LoPT · k=2 · local backward", "layers 0-1 | 2-3", "no GPU", seconds=60)
        terminal.wait_for("recon loss · block 1", seconds=30)
        terminal.type("C-c")
        shown = terminal.wait_for("sft-exit-130", seconds=60)
        assert "task loss by step" not in shown  # the full screen is gone; the summary stays
        assert "--resume_from_checkpoint" in shown.replace("\n", "").replace("│", "").replace(" ", "")
        assert "SIGINT received" in shown and shown.rstrip().splitlines()[-1] == "ready$"
        assert list(out.glob("checkpoint-*/training_state.pt"))  # the step in flight was saved
    finally:
        terminal.close()
