"""Publishing a model folder on the Hugging Face hub: lopt's model card, `lopt push` and `--push_to_hub`.

`lopt push DIR --hub_model_id ORG/NAME` uploads a model folder (a run's --output_dir with a full model or a
LoRA adapter, a checkpoint-N folder, any folder saved with save_pretrained) through huggingface_hub:
`HfApi.create_repo(exist_ok=True)`, then `upload_folder`. `--push_to_hub --hub_model_id ORG/NAME` on
`lopt sft|grpo|dpo` does the same with the final model at the end of a successful run, on the main process.
--hub_model_id is required: lopt does not make a repository name up from the folder's. NAME alone creates the
repository under the token's account, as huggingface_hub does.

Every run writes lopt's model card into its final folder when it finishes, and `lopt push` writes it again
before uploading (eval.json may have come since): YAML front matter for the hub (base_model, library_name,
tags, datasets, pipeline_tag), then the base model, the method, LoRA settings, data, steps, the final metrics
(metrics.jsonl), the evaluation (eval.json) and how to load the model. It is read from the files the run left
(lopt.runs), so a run made on another machine is described the same way. The CLI adds `Publisher` to every
training run's listeners: it checks the hub flags before training and publishes once the final model is saved.

The card is README.md, the page the hub shows, when there is none or when the one there was generated: by lopt
(it carries CARD_MARKER) or by TRL or peft (their trainers and save_pretrained write one into the folder, which
names no base model for lopt's runs). A README.md someone wrote is never replaced: it is uploaded as it is, and
lopt's card goes next to it as MODEL_CARD.md (delete README.md to make lopt's card the repository's page).

The token is --hub_token, else what huggingface_hub finds itself: HF_TOKEN, else the `hf auth login` one;
HF_ENDPOINT points huggingface_hub at another hub. Not uploaded: checkpoint-N/ folders (resume state),
unfinished saves and the trackers' local folders (runs/, wandb/).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from lopt.errors import LoptError
from lopt.models.lora import ADAPTER_CONFIG, is_adapter_folder
from lopt.output import console, phase
from lopt.recipes.registry import recipe_record
from lopt.runs import METHODS, Run, is_run_folder, load_run
from lopt.training.callbacks import Callback

README, MODEL_CARD = "README.md", "MODEL_CARD.md"
CARD_MARKER = (
    "<!-- lopt model card: lopt rewrites this file from the run's files; delete this line to keep your edits -->"
)
# Lines that only the cards TRL's trainers and peft's save_pretrained generate contain.
GENERATED_BY = (
    "It has been trained using [TRL](https://github.com/huggingface/trl).",
    "### Framework versions\n\n- PEFT ",
)
HUB_FLAGS = ("hub_model_id", "hub_private_repo", "hub_token")
DEFAULT_MESSAGE = "Upload model with lopt"
LOGIN = (
    "log in with `hf auth login` (`huggingface-cli login` before huggingface_hub 1.0), set HF_TOKEN, or pass "
    "--hub_token; the token needs write access"
)


def check_push_flags(config) -> None:
    """--push_to_hub and the --hub_* flags of a run, checked before anything loads (by config.validate)."""
    if not config.push_to_hub:
        given = [f"--{name}" for name in HUB_FLAGS if name in config.explicit and getattr(config, name)]
        if given:
            raise LoptError(
                f"{', '.join(given)} configure the upload at the end of the run; add --push_to_hub, or drop them."
            )
        return
    if not config.hub_model_id:
        raise LoptError(
            "--push_to_hub needs --hub_model_id ORG/NAME: the hub repository to create or update (lopt does not make "
            "one up from --output_dir)."
        )
    check_hub_access(config.hub_model_id, config.hub_token)


def check_hub_access(repo_id: str, token: str | None) -> None:
    """What can be checked without the network, before a run trains or a folder uploads: the repository id,
    offline mode, a token."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from lopt.models.registry import _hub_offline

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise LoptError(
            f"--hub_model_id {repo_id!r} is not a hub repository id ({error}). Pass ORG/NAME, or NAME for one under "
            "your account."
        ) from None
    if _hub_offline():
        raise LoptError(
            "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so huggingface_hub will not reach the hub; unset it to "
            "upload."
        )
    if not (token or get_token()):
        raise LoptError(f"no Hugging Face token found: {LOGIN}.")


