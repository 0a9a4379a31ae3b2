"""Writing run outputs so that a kill mid-write never leaves something that looks complete.

A checkpoint is complete when it holds `training_state.pt`, and that file is always written last.
The SFT loop builds a checkpoint in a temporary sibling folder, fsyncs it, and renames it into place
(`save_training_checkpoint`: every process's part, through the parallel backend, then `save_checkpoint`).
TRL (GRPO, DPO) writes `checkpoint-N/` in place, file by file; `mark_complete` then fsyncs what is
there and adds `training_state.pt` atomically, so a folder a kill interrupted has none. The final
model goes into `--output_dir` itself (the Hugging Face convention), file by file, with
its config (`config.json`, or a LoRA folder's `adapter_config.json`) moved last: a folder that has a
config has its weights. A second signal between making a save's `.tmp-*` folder and writing into it
leaves that folder behind; the next run in it removes it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from lopt.errors import LoptError
from lopt.parallel import distributed
from lopt.parallel.backend import ParallelBackend
from lopt.runs import TRAINING_STATE
from lopt.training.rng import gather_rng_states

MODEL_CONFIGS = ("config.json", "adapter_config.json")  # a full model's, a LoRA adapter folder's
TEMP_PREFIX = ".tmp-"  # the folders a save builds in; one a second signal interrupted is left empty


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            _fsync_file(path)
    _fsync_dir(folder)


def _usual_permissions(folder: Path) -> None:
    """Give every file the mode the user's umask gives new files: a library that writes through a private
    temporary file (transformers' model.safetensors) leaves it 0600, unreadable to the user's group."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def new_temp_folder(parent: Path) -> Path:
    """A fresh hidden folder in `parent` to build something in before renaming it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint should be readable like any other folder
    return tmp


def _build_in_temp(parent: Path, write: Callable[[Path], None], tmp: Path | None = None) -> Path:
    tmp = tmp or new_temp_folder(parent)
    try:
        write(tmp)
        _usual_permissions(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def save_checkpoint(
    output_dir: Path, step: int, model, tokenizer, training_state: dict, started: Path | None = None
) -> Path:
    """Write `checkpoint-<step>/`: the plain HF model and tokenizer, plus the state needed to resume.

    `started` is a `new_temp_folder` other processes have already written their parts into (DeepSpeed).
    """

    def write(folder: Path) -> None:
        model.save_pretrained(folder, tokenizer)
        torch.save(training_state, folder / TRAINING_STATE)

    final = output_dir / f"checkpoint-{step}"
    tmp = _build_in_temp(output_dir, write, started)
    if final.exists():  # only a re-run with --overwrite_output_dir gets here
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def save_training_checkpoint(
    output_dir: Path,
    step: int,
    backend: ParallelBackend,
    model,
    optimizer: torch.optim.Optimizer,
    tokenizer,
    loop_state: dict,
    keep: int | None,
    best: Path | None,
) -> Path | None:
    """Write `checkpoint-<step>/` of a plain loop, resumable: the model, the aux heads, the optimizer, every process's
    RNG, the backend's state and `loop_state` (the loop's own: data position, schedule, ...); then prune to the newest
    `keep` but never `best` (`prune_checkpoints`). Every process takes part: gathering is a collective under FSDP and
    ZeRO-3, and under DeepSpeed each process writes its optimizer partition into the folder. The main process
    returns the checkpoint, the others None."""
    rng = gather_rng_states()
    full = backend.full_state(model, optimizer)
    main_process = distributed.is_main_process()
    folder = distributed.broadcast_from_main(new_temp_folder(output_dir) if main_process else None)
    backend.save_state(folder)
    saved = None
    if main_process:
        state = {
            "step": step, **loop_state, "aux_heads": full.aux_heads, "optimizer": full.optimizer, "rng": rng,
            **backend.state_dict(),
        }  # fmt: skip
        saved = save_checkpoint(output_dir, step, full.model, tokenizer, state, folder)
        prune_checkpoints(output_dir, keep, best)
    distributed.barrier()
    return saved


def mark_complete(folder: Path, training_state: dict) -> None:
    """Complete a checkpoint that was written in place: fsync its files, then add `training_state.pt`.

    The state goes to a temporary name first and is renamed, so a kill while writing it leaves no
    truncated `training_state.pt` that would pass for a complete checkpoint.
    """
    _usual_permissions(folder)
    _fsync_tree(folder)
    tmp = folder / f".{TRAINING_STATE}.tmp"
    torch.save(training_state, tmp)
    _fsync_file(tmp)
    os.replace(tmp, folder / TRAINING_STATE)
    _fsync_dir(folder)


def save_final_model(output_dir: Path, model, tokenizer) -> None:
    tmp = _build_in_temp(output_dir, lambda folder: model.save_pretrained(folder, tokenizer))
    files = sorted(tmp.iterdir(), key=lambda p: p.name in MODEL_CONFIGS)  # the config last
    for path in files:
        target = output_dir / path.name
        if target.is_dir():  # a folder of the same name from the run this one resumed: replaced, as files are
            shutil.rmtree(target)
        os.replace(path, target)
    tmp.rmdir()


def has_final_model(output_dir: Path) -> bool:
    """Whether `output_dir` holds a finished run's model (or adapter): its config (moved last) and weights."""
    weights = [*output_dir.glob("*.safetensors"), *output_dir.glob("pytorch_model*.bin")]
    return any((output_dir / name).is_file() for name in MODEL_CONFIGS) and bool(weights)


