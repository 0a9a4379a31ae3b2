"""`lopt push`, `--push_to_hub` and lopt's model card, against a stand-in for the hub on 127.0.0.1.

No test reaches the real hub. `LocalHub` is a small `http.server` in a thread that answers the
endpoints huggingface_hub's `HfApi.create_repo` and `upload_folder` call, and records what arrives:

- POST /api/repos/create: the repository (name, organization, visibility);
- POST /api/models/{org}/{name}/preupload/{revision}: it answers "regular" for every file, so that every file,
  weights included, goes inline in the commit (base64 in the NDJSON payload) instead of through the LFS / Xet
  storage endpoints the real hub asks large and binary files to take. What lopt asks of huggingface_hub is the
  same either way; only huggingface_hub's transfer differs;
- POST /api/models/{org}/{name}/commit/{revision}: the commit's message and files, decoded.

- POST /api/validate-yaml: a README.md, which huggingface_hub sends before uploading one: its front matter must
  parse as a YAML mapping (the hub checks more; the tests check the card's fields themselves);
- GET /api/models/{org}/{name}: "not found" (create_repo asks, when it may not create a repository, whether it
  exists already).

The tests point huggingface_hub at it through `huggingface_hub.constants.ENDPOINT` (what HF_ENDPOINT sets, read
when huggingface_hub is imported), with HF_TOKEN set and no cached login. Every request must carry the expected
token (else 401, as the hub answers); the organization "someone-else" answers 403.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub
import pytest
import yaml

from lopt.cli import main
from lopt.config import GRPOConfig
from lopt.tools.publish import CARD_MARKER, MODEL_CARD
from tiny_data import SFT_RECORDS, write_jsonl
from tiny_data import sft_args as tiny_sft_args

TOKEN = "hf_local_test_token"


class LocalHub:
    """The hub's repository-creation and commit endpoints, recording what they receive."""

    def __init__(self):
        self.repos: list[dict] = []  # the JSON of each create request
        self.commits: list[dict] = []  # {"repo", "summary", "files": {path: bytes}}
        self.tokens: set[str] = set()  # the Authorization headers seen
        self.validated: list[str] = []  # the README.md contents whose metadata huggingface_hub had checked
        self.unexpected: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.tokens.add(self.headers.get("Authorization", ""))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self.reply({"error": "Invalid credentials in Authorization header"}, 401)
                parts = self.path.split("?")[0].split("/")
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    if request.get("organization") == "someone-else":
                        return self.reply(
                            {"error": "You don't have the rights to create a model under this namespace"}, 403
                        )
                    hub.repos.append(request)
                    namespace = request.get("organization") or "local-user"  # NAME alone: the token's account
                    return self.reply({"url": f"{hub.url}/{namespace}/{request['name']}"})
                if self.path == "/api/validate-yaml":
                    content = json.loads(body)["content"]
                    hub.validated.append(content)
                    if content.startswith("---\n") and not isinstance(yaml.safe_load(content.split("---\n")[1]), dict):
                        return self.reply({"errors": [{"message": "metadata is not a mapping"}]}, 400)
                    return self.reply({"errors": [], "warnings": []})
                if parts[1:3] == ["api", "models"] and parts[5] == "preupload":
                    files = json.loads(body)["files"]
                    return self.reply(
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                    )
                if parts[1:3] == ["api", "models"] and parts[5] == "commit":
                    repo = f"{parts[3]}/{parts[4]}"
                    commit = {"repo": repo, "files": {}}
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            commit["summary"] = item["value"]["summary"]
                        elif item["key"] == "file":
                            commit["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    hub.commits.append(commit)
                    return self.reply({"commitUrl": f"{hub.url}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40})
                hub.unexpected.append(f"POST {self.path}")
                return self.reply({"error": "not in the stand-in"}, 404)

            def do_GET(self):
                if self.path.startswith(
                    "/api/models/"
                ):  # create_repo asks whether a repository it may not create exists
                    if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                        return self.reply({"error": "Invalid credentials in Authorization header"}, 401)
                    return self.reply({"error": "Repository not found"}, 404)
                # huggingface_hub's own best-effort lookup for its user agent, which it does without when it fails
                if self.path != "/api/agent-harnesses":
                    hub.unexpected.append(f"GET {self.path}")
                return self.reply({"error": "not in the stand-in"}, 404)

            def reply(self, payload: dict, status: int = 200):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str) -> dict[str, bytes]:
        """Every file committed to `repo`, the latest version of each."""
        files = {}
        for commit in self.commits:
            if commit["repo"] == repo:
                files.update(commit["files"])
        return files


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    local = LocalHub()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", local.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-cached-login"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "xet"))  # upload_folder starts an Xet session, which logs there
    yield local
    local.close()
    assert local.unexpected == []  # lopt used only what the stand-in implements


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", SFT_RECORDS)