def check_model_folder(folder: Path) -> None:
    from lopt.training.checkpoint import has_final_model

    if not folder.is_dir():
        raise LoptError(
            f"DIR {folder}: no such folder; pass a run's --output_dir or a folder saved with save_pretrained."
        )
    if not has_final_model(folder):
        raise LoptError(
            f"DIR {folder} holds no model: expected config.json (a full model) or {ADAPTER_CONFIG} (a LoRA adapter) "
            "with .safetensors or .bin weights. Pass the --output_dir of a finished run (an unfinished one has only "
            "checkpoint-N folders, which can be pushed themselves), or a folder saved with save_pretrained."
        )


class Publisher(Callback):
    """The listener that publishes a training run: made before training, it checks the hub flags (the repository
    id, offline mode, a token), so a wrong one fails before hours of training; once the final model is saved (on the
    main process), it writes lopt's card into the folder and, with --push_to_hub, uploads the folder."""

    def __init__(self, config):
        check_push_flags(config)
        self.config = config

    def on_model_saved(self, folder: Path) -> None:
        config = self.config
        if config.push_to_hub:
            push_folder(
                folder, config.hub_model_id, private=config.hub_private_repo, token=config.hub_token, after_run=True
            )
        else:
            _say_where(write_model_card(folder, str(folder)))


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    after_run: bool = False,
) -> str:
    """Create (or find) `repo_id` on the hub, write lopt's card into `folder` and upload the folder; returns the
    repository's URL. `after_run`: the errors say how to upload the saved model later."""
    from huggingface_hub import HfApi

    from lopt.training.checkpoint import TEMP_PREFIX

    check_model_folder(folder)
    check_hub_access(repo_id, token)
    api = HfApi(token=token)
    retry = f"lopt push {folder} --hub_model_id {repo_id}{' --private' if private else ''}"
    with _hub_errors(api, repo_id, folder, retry if after_run else None):
        with phase(f"creating or finding {repo_id} on {api.endpoint}"):
            # not private: None, the hub's default (public, unless the organization makes new repositories private)
            repo = api.create_repo(repo_id, private=private or None, exist_ok=True)
        _say_where(write_model_card(folder, repo.repo_id))  # the full id: NAME alone gets the account's namespace
        console.print(f"uploading {folder} to {repo.repo_id}")
        api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=folder,
            commit_message=commit_message or DEFAULT_MESSAGE,
            ignore_patterns=["checkpoint-*/", f"{TEMP_PREFIX}*/", "runs/", "wandb/"],
        )
    console.print(f"pushed {folder} to {repo.url}")
    return str(repo.url)


@contextmanager
def _hub_errors(api, repo_id: str, folder: Path, retry: str | None) -> Iterator[None]:
    """huggingface_hub's failures as LoptErrors that say what to do; `retry`: the command that uploads a run's saved
    model later."""
    from huggingface_hub.errors import HfHubHTTPError

    # the base error of the HTTP client huggingface_hub uses (httpx's, or httpx2's in newer releases), under which
    # it raises a failed connection as it is
    client_error = HfHubHTTPError.__bases__[0]

    later = f" The model is saved in {folder}: upload it with `{retry}`." if retry else ""
    try:
        yield
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise LoptError(
                f"the hub did not accept the token (not logged in, or it expired): {LOGIN}.{later}"
            ) from None
        if status == 403:
            raise LoptError(
                f"the token may not create or write {repo_id} (403 Forbidden): use a token with write access to "
                f"{repo_id.split('/')[0] if '/' in repo_id else 'your account'}, or a repository under your account."
                f"{later}"
            ) from None
        message = str(error).splitlines()[0]
        raise LoptError(f"the hub refused the upload to {repo_id}: {message}.{later}") from None
    except ValueError as error:
        if not str(error).startswith("Invalid metadata in README.md"):
            raise
        raise LoptError(
            f"the hub rejected the metadata of {folder / README}: {' '.join(str(error).splitlines()[1:])}. Edit the "
            "file, and delete its lopt comment line so that lopt uploads it as it is instead of writing it again."
        ) from None
    except client_error as error:
        raise LoptError(
            f"could not reach the hub at {api.endpoint} ({error}); check the connection, or HF_ENDPOINT.{later}"
        ) from None


