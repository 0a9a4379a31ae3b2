"""`--report_to`: Trackio, TensorBoard and wandb get every metric of the contract and the run's config, read back
from their own files (SFT through lopt's listeners, DPO through transformers' integrations); bad names and
missing libraries are named. Nothing here reaches the network: wandb runs offline, Trackio writes a local database.
"""

from __future__ import annotations

import importlib
import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
from trl import DPOConfig as TRLDPOConfig

from lopt.config import DPOConfig, SFTConfig, parse_config, report_to
from lopt.errors import LoptError
from lopt.recipes.dpo import run_dpo
from lopt.recipes.sft import run_sft
from lopt.recipes.trl.arguments import trl_arguments
from lopt.training import trackers
from lopt.training.metrics import StepMetrics
from lopt.training.trackers import parse_report_to, tracker_callbacks, tracker_names, tracker_scalars
from test_dpo import dpo_flags
from tiny_data import sft_args

# The scalars every logged step must show, by metrics.jsonl field (aux_loss, block_grad_norm: one per block,
# added below).
SCALARS = {
    "task_loss": "train/lopt/task_loss",
    "lr": "train/lopt/lr",
    "lr_k1": "train/lopt/lr_k1",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "tokens_per_s": "train/lopt/tokens_per_s",
    "peak_mem_bytes": "train/lopt/peak_mem_bytes",
    "activation_peak_bytes": "train/lopt/activation_peak_bytes",
    "elapsed_s": "train/lopt/elapsed_s",
}


@pytest.fixture(autouse=True)
def offline(tmp_path_factory, monkeypatch):
    """Every tracker local: wandb offline with its settings and cache in a temporary folder, no Trackio Space or
    server (Trackio's database is the session's temporary one: conftest.py sets TRACKIO_DIR before imports)."""
    home = tmp_path_factory.getbasetemp() / "tracker-home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    for name in ("WANDB_DIR", "WANDB_PROJECT", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def with_report_to(config, report_to: str):
    config.report_to = report_to  # the lead's RunConfig field; set here until it exists
    return config


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_scalars(row: dict) -> dict[str, float]:
    values = {name: row[field] for field, name in SCALARS.items() if row[field] is not None}
    values.update({f"train/lopt/aux_loss_block_{i + 1}": loss for i, loss in enumerate(row["aux_loss"])})
    norms = row.get("block_grad_norm") or []  # null where the recipe does not report them
    values.update({f"train/lopt/grad_norm_block_{i + 1}": norm for i, norm in enumerate(norms)})
    return values


