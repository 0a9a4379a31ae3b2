"""A non-empty --output_dir: what the refusal says for each kind of folder, and leftover `.tmp-*` save folders.

The folders are built by hand with tiny stand-in files (the checks read names, not contents); the end-to-end
test makes the folders with real `lopt sft` runs and follows the advice the refusal gives.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lopt.cli import main
from lopt.config import SFTConfig, parse_config
from lopt.errors import LoptError
from lopt.training.checkpoint import TRAINING_STATE
from lopt.training.run import prepare_output_dir
from tiny_data import sft_args


def config(out: Path, *flags: str) -> SFTConfig:
    return parse_config(["--output_dir", str(out), *flags], SFTConfig)


def refusal(out: Path) -> str:
    with pytest.raises(LoptError) as refused:
        prepare_output_dir(config(out))
    return str(refused.value)


def write(folder: Path, *names: str) -> Path:
    """Tiny stand-ins for a run's files; a name with a slash is made in its subfolder."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")
    return folder


def interrupted_run(out: Path, *checkpoints: str) -> Path:
    """What a stopped run leaves: its arguments and metrics, the given checkpoint files, no final model."""
    return write(out, "training_args.json", "metrics.jsonl", *checkpoints)


def finished_run(out: Path) -> Path:
    return write(
        interrupted_run(out, f"checkpoint-2/{TRAINING_STATE}"), "model.safetensors", "tokenizer.json", "config.json"
    )


def test_a_finished_run_is_named_with_a_new_folder_overwrite_or_training_its_model_further(tmp_path):
    message = refusal(finished_run(tmp_path / "run"))
    assert "holds a finished run" in message and "config.json" in message and "model.safetensors" in message
    assert "new --output_dir" in message and "--overwrite_output_dir" in message
    assert f"--model_name_or_path {tmp_path / 'run'}" in message  # its final model is a model to start from
    assert "--resume_from_checkpoint" not in message  # the old hint, which led to "no checkpoint" on a run without one
    adapter_run = write(interrupted_run(tmp_path / "lora"), "adapter_model.safetensors", "adapter_config.json")
    assert "holds a finished run" in refusal(adapter_run)  # a --use_peft run's final adapter


def test_an_interrupted_run_with_a_complete_checkpoint_offers_to_resume_from_it(tmp_path):
    # checkpoint-4 was being saved when the run was killed: not complete, so not the one to resume from.
    out = interrupted_run(tmp_path / "run", f"checkpoint-2/{TRAINING_STATE}", "checkpoint-4/model.safetensors")
    write(out, "model.safetensors")  # the final save was stopped before config.json, which it moves last
    message = refusal(out)
    assert "interrupted run" in message and "newest complete checkpoint is checkpoint-2/" in message
    assert f"--resume_from_checkpoint latest to continue it from {out / 'checkpoint-2'}" in message
    assert "new --output_dir" in message and "--overwrite_output_dir" in message
    assert prepare_output_dir(config(out, "--resume_from_checkpoint", "latest")) == out  # the advice is taken


def test_an_interrupted_run_without_a_complete_checkpoint_is_not_offered_a_resume(tmp_path):
    out = interrupted_run(tmp_path / "run", "checkpoint-4/model.safetensors")
    message = refusal(out)
    assert "interrupted run" in message and "checkpoint-4/" in message and "nothing to resume" in message
    assert "--resume_from_checkpoint latest" not in message
    assert "new --output_dir" in message and "--overwrite_output_dir" in message
    assert prepare_output_dir(config(out, "--overwrite_output_dir")) == out


def test_other_files_are_listed_and_not_called_a_run(tmp_path):
    out = write(tmp_path / "mine", *(f"notes-{i}.txt" for i in range(8)))
    message = refusal(out)
    assert "not empty and holds no lopt run" in message and "notes-0.txt" in message and "and 2 more" in message
    assert "--resume_from_checkpoint" not in message and "--overwrite_output_dir" in message


def test_leftover_save_folders_do_not_count_and_are_removed_when_a_run_starts(tmp_path, capsys):
    out = tmp_path / "run"
    (out / ".tmp-a1b2").mkdir(parents=True)  # a second Ctrl-C during a save leaves it empty
    write(out, ".tmp-c3d4/model.safetensors")  # a kill while writing leaves a part
    assert prepare_output_dir(config(out)) == out  # not "not empty": nothing in it is anyone's file
    assert list(out.iterdir()) == []
    err = capsys.readouterr().err
    assert "removed .tmp-a1b2/, .tmp-c3d4/" in err and "half-built" in err


def test_leftover_save_folders_stay_out_of_a_refusal_and_are_kept_until_a_run_starts(tmp_path, capsys):
    out = finished_run(tmp_path / "run")
    (out / ".tmp-a1b2").mkdir()
    assert ".tmp" not in refusal(out)
    assert (out / ".tmp-a1b2").is_dir()  # refused: nothing started, nothing removed
    prepare_output_dir(config(out, "--overwrite_output_dir"))
    assert not (out / ".tmp-a1b2").exists() and "removed .tmp-a1b2/" in capsys.readouterr().err


def test_lopt_sft_into_a_used_folder_says_what_is_there_and_its_advice_works(model_dir, train_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    flags = sft_args(model_dir, train_file, out, "--max_steps", "2", "--save_steps", "1")
    assert main(["sft", *flags]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["sft", *flags]) == 2
    err = capsys.readouterr().err
    assert "lopt sft: error: --output_dir" in err and "holds a finished run" in err
    assert "--resume_from_checkpoint" not in err and "--overwrite_output_dir" in err
    (out / "config.json").unlink()  # as if the run had been killed while saving its final model
    assert main(["sft", *flags]) == 2
    err = capsys.readouterr().err
    assert "interrupted run" in err and "--resume_from_checkpoint latest to continue it from" in err
    assert str(out / "checkpoint-1") in err  # the last step is saved as the final model, not as a checkpoint
    assert main(["sft", *flags, "--max_steps", "3", "--resume_from_checkpoint", "latest"]) == 0
    assert "resumed from" in capsys.readouterr().err and (out / "config.json").is_file()