def _say_where(card: Path) -> None:
    if card.name == MODEL_CARD:
        console.print(
            f"{card.parent / README} was not written by lopt, so it stays as it is; lopt's model card is {card} "
            f"(delete {README} to make the card the model's page)"
        )


# ---- the model card ----------------------------------------------------------------------------------------


def is_generated(readme: str) -> bool:
    """Whether a README.md was generated (by lopt, TRL or peft) rather than written by someone."""
    return CARD_MARKER in readme or any(line in readme for line in GENERATED_BY)


def write_model_card(folder: Path, repo_id: str) -> Path:
    """Write lopt's card for `folder`, loaded as `repo_id`, into README.md, or into MODEL_CARD.md when README.md is
    someone's own; returns the file written."""
    readme = folder / README
    if readme.is_file() and not is_generated(readme.read_text(errors="replace")):
        target = folder / MODEL_CARD
    else:
        target = readme
        earlier = folder / MODEL_CARD
        if earlier.is_file() and CARD_MARKER in earlier.read_text(errors="replace"):
            earlier.unlink()  # written while the folder had someone's README.md, which is gone: the card moves
    target.write_text(model_card(folder, repo_id))
    return target


def model_card(folder: Path, repo_id: str) -> str:
    """lopt's card for the model in `folder`, loaded as `repo_id` (a hub id, or the folder itself)."""
    run = load_run(folder) if is_run_folder(folder) else Run(name=folder.name)
    args = run.args
    adapter = json.loads((folder / ADAPTER_CONFIG).read_text()) if is_adapter_folder(folder) else None
    recipe = recipe_record(run.recipe)
    base = args.get("model_name_or_path") or (adapter or {}).get("base_model_name_or_path")
    base_id = _hub_model_id(base)
    local_learning = METHODS.get(args.get("method", "")) == "lopt"
    dataset_id, data = _data(args, recipe)
    tags = ["lopt", *(["local-learning"] if local_learning else []), *([recipe.name] if recipe else [])]
    tags += ["lora"] if adapter is not None or args.get("use_peft") else []
    front = {
        "base_model": base_id,
        "library_name": "peft" if adapter is not None else "transformers",
        "pipeline_tag": "text-classification" if recipe and recipe.scores else "text-generation",
        "tags": tags,
        "datasets": [dataset_id] if dataset_id else None,
    }
    lines = [
        "---",
        yaml.safe_dump({key: value for key, value in front.items() if value is not None}, sort_keys=False).strip(),
        "---",
        CARD_MARKER,
        "",
        f"# {repo_id}",
        "",
        f"{'A LoRA adapter' if adapter is not None else 'A causal language model'} trained with lopt"
        + (f" ({recipe.summary})" if recipe else "")
        + ".",
        "",
        "## Training",
        "",
        f"- Base model: {_base_text(base, base_id)}",
    ]
    if args:
        lines += [f"- Method: {_method(folder, args)}"]
        if args.get("kl_beta"):
            lines += [f"- KL to the starting model: beta {args['kl_beta']}"]
        lines += [f"- LoRA: {_lora(args, adapter, run)}"] if adapter is not None or args.get("use_peft") else []
        lines += [f"- Data: {data}", f"- Steps: {_steps(args, run)}"]
    else:
        lines += [f"- LoRA: {_lora({}, adapter, run)}"] if adapter is not None else []
        lines += ["- The folder holds no training_args.json, so how it was trained is not recorded here."]
    results = _results(run)
    if results:
        lines += ["", "## Results", "", *results]
    lines += [
        "",
        "## Use",
        "",
        *(_reward_usage(repo_id) if recipe and recipe.scores else _usage(repo_id, adapter, base, base_id)),
    ]
    return "\n".join(lines) + "\n"