def leftover_temp_folders(output_dir: Path) -> list[Path]:
    """The folders saves were building in when a run was stopped: lopt's, never a user's files."""
    return sorted(path for path in output_dir.glob(f"{TEMP_PREFIX}*") if path.is_dir())


def load_training_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / TRAINING_STATE, map_location="cpu", weights_only=False)


def _step_of(path: Path) -> int | None:
    """N for a folder named checkpoint-N, else None."""
    prefix, _, suffix = path.name.partition("-")
    return int(suffix) if prefix == "checkpoint" and suffix.isdigit() else None


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints in `output_dir`, oldest first."""
    found = []
    for path in output_dir.glob("checkpoint-*"):
        step = _step_of(path)
        if step is not None and (path / TRAINING_STATE).is_file():
            found.append((step, path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint in `output_dir`, or None."""
    found = _checkpoints(output_dir)
    return found[-1][1] if found else None


def find_checkpoint(output_dir: Path, spec: str) -> Path:
    """`latest` -> the newest complete checkpoint in `output_dir`; otherwise the given folder."""
    if spec == "latest":
        latest = latest_checkpoint(output_dir)
        if latest is None:
            raise LoptError(
                f"--resume_from_checkpoint latest: no checkpoint-N/ with {TRAINING_STATE} in {output_dir}. "
                "Start without --resume_from_checkpoint, or pass the folder of a checkpoint."
            )
        return latest
    path = Path(spec)
    if path.is_dir() and _step_of(path) is not None and not (path / TRAINING_STATE).is_file():
        newest = latest_checkpoint(path.parent)
        instead = (
            f"Pass {newest} (the newest complete one) or 'latest'"
            if newest
            else "No complete checkpoint is next to it: start the run again without --resume_from_checkpoint"
        )
        raise LoptError(
            f"--resume_from_checkpoint {spec}: this checkpoint is incomplete (it has no {TRAINING_STATE}, which is "
            f"written last; the run was stopped while saving it). {instead}."
        )
    if not (path / TRAINING_STATE).is_file():
        raise LoptError(
            f"--resume_from_checkpoint {spec}: not a lopt checkpoint (expected a checkpoint-N folder with "
            f"{TRAINING_STATE}). Pass one, or 'latest' to take the newest in --output_dir."
        )
    return path


def prune_checkpoints(output_dir: Path, keep: int | None, best: Path | None = None) -> None:
    """Delete all but the newest `keep` checkpoints (--save_total_limit), and never `best`: the checkpoint
    --load_best_model_at_end will restore (as transformers keeps it)."""
    if keep is None:
        return
    for _, path in _checkpoints(output_dir)[:-keep]:
        if best is None or path.resolve() != best.resolve():
            shutil.rmtree(path)


def check_writable(output_dir: Path, model) -> None:
    """Fail before training, not after hours of it, when the final model cannot be written."""
    probe = output_dir / ".lopt-write-test"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise LoptError(
            f"--output_dir {output_dir} is not writable ({exc.strerror}). Pass a folder you can write."
        ) from exc
    weights = sum(p.numel() * p.element_size() for p in model.model.parameters())
    free = shutil.disk_usage(output_dir).free
    if free < 1.1 * weights:
        raise LoptError(
            f"--output_dir {output_dir} has {free / 2**30:.2f} GiB free; the final model alone needs "
            f"{weights / 2**30:.2f} GiB (each checkpoint about 3x that with the optimizer state). Free space or "
            "pass another --output_dir."
        )
