"""Base model loading: tiny model, embedded default, cache atomicity, clear errors."""


import pytest
import torch

from mixroute import models
from mixroute.models import ModelNotFoundError, load_base_model, model_info, tiny_model


def test_tiny_model_shape_and_speed(tiny):
    model, tok = tiny
    info = model_info(model)
    assert info["layers"] == 2 and info["hidden_size"] == 64
    assert info["vocab_size"] == len(tok) == 49152
    # the tokenizer is read from the cache's tokenizer.json from now on, not from the GGUF
    from mixroute.models import EMBEDDED_NAME, _is_complete, cache_dir

    assert any(_is_complete(cache_dir() / n) for n in (EMBEDDED_NAME, f"{EMBEDDED_NAME}-tokenizer"))
    other, _ = tiny_model(seed=1)
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert not any(p.requires_grad for p in model.parameters())


def test_tiny_model_is_seeded():
    a, _ = tiny_model(seed=3)
    b, _ = tiny_model(seed=3)
    c, _ = tiny_model(seed=4)
    assert torch.equal(a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(a.model.layers[0].self_attn.q_proj.weight, c.model.layers[0].self_attn.q_proj.weight)


def test_missing_model_error_says_what_was_looked_for(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no-such-org/no-such-model.*embedded default"):
        load_base_model("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_base_model(str(tmp_path / "empty"))


def test_local_directory_round_trip(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, tok2 = load_base_model(str(tmp_path / "m"))
    ids = tok("hello there", return_tensors="pt").input_ids
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert "local directory" in model_info(loaded)["source"]


def test_atomic_cache_write_leaves_nothing_on_crash(tmp_path):
    target = tmp_path / "cache" / "m"

    def crash(tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        models._atomic_save_dir(target, crash)
    assert not target.exists()
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary directory is removed too
    models._atomic_save_dir(target, lambda tmp: (tmp / "x").write_text("ok"))
    assert models._is_complete(target) and (target / "x").read_text() == "ok"


def test_incomplete_cache_is_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXROUTE_CACHE", str(tmp_path))
    half = tmp_path / models.EMBEDDED_NAME
    half.mkdir()
    (half / "config.json").write_text("{}")  # a crash before the COMPLETE marker
    called = []
    monkeypatch.setattr(models, "_convert_embedded", lambda target: called.append(target))
    models.resolve_model_path(None)
    assert called == [half]


@pytest.mark.integration
def test_embedded_model_converts_once_then_loads_from_the_cache(tmp_path, monkeypatch, smollm, capfd):
    monkeypatch.setenv("MIXROUTE_CACHE", str(tmp_path))
    capfd.readouterr()
    first, tok = load_base_model()  # converts the GGUF into tmp_path
    said = capfd.readouterr()
    assert "converting the embedded" in said.err and "once" in said.err
    cached = tmp_path / models.EMBEDDED_NAME
    assert {"COMPLETE", "config.json", "model.safetensors", "tokenizer.json", "mixroute_source.json"} <= \
        {p.name for p in cached.iterdir()}

    def no_conversion(target):
        raise AssertionError(f"converted the GGUF again into {target}")

    monkeypatch.setattr(models, "_convert_embedded", no_conversion)
    second, _ = load_base_model()
    quiet = capfd.readouterr()
    assert "Loading weights" not in quiet.err + quiet.out and "converting" not in quiet.err, quiet.err[-300:]
    assert str(cached) in second.mixroute_source
    info = model_info(second)
    assert info["layers"] == 30 and info["hidden_size"] == 576 and info["parameters"] > 130e6
    for (n1, p1), (n2, p2) in zip(first.state_dict().items(), second.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # the shared session model (default cache) has identical weights to the fresh conversion
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert torch.allclose(smollm[0](ids).logits, second(ids).logits, atol=1e-6)
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