def tensorboard_events(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [folder] = (out / "runs").iterdir()  # one launch, one folder
    events = EventAccumulator(str(folder))
    events.Reload()
    return events


def tensorboard_values(events, name: str, step: int) -> list[float]:
    """The values of scalar `name` at `step`, once each (the end-of-training summary repeats the last epoch);
    TensorBoard keeps them in float32."""
    return sorted({event.value for event in events.Scalars(name) if event.step == step})


def tensorboard_text(events, tag: str) -> str:
    return events.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()


def config_from_text(text: str) -> dict:
    return json.loads(text.removeprefix("```json\n").removesuffix("\n```"))


def wandb_records(out: Path) -> list:
    """The records of the offline run in `<out>/wandb/` (wandb's LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    [path] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the rest of a block is padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(out: Path) -> tuple[dict, list[dict], str]:
    """(config, history rows, project) of the offline run in `<out>/wandb/`."""
    config, history, project = {}, [], None
    for record in wandb_records(out):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            project = record.run.project
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.append(row)
    return config, history, project


def trackio_run(project: str, run_prefix: str) -> tuple[dict, list[dict]]:
    from trackio.sqlite_storage import SQLiteStorage

    [run] = [name for name in SQLiteStorage.get_runs(project) if name.startswith(run_prefix)]
    return SQLiteStorage.get_run_config(project, run), SQLiteStorage.get_logs(project, run)


def sft_config(model_dir, train_file, out, *extra) -> SFTConfig:
    flags = ["--max_steps", "3", "--logging_steps", "1", "--save_steps", "0", "--num_blocks", "3", *extra]
    return parse_config(sft_args(model_dir, train_file, out, *flags), SFTConfig)


def test_report_to_names_are_checked():
    assert parse_report_to(None) == parse_report_to("none") == parse_report_to(" ") == []
    assert parse_report_to("tensorboard, wandb,tensorboard") == ["tensorboard", "wandb"]
    with pytest.raises(LoptError) as error:
        parse_report_to("tensorbord")
    message = str(error.value)
    assert "unknown --report_to tracker 'tensorbord'. Did you mean 'tensorboard'?" in message
    assert all(f"  {name}:" in message for name in ("none", "trackio", "tensorboard", "wandb"))
    with pytest.raises(LoptError, match="'none' cannot be combined"):
        parse_report_to("none,wandb")


def test_a_missing_tracker_library_names_the_extra(monkeypatch, tmp_path):
    def find_spec(name):
        return None if name == "wandb" else importlib.util.find_spec(name)

    monkeypatch.setattr(report_to, "importlib", SimpleNamespace(util=SimpleNamespace(find_spec=find_spec)))
    config = DPOConfig(output_dir=str(tmp_path / "run"))
    for call in (
        lambda: parse_report_to("tensorboard,wandb"),
        lambda: tracker_callbacks("wandb", config),
        lambda: trl_arguments(TRLDPOConfig, with_report_to(config, "trackio,wandb")),
    ):
        with pytest.raises(LoptError) as error:
            call()
        assert str(error.value) == (
            "--report_to wandb: wandb is not installed. Install the trackers with: pip install 'lopt[tracking]'"
        )

    # installed but broken: the import error, and the same fix
    def broken(name):
        raise ImportError("broken")

    monkeypatch.setattr(trackers, "importlib", SimpleNamespace(util=importlib.util, import_module=broken))
    with pytest.raises(LoptError, match=r"importing trackio failed \(broken\).*pip install 'lopt\[tracking\]'"):
        tracker_callbacks("trackio", config)


def test_trl_arguments_pass_report_to_with_lopt_names(tmp_path):
    config = DPOConfig(output_dir=str(tmp_path / "runs" / "dpo-lopt"))
    assert trl_arguments(TRLDPOConfig, config).report_to == []  # no field yet: none
    args = trl_arguments(TRLDPOConfig, with_report_to(config, "trackio,tensorboard"))
    assert args.report_to == ["trackio", "tensorboard"]
    assert args.project == "runs" and args.run_name.startswith("dpo-lopt-")
    assert tracker_names(tmp_path / "a b" / "x.y")[0] == "a-b"


def test_tracker_scalars_name_every_contract_field():
    metrics = StepMetrics(
        step=3, epoch=0.5, task_loss=1.5, aux_loss=[0.25, None], lr=1e-3, lr_k1=2e-3, grad_norm=None,
        tokens_per_s=10.0, peak_mem_bytes=7, activation_peak_bytes=5, elapsed_s=1.25, recipe={"reward": 0.75},
    )  # fmt: skip
    assert tracker_scalars(metrics) == {
        "train/epoch": 0.5,
        "train/lopt/task_loss": 1.5,
        "train/lopt/aux_loss_block_1": 0.25,  # block 2's is missing (None): left out, as grad_norm
        "train/lopt/lr": 1e-3,
        "train/lopt/lr_k1": 2e-3,
        "train/lopt/tokens_per_s": 10.0,
        "train/lopt/peak_mem_bytes": 7,
        "train/lopt/activation_peak_bytes": 5,
        "train/lopt/elapsed_s": 1.25,
        "train/reward": 0.75,
    }


def test_sft_reports_every_metric_and_the_config_to_tensorboard_and_trackio(model_dir, train_file, tmp_path):
    out = tmp_path / "sft-lopt"
    config = sft_config(model_dir, train_file, out, "--lr_k1", "5e-4")
    run_sft(config, callbacks=tracker_callbacks("tensorboard,trackio", config))
    rows = jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3] and all(len(row["aux_loss"]) == 2 for row in rows)

    events = tensorboard_events(out)
    for row in rows:
        for name, value in expected_scalars(row).items():
            assert tensorboard_values(events, name, row["step"]) == pytest.approx([value], rel=1e-6), name
    assert set(events.Tags()["scalars"]) == set(expected_scalars(rows[0]))
    assert config_from_text(tensorboard_text(events, "lopt_config")) == config.to_json()

    project, _ = tracker_names(out)
    values, logs = trackio_run(project, "sft-lopt-")
    assert {k: v for k, v in values.items() if not k.startswith("_")} == config.to_json()
    assert [log["step"] for log in logs] == [1, 2, 3]  # Trackio's own step is the optimizer step
    for row, log in zip(rows, logs, strict=True):
        assert log["train/global_step"] == row["step"]
        assert {name: log[name] for name in expected_scalars(row)} == expected_scalars(row)


def test_sft_with_wandb_writes_an_offline_run_with_the_config(model_dir, train_file, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")  # lopt's default: offline
    out = tmp_path / "sft-wandb"
    config = sft_config(model_dir, train_file, out)
    run_sft(config, callbacks=tracker_callbacks("wandb", config))
    rows = jsonl(out / "metrics.jsonl")
    values, history, project = wandb_run(out)
    assert project == tracker_names(out)[0]
    assert {k: v for k, v in values.items() if not k.startswith("_")} == config.to_json()
    assert len(history) == len(rows)
    for row, logged in zip(rows, history, strict=True):
        assert logged["train/global_step"] == row["step"]
        assert {name: logged[name] for name in expected_scalars(row)} == pytest.approx(expected_scalars(row))


def test_dpo_reports_lopt_metrics_through_transformers_integrations(model_dir, tmp_path):
    out = tmp_path / "dpo-lopt"
    flags = dpo_flags(model_dir, out, "--max_steps", "2", "--num_blocks", "3", "--lr_k1", "5e-4")
    config = with_report_to(parse_config(flags, DPOConfig, prog="lopt dpo"), "tensorboard,trackio,wandb")
    run_dpo(config)
    rows = jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2] and all(len(row["aux_loss"]) == 2 for row in rows)
    assert rows[0]["lr_k1"] == 5e-4 and rows[0]["activation_peak_bytes"] > 0

    # TensorBoard, through transformers' TensorBoardCallback: the contract next to TRL's own metrics
    events = tensorboard_events(out)
    for row in rows:
        for name, value in expected_scalars(row).items():
            assert tensorboard_values(events, name, row["step"]) == pytest.approx([value], rel=1e-6), name
    assert {"train/loss", "train/rewards/accuracies", "train/learning_rate"} <= set(events.Tags()["scalars"])
    assert config_from_text(tensorboard_text(events, "lopt_config")) == config.to_json()
    assert json.loads(tensorboard_text(events, "args"))["beta"] == config.beta  # TRL's arguments, as transformers logs

    # Trackio, through transformers' TrackioCallback: lopt's config wins over TRL's arguments of the same name
    project, _ = tracker_names(out)
    values, logs = trackio_run(project, "dpo-lopt-")
    assert {k: values[k] for k in config.to_json()} == config.to_json() and "loss_type" in values
    logged = [log for log in logs if "train/lopt/task_loss" in log]
    assert [log["train/global_step"] for log in logged] == [1, 2]
    for row, log in zip(rows, logged, strict=True):
        assert {name: log[name] for name in expected_scalars(row)} == pytest.approx(expected_scalars(row))

    # wandb, through transformers' WandbCallback, offline in <out>/wandb/ (not ./wandb)
    values, history, _ = wandb_run(out)
    assert {k: values[k] for k in config.to_json()} == config.to_json()
    logged = [row for row in history if "train/lopt/task_loss" in row]
    for row, log in zip(rows, logged, strict=True):
        assert {name: log[name] for name in expected_scalars(row)} == pytest.approx(expected_scalars(row))
    assert not Path("wandb").exists() or not any(Path("wandb").glob("*run-*"))