def _hub_model_id(name: str | None) -> str | None:
    """The hub id a recorded model name stands for (aliases resolved); None for a local folder."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from lopt.models.registry import ALIASES, EMBEDDED, EMBEDDED_HUB_ID

    if not name:
        return None
    target = ALIASES.get(name.lower(), name)
    if target == EMBEDDED:
        return EMBEDDED_HUB_ID
    if "/" not in target or Path(target).expanduser().exists():
        return None
    try:
        validate_repo_id(target)
    except HFValidationError:  # a path on another machine
        return None
    return target


def _base_text(base: str | None, base_id: str | None) -> str:
    from lopt.models.registry import ALIASES, EMBEDDED

    if base is None:
        return "not recorded"
    if ALIASES.get(base.lower()) == EMBEDDED:
        return (
            f"[{base_id}](https://huggingface.co/{base_id}), as lopt's embedded copy `{base}` (dequantized from "
            "GGUF Q4_1)"
        )
    if base_id:
        return f"[{base_id}](https://huggingface.co/{base_id})"
    return f"a local folder, `{base}`"


def _method(folder: Path, args: dict) -> str:
    from lopt.dashboard.watch import layer_count

    method = METHODS.get(args.get("method", ""), args.get("method"))
    if method != "lopt":
        return "end-to-end (E2E): every layer trained on the task loss through one backward pass"
    k = int(args.get("num_blocks", 2))
    text = f"LoPT, local learning in k={k} contiguous blocks"
    layers = layer_count(folder, args)
    if layers:
        from lopt.models.local_learning import split_blocks  # imports torch: only once the layers are known

        ranges = ", ".join(f"{block[0]}-{block[-1]}" for block in split_blocks(layers, k))
        text += f" (layers {ranges} of {layers})"
    if args.get("early_blocks") == "frozen":
        text += "; the non-final blocks frozen (ablation)"
    else:
        text += (
            f"; each non-final block trained on its local reconstruction loss (weight lambda_aux "
            f"{args.get('lambda_aux')}), the final block on the task loss"
        )
    text += f"; {args.get('backward', 'local')} backward"
    if args.get("lr_k1") is not None:
        text += f"; learning rate {args['lr_k1']} for the embeddings and early blocks"
    return text


def _lora(args: dict, adapter: dict | None, run: Run) -> str:
    if adapter is None:  # --merge_lora: the adapters are in the weights now
        return (
            f"rank {args.get('lora_r')}, alpha {args.get('lora_alpha')}, dropout {args.get('lora_dropout')}, on "
            f"{args.get('lora_target_modules')}; merged into the weights"
        )
    targets = adapter.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else targets
    trained = f"; {run.trained_parameters:,} adapter parameters" if run.trained_parameters else ""
    return (
        f"rank {adapter.get('r')}, alpha {adapter.get('lora_alpha')}, dropout {adapter.get('lora_dropout')}, on "
        f"{targets}; the base model frozen{trained}"
    )


def _data(args: dict, recipe) -> tuple[str | None, str]:
    """(hub dataset id or None, the data as text) of a run of `recipe` (its registry record, or None)."""
    from lopt.data.presets import PREFERENCE_HUB, PREFERENCE_PRESETS, PRESETS
    from lopt.tasks import TASKS

    picked = args.get("max_samples")
    samples = f", {picked} records ({args.get('select_samples', 'first')})" if picked else ""
    split = f", split {args.get('split', 'train')}"
    if args.get("train_file"):
        return None, f"a local file, `{Path(args['train_file']).name}`{samples}"
    name = args.get("dataset_name")
    if name:
        config = f", config {args['dataset_config']}" if args.get("dataset_config") else ""
        return name, f"[{name}](https://huggingface.co/datasets/{name}){config}{split}{samples}"
    data = recipe.data if recipe else "examples"
    if data == "prompts":
        task = TASKS.get(args.get("task", ""))
        hub_id = task.hub_id if task else None
        described = f"the {args.get('task')} task" + (f": {task.description}" if task else "")
    elif data == "pairs":
        hub_id, described = (
            PREFERENCE_HUB.get(args.get("dataset_preset", "")),
            f"the {args.get('dataset_preset')} preset: {PREFERENCE_PRESETS.get(args.get('dataset_preset'))}",
        )
    else:
        preset = PRESETS.get(args.get("dataset_preset", ""))
        hub_id = preset.hub_id if preset else None
        described = f"the {args.get('dataset_preset')} preset" + (f": {preset.description}" if preset else "")
    return hub_id, described + (
        f" ([{hub_id}](https://huggingface.co/datasets/{hub_id}){split})" if hub_id else ""
    ) + samples


def _steps(args: dict, run: Run) -> str:
    steps = run.last("step")
    batch = args.get("per_device_train_batch_size")
    accumulation = args.get("gradient_accumulation_steps", 1)
    return (
        f"{steps if steps is not None else 'not logged'}, learning rate {args.get('learning_rate')} "
        f"({args.get('lr_scheduler_type')} schedule), {batch} sequences x {accumulation} accumulation per process"
    )


def _results(run: Run) -> list[str]:
    lines = []
    if run.metrics:
        first, last = run.metrics[0], run.metrics[-1]
        text = f"- Last logged step ({last['step']}): task loss {last['task_loss']:.4f}"
        text += f" (first logged {first['task_loss']:.4f})"
        local = [value for value in last.get("aux_loss") or [] if value is not None]
        if local:
            text += "; local losses " + ", ".join(f"{value:.4f}" for value in local)
        extras = {"reward": "mean reward", "reward_accuracy": "reward accuracy", "reward_margin": "reward margin"}
        text += "".join(f"; {label} {last[key]:.4f}" for key, label in extras.items() if last.get(key) is not None)
        if last.get("kl") is not None:
            text += f"; KL to the starting model {last['kl']:.4f}"
        lines.append(text)
    validated = run.series("eval_task_loss")  # the validation records' task loss, on runs that had some
    if validated:
        lines.append(f"- Validation task loss at step {validated[-1][0]}: {validated[-1][1]:.4f}")
    e = run.evaluation
    if "accuracy" in e:
        lines.append(f"- Task accuracy: {e['accuracy']:.1%} ({e['correct']}/{e['n']} held-out {e['task']} problems)")
    if "perplexity" in e:
        lines.append(
            f"- Perplexity on general text: {e['perplexity']:.2f} (starting model {e['base_perplexity']:.2f}, "
            f"change {e['retention_change']:+.1%}; lower kept more)"
        )
    for task, scores in e.get("harness", {}).items():
        lines.append(f"- lm-eval {task}: " + ", ".join(f"{metric} {value:.4f}" for metric, value in scores.items()))
    return lines


def _reward_usage(repo_id: str) -> list[str]:
    return [
        "A reward model: one score per text (higher is preferred), from the last non-padding token.",
        "",
        "```python",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "",
        f'model = AutoModelForSequenceClassification.from_pretrained("{repo_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        "```",
        "",
        "or as the reward of RL with lopt:",
        "",
        "```bash",
        f"lopt grpo --reward_model {repo_id} --output_dir OUT",
        "```",
    ]


def _usage(repo_id: str, adapter: dict | None, base: str | None, base_id: str | None) -> list[str]:
    if adapter is None:
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        ]
    else:
        code = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base_id or base}")'
            + ("" if base_id else "  # the base model the adapter was trained on"),
            f'model = PeftModel.from_pretrained(base, "{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        ]
    lines = ["```python", *code, "```"]
    # lopt loads an adapter through the base its adapter_config.json names: a local base is only on this machine
    if adapter is None or Path(repo_id).is_dir() or _hub_model_id(adapter.get("base_model_name_or_path")):
        lines += ["", "or talk to it in a terminal with lopt:", "", "```bash", f"lopt chat {repo_id}", "```"]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lopt push",
        description="Write lopt's model card into a model folder and upload the folder to the Hugging Face hub.",
    )
    parser.add_argument(
        "folder",
        metavar="DIR",
        help="a run's --output_dir (full model or LoRA adapter), a checkpoint-N folder, or a save_pretrained folder",
    )
    parser.add_argument(
        "--hub_model_id", required=True, help="repository to create or update: ORG/NAME, or NAME under your account"
    )
    parser.add_argument(
        "--private",
        action="store_true",
        help="create the repository private (default: the hub's default, public unless the organization says "
        "otherwise; an existing repository keeps its visibility)",
    )
    parser.add_argument("--commit_message", help=f"the commit's message (default: {DEFAULT_MESSAGE!r})")
    parser.add_argument(
        "--hub_token", help="token with write access (default: HF_TOKEN, else the one `hf auth login` saved)"
    )
    args = parser.parse_args(argv)
    push_folder(
        Path(args.folder).expanduser(), args.hub_model_id, private=args.private, token=args.hub_token,
        commit_message=args.commit_message,
    )  # fmt: skip
