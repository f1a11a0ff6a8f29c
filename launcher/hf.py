"""Hugging Face Transformers models built from a config (no download), for `model.target`.

    model: {target: launcher.hf:causal_lm, kwargs: {arch: llama, hidden_size: 64, ...}}

The kwargs other than `arch` are the architecture's config fields. Train them with
`data.feed: kwargs` (samples are dicts: input_ids, attention_mask, labels) and `loss: model` (the
model shifts the labels and returns its own loss). Needs the `hf` extra (transformers, safetensors).
Under `parallel.pipeline` both are cut into stage modules (strategies/pipeline.py), GPT-2 only with
`tie_word_embeddings: false`; see docs/models.md.
"""
from __future__ import annotations

from typing import Any

from torch import nn

# Megatron-style tensor parallel for Llama: q/k/v and gate/up column-wise, o and down row-wise.
# Attention reshapes with -1 heads, so each rank computes its own whole heads.
LLAMA_TP_PLAN = {
    "model.layers.*.self_attn.q_proj": "colwise", "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise", "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise", "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
}
ARCHITECTURES = ("gpt2", "llama")


def causal_lm(arch: str, **config: Any) -> nn.Module:
    """A randomly initialized causal LM of `arch` (gpt2 or llama) with the given config fields."""
    import transformers

    if arch == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
        # read by parallel.tensor when the spec gives no tp_plan (transformers defines this property's setter
        # away from its getter, so mypy takes it as read-only)
        model.tp_plan = LLAMA_TP_PLAN  # type: ignore[misc]
        return model
    raise ValueError(f"model.kwargs.arch={arch!r}: allowed {', '.join(ARCHITECTURES)}")
