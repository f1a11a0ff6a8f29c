"""Pipeline stages of Hugging Face causal LMs, without processes: the stages, run one after another,
give the whole model's logits bit for bit, their loss is the model's `output.loss`, they hold the
model's own parameters under its names, and what they cannot run is refused before launch."""
from __future__ import annotations

import pytest
import torch

from launcher.cli import main
from launcher.data import token_corpus
from launcher.hf import causal_lm
from strategies.layout import MeshLayout
from strategies.pipeline import DecoderStage, causal_lm_loss, pipeline_split
from tests.helpers import make_spec

pytest.importorskip("transformers", reason="the hf extra is part of `make test`'s install")

LLAMA = {"arch": "llama", "vocab_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32,
         "bos_token_id": 0, "eos_token_id": 0}
GPT2 = {"arch": "gpt2", "vocab_size": 32, "n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 32,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0,
        "tie_word_embeddings": False}
LAYOUTS = {"2 stages": MeshLayout(dp_degree=1, pp_degree=2),
           "4 stages on 2 ranks": MeshLayout(dp_degree=1, pp_degree=2, schedule="interleaved_1f1b", stages_per_rank=2)}


def a_batch(n: int = 6, seq_len: int = 16) -> dict[str, torch.Tensor]:
    samples = token_corpus(n, seq_len, seed=2)
    return {key: torch.stack([samples[i][key] for i in range(n)]) for key in samples[0]}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS)
@pytest.mark.parametrize("config,layers", [(LLAMA, "model.layers"), (GPT2, "transformer.h")], ids=["llama", "gpt2"])
def test_stages_in_order_are_the_whole_model(config, layers, layout):
    torch.manual_seed(0)
    model = causal_lm(**config).eval()
    batch = a_batch()
    with torch.no_grad():
        whole = model(**batch)
        ranks = [pipeline_split(model, layout, rank, layers) for rank in range(layout.pp_degree)]
        stages = sorted((index, stage) for rank, (_, mine) in enumerate(ranks)
                        for index, stage in zip(layout.stage_indices(rank), mine))
        hidden = None
        for index, stage in stages:  # the first stage gets the batch's keywords, later ones the activations
            hidden = stage(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]) if index == 0 \
                else stage(hidden)
    assert torch.equal(hidden, whole.logits)
    assert torch.equal(causal_lm_loss(hidden, batch["labels"]), whole.loss)
    # every parameter on exactly one rank, under its whole-model name, the model's own tensor
    own = dict(model.named_parameters())
    held = [dict(owner.named_parameters()) for owner, _ in ranks]
    assert sorted(name for names in held for name in names) == sorted(own)
    assert all(p is own[name] for names in held for name, p in names.items())
    for (owner, mine) in ranks:
        owned = {id(p) for p in owner.parameters()}
        assert all(id(p) in owned for stage in mine for p in stage.parameters())


def test_the_loss_ignores_minus_100_and_averages_over_labelled_tokens():
    torch.manual_seed(0)
    model = causal_lm(**LLAMA)
    batch = a_batch()
    batch["labels"][:, -5:] = -100
    with torch.no_grad():
        output = model(**batch)
    assert torch.equal(causal_lm_loss(output.logits, batch["labels"]), output.loss)


def test_padding_masks_and_other_inputs_are_refused_by_the_first_stage():
    model = causal_lm(**LLAMA)
    first = pipeline_split(model, MeshLayout(dp_degree=1, pp_degree=2), 0, "model.layers")[0]
    assert isinstance(first, DecoderStage) and first.is_first and not first.is_last
    batch = a_batch()
    batch["attention_mask"][0, -3:] = 0
    with pytest.raises(ValueError, match="masks some tokens"):
        first(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(TypeError, match="also has position_ids"):
        first(input_ids=batch["input_ids"], position_ids=torch.arange(16)[None])


def hf_pipeline_spec(tmp_path, kwargs, **sections):
    base = {"model": {"target": "launcher.hf:causal_lm", "kwargs": kwargs},
            "data": {"target": "launcher.data:token_corpus", "kwargs": {"n": 48, "seq_len": 16},
                     "micro_batch_size": 8, "feed": "kwargs"},
            "loss": "model", "parallel": {"pipeline": 2, "microbatches": 4}, "resources": {"procs_per_node": 2}}
    return make_spec(tmp_path, **{**base, **sections})


@pytest.mark.parametrize("kwargs,sections,expected", [
    ({**GPT2, "tie_word_embeddings": True}, {},
     "parallel.pipeline=2: GPT2LMHeadModel ties lm_head.weight to transformer.wte.weight"),
    ({**LLAMA, "tie_word_embeddings": True}, {},
     "parallel.pipeline=2: LlamaForCausalLM ties lm_head.weight to model.embed_tokens.weight"),
    (LLAMA, {"data": {"target": "launcher.data:token_corpus", "kwargs": {"n": 48, "seq_len": 16}, "micro_batch_size": 8,
                      "feed": "positional"}},
     "loss=model with parallel.pipeline=2: the last stage recomputes the model's loss from the batch's labels;"
     " use data.feed: kwargs"),
], ids=["gpt2 tied", "llama tied", "loss model without dict samples"])
def test_what_stages_cannot_run_is_refused_before_launch(tmp_path, capsys, kwargs, sections, expected):
    assert main(["validate", str(hf_pipeline_spec(tmp_path, kwargs, **sections))]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"error: {expected}" in err, err


@pytest.mark.parametrize("kwargs", [LLAMA, GPT2], ids=["llama", "gpt2 untied"])
def test_hf_causal_lms_with_loss_model_pass_the_pipeline_checks(tmp_path, capsys, kwargs):
    assert main(["validate", str(hf_pipeline_spec(tmp_path, kwargs))]) == 0, capsys.readouterr().err