def sft_args(model_dir, train_file, out, *extra) -> list[str]:
    """The tiny SFT run for two steps, each logged, with no checkpoint."""
    steps = ("--max_steps", "2", "--logging_steps", "1", "--save_steps", "0")
    return tiny_sft_args(model_dir, train_file, out, *steps, *extra)


@pytest.fixture(scope="module")
def full_run(model_dir, train_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "sft-lopt"
    assert main(["sft", *sft_args(model_dir, train_file, out, "--num_blocks", "2")]) == 0
    return out


@pytest.fixture(scope="module")
def lora_run(model_dir, train_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "sft-lora"
    flags = ("--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj,v_proj")
    assert main(["sft", *sft_args(model_dir, train_file, out, *flags)]) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_push_uploads_a_run_folder_with_a_card_of_its_method_metrics_and_evaluation(hub, full_run, tmp_path, capsys):
    folder = copy_of(full_run, tmp_path)
    # as a run made from a hub model records it (the tiny model here is a local folder)
    args = json.loads((folder / "training_args.json").read_text())
    (folder / "training_args.json").write_text(json.dumps({**args, "model_name_or_path": "some-org/base-model"}))
    evaluation = {
        "task": "gsm-symbolic", "accuracy": 0.5, "correct": 4, "n": 8, "perplexity": 11.0, "base_perplexity": 10.0,
        "retention_change": 0.1,
    }  # fmt: skip
    (folder / "eval.json").write_text(json.dumps(evaluation))
    (folder / "checkpoint-1").mkdir()  # resume state and tracker folders stay home
    (folder / "checkpoint-1" / "optimizer.pt").write_bytes(b"state")
    (folder / "runs").mkdir()
    (folder / "runs" / "events").write_text("tensorboard")

    assert main(["push", str(folder), "--hub_model_id", "me/tiny-lopt"]) == 0, capsys.readouterr().err
    assert hub.repos == [{"name": "tiny-lopt", "organization": "me"}]
    assert hub.tokens == {f"Bearer {TOKEN}"} and hub.commits[0]["summary"] == "Upload model with lopt"
    uploaded = hub.files("me/tiny-lopt")
    local = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert set(uploaded) == local - {"checkpoint-1/optimizer.pt", "runs/events"}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "metrics.jsonl"} <= set(uploaded)
    assert all(uploaded[name] == (folder / name).read_bytes() for name in uploaded)
    assert f"{hub.url}/me/tiny-lopt" in capsys.readouterr().err

    card = uploaded["README.md"].decode()
    assert front_matter(card) == {
        "base_model": "some-org/base-model",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["lopt", "local-learning", "sft"],
    }
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    for text in (
        CARD_MARKER,
        "# me/tiny-lopt",
        "[some-org/base-model](https://huggingface.co/some-org/base-model)",
        "LoPT, local learning in k=2 contiguous blocks (layers 0-1, 2-3 of 4)",
        "local reconstruction loss (weight lambda_aux 10.0)",
        "; local backward",
        "a local file, `train.jsonl`",
        f"Last logged step (2): task loss {last['task_loss']:.4f}",
        f"local losses {last['aux_loss'][0]:.4f}",
        "Task accuracy: 50.0% (4/8 held-out gsm-symbolic problems)",
        "Perplexity on general text: 11.00 (starting model 10.00, change +10.0%",
        'AutoModelForCausalLM.from_pretrained("me/tiny-lopt")',
        "lopt chat me/tiny-lopt",
    ):
        assert text in card, text


def test_a_run_leaves_its_card_and_push_uploads_an_adapter_folder_as_peft_loads_it(hub, lora_run, tmp_path):
    # peft's save_pretrained wrote its own README.md into the folder; the run replaced it with lopt's card
    assert CARD_MARKER in (lora_run / "README.md").read_text()
    folder = copy_of(lora_run, tmp_path)
    flags = ["--hub_model_id", "me/tiny-lora", "--private", "--commit_message", "first adapter"]
    assert main(["push", str(folder), *flags]) == 0
    assert hub.repos == [{"name": "tiny-lora", "organization": "me", "visibility": "private"}]
    assert hub.commits[0]["summary"] == "first adapter"
    uploaded = hub.files("me/tiny-lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(uploaded)
    assert "config.json" not in uploaded
    assert uploaded["adapter_model.safetensors"] == (folder / "adapter_model.safetensors").read_bytes()

    card = uploaded["README.md"].decode()
    meta = front_matter(card)
    assert (meta["library_name"], meta["tags"]) == ("peft", ["lopt", "local-learning", "sft", "lora"])
    assert "base_model" not in meta  # the base is a local folder: no hub id to name
    assert "rank 4, alpha 8, dropout 0.05, on q_proj, v_proj; the base model frozen" in card
    assert 'PeftModel.from_pretrained(base, "me/tiny-lora")' in card
    assert "lopt chat" not in card  # the adapter names a local base, which lopt could not load elsewhere


def test_sft_with_push_to_hub_uploads_the_final_model_and_never_records_the_token(
    hub, model_dir, train_file, tmp_path, monkeypatch
):
    monkeypatch.delenv("HF_TOKEN")  # the flag's token, not the environment's
    out = tmp_path / "run"
    flags = ["--push_to_hub", "--hub_model_id", "x/y", "--hub_private_repo", "--hub_token", TOKEN]
    assert main(["sft", *sft_args(model_dir, train_file, out, "--method", "e2e", *flags)]) == 0
    assert hub.repos == [{"name": "y", "organization": "x", "visibility": "private"}]
    uploaded = hub.files("x/y")
    assert {"config.json", "model.safetensors", "training_args.json", "README.md"} <= set(uploaded)
    assert uploaded["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert not any(TOKEN.encode() in content for content in uploaded.values())
    args = json.loads(uploaded["training_args.json"])
    assert "hub_token" not in args and (args["push_to_hub"], args["hub_model_id"]) == (True, "x/y")
    card = uploaded["README.md"].decode()
    assert front_matter(card)["tags"] == ["lopt", "sft"] and "end-to-end (E2E)" in card


def test_a_failed_upload_after_a_run_says_how_to_upload_the_saved_model(hub, model_dir, train_file, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--method", "e2e", "--push_to_hub", "--hub_model_id", "x/y", "--hub_token", "hf_expired"]
    assert main(["sft", *sft_args(model_dir, train_file, out, *flags)]) == 2
    err = capsys.readouterr().err
    assert "the hub did not accept the token" in err
    assert f"The model is saved in {out}: upload it with `lopt push {out} --hub_model_id x/y`" in err
    assert (out / "model.safetensors").is_file() and hub.commits == []


def test_dpo_with_push_to_hub_uploads_lopts_card_instead_of_trls(hub, model_dir, tmp_path):
    out = tmp_path / "dpo"
    flags = [
        "--model_name_or_path", str(model_dir), "--output_dir", str(out), "--max_samples", "2",
        "--per_device_train_batch_size", "2", "--max_seq_length", "2048", "--max_steps", "1", "--save_steps", "1",
        "--push_to_hub", "--hub_model_id", "me/dpo",
    ]  # fmt: skip
    assert main(["dpo", *flags]) == 0
    uploaded = hub.files("me/dpo")
    card = uploaded["README.md"].decode()  # TRL wrote its own at the step-1 checkpoint
    assert CARD_MARKER in card and "trained using [TRL]" not in card
    assert front_matter(card)["tags"] == ["lopt", "local-learning", "dpo"]
    assert "the gsm-symbolic-pairs preset" in card and "DPO (TRL's DPOTrainer)" in card
    assert not any(name.startswith("checkpoint-") for name in uploaded)


def test_a_readme_someone_wrote_is_uploaded_as_it_is_and_the_card_goes_next_to_it(hub, full_run, tmp_path, capsys):
    folder = copy_of(full_run, tmp_path)
    (folder / "README.md").write_text("# My model\n\nMy own words.\n")
    assert main(["push", str(folder), "--hub_model_id", "me/mine"]) == 0
    uploaded = hub.files("me/mine")
    assert uploaded["README.md"] == b"# My model\n\nMy own words.\n"
    assert CARD_MARKER in uploaded[MODEL_CARD].decode()
    assert f"lopt's model card is {folder / MODEL_CARD}" in capsys.readouterr().err
    # once that README.md is gone, the card is the README again, and the MODEL_CARD.md lopt wrote goes
    (folder / "README.md").unlink()
    assert main(["push", str(folder), "--hub_model_id", "me/mine"]) == 0
    assert CARD_MARKER in (folder / "README.md").read_text() and not (folder / MODEL_CARD).exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hub_model_id", "me/bad name"], "is not a hub repository id"),
        (["--hub_model_id", "a/b/c"], "Pass ORG/NAME, or NAME for one under your account"),
        (["--hub_model_id", "me/x", "--hub_token", "hf_wrong"], "the hub did not accept the token"),
        (["--hub_model_id", "someone-else/x"], "may not create or write someone-else/x (403 Forbidden)"),
    ],
)
def test_push_errors_name_the_fix(hub, full_run, tmp_path, capsys, argv, message):
    assert main(["push", str(copy_of(full_run, tmp_path)), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert hub.commits == []


def test_push_without_a_token_or_with_the_hub_offline_says_what_to_do(hub, full_run, tmp_path, capsys, monkeypatch):
    folder = copy_of(full_run, tmp_path)
    monkeypatch.delenv("HF_TOKEN")
    assert main(["push", str(folder), "--hub_model_id", "me/x"]) == 2
    assert "no Hugging Face token found: log in with `hf auth login`" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(folder), "--hub_model_id", "me/x"]) == 2
    assert "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set" in capsys.readouterr().err
    assert hub.tokens == set()  # refused before any request


def test_push_refuses_a_folder_without_a_model(hub, full_run, tmp_path, capsys):
    assert main(["push", str(tmp_path / "missing"), "--hub_model_id", "me/x"]) == 2
    assert "no such folder" in capsys.readouterr().err
    folder = copy_of(full_run, tmp_path)
    (folder / "model.safetensors").unlink()
    assert main(["push", str(folder), "--hub_model_id", "me/x"]) == 2
    assert "holds no model: expected config.json (a full model) or adapter_config.json" in capsys.readouterr().err
    assert hub.tokens == set()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id ORG/NAME"),
        (["--hub_model_id", "me/x", "--hub_private_repo"], "--hub_model_id, --hub_private_repo configure the upload"),
        (["--push_to_hub", "--hub_model_id", "me/x y"], "is not a hub repository id"),
    ],
)
def test_run_hub_flags_are_checked_before_anything_loads(hub, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["sft", "--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and hub.tokens == set()


def test_an_unreachable_hub_is_named(hub, full_run, tmp_path, capsys):
    hub.close()  # nothing listens on its port any more
    assert main(["push", str(copy_of(full_run, tmp_path)), "--hub_model_id", "me/x"]) == 2
    assert f"could not reach the hub at {hub.url}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("changes", "meta", "texts"),
    [
        (
            {"model_name_or_path": "smollm2-135m", "train_file": None, "dataset_name": "me/math", "split": "test"},
            {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "datasets": ["me/math"]},
            [
                "as lopt's embedded copy `smollm2-135m`",
                "[me/math](https://huggingface.co/datasets/me/math), split test",
            ],
        ),
        (  # a GRPO run on its task's hub data: training_args.json names the recipe
            {**GRPOConfig().to_json(), "recipe": "grpo", "task": "gsm8k", "max_samples": 64, "method": "e2e"},
            {"datasets": ["openai/gsm8k"], "tags": ["lopt", "grpo"]},
            ["the gsm8k task: GSM8K grade-school math (hub)", "64 records (first)", "end-to-end (E2E)"],
        ),
        (  # --use_peft --merge_lora leaves a full model made with LoRA
            {"use_peft": True, "merge_lora": True, "lora_r": 8, "early_blocks": "frozen"},
            {"library_name": "transformers", "tags": ["lopt", "local-learning", "sft", "lora"]},
            ["LoRA: rank 8, alpha 32, dropout 0.05, on all-linear; merged into the weights", "frozen (ablation)"],
        ),
    ],
)
def test_the_card_names_base_model_data_and_method_from_the_recorded_flags(full_run, tmp_path, changes, meta, texts):
    from lopt.tools.publish import model_card

    folder = copy_of(full_run, tmp_path)
    args = {**json.loads((folder / "training_args.json").read_text()), **changes}
    (folder / "training_args.json").write_text(json.dumps(args))
    (folder / "metrics.jsonl").unlink()  # its columns would say SFT
    card = model_card(folder, "me/x")
    front = front_matter(card)
    assert {key: front.get(key) for key in meta} == meta
    for text in texts:
        assert text in card, text


def test_a_folder_without_run_files_gets_a_card_that_says_so(model_dir):
    from lopt.tools.publish import model_card

    card = model_card(model_dir, "me/plain")
    assert front_matter(card) == {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["lopt"]}
    assert "how it was trained is not recorded here" in card and "## Results" not in card
