"""Tiny random causal LMs of the families users bring, built from transformers configs (no download): 2 layers,
hidden 64, the embedded tokenizer's vocabulary, dropout off (so train-mode checks are deterministic).

``tiny_family(name)`` returns (model, tokenizer) frozen and in eval mode, like ``mixroute.models.tiny_model``.
"""

from __future__ import annotations

import copy

import torch

# (expected decoder-layers path, position style, transformers config keywords)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("model.layers", "rotary", dict(intermediate_size=128, num_key_value_heads=2)),
    "qwen2": ("model.layers", "rotary", dict(intermediate_size=128, num_key_value_heads=2)),
    "mistral": ("model.layers", "rotary", dict(intermediate_size=128, num_key_value_heads=2)),
    "gemma2": ("model.layers", "rotary", dict(intermediate_size=128, num_key_value_heads=2, head_dim=16)),
    "phi3": ("model.layers", "rotary", dict(intermediate_size=128, num_key_value_heads=2, resid_pdrop=0.0,
                                            embd_pdrop=0.0)),
    "gpt2": ("transformer.h", "absolute", dict(n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "opt": ("model.decoder.layers", "absolute", dict(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=512,
                                                     dropout=0.0)),
    "gpt_neox": ("gpt_neox.layers", "rotary", dict(intermediate_size=128, hidden_dropout=0.0)),
    "phi": ("model.layers", "rotary", dict(intermediate_size=128, resid_pdrop=0.0, embd_pdrop=0.0)),
    "falcon": ("transformer.h", "rotary", dict(hidden_dropout=0.0)),
}
# the families of the (expert kind x router) matrix; gpt_neox, phi and falcon are covered by the discovery tests
MATRIX = ["llama", "qwen2", "mistral", "gemma2", "phi3", "gpt2", "opt"]

_BUILT: dict[tuple[str, int], tuple] = {}


def tiny_family(name: str, seed: int = 0, **overrides):
    """A fresh tiny random model of family ``name`` (a transformers model_type in FAMILIES) and the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mixroute.models import embedded_tokenizer

    key = (name, seed, tuple(sorted(overrides.items())))
    if key not in _BUILT:  # building is the slow part (vocabulary-sized embeddings): copy a pristine one
        tok = embedded_tokenizer()
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        cfg = AutoConfig.for_model(name, vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, attention_dropout=0.0, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                   **{**FAMILIES[name][2], **overrides})
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg)
        model.eval()
        model.requires_grad_(False)
        model.mixroute_source = f"tiny random {name}"
        _BUILT[key] = (model, tok)
    model, tok = _BUILT[key]
    return copy.deepcopy(model), tok
