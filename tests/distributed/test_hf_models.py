"""Hugging Face GPT-2 and Llama, built from small configs (no download), trained with dict batches
fed as `model(**batch)` and the loss the model returns; every strategy matches one process, and the
exported safetensors load with `from_pretrained` and give the run's final logits."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from launcher.cli import main
from launcher.data import token_corpus
from launcher.hf import causal_lm
from strategies.model_init import ModelRecipe
from tests.helpers import assert_runs_match, final_params, launch_ok, make_spec, max_param_diff, train_in_process

pytestmark = pytest.mark.distributed
transformers = pytest.importorskip("transformers", reason="the hf extra is part of `make test`'s install")

TINY = {
    "gpt2": {"arch": "gpt2", "vocab_size": 32, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 32,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0},
    "llama": {"arch": "llama", "vocab_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32,
              "bos_token_id": 0, "eos_token_id": 0},
}
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "grad_clip": 1.0}


def hf_sections(arch: str, micro_batch_size: int) -> dict[str, Any]:
    return {
        "model": {"target": "launcher.hf:causal_lm", "kwargs": TINY[arch]},
        "data": {"target": "launcher.data:token_corpus", "kwargs": {"n": 48, "seq_len": 16},
                 "eval_kwargs": {"n": 8, "seed": 1}, "micro_batch_size": micro_batch_size, "feed": "kwargs"},
        "loss": "model", "optimizer": SGD,
        "training": {"max_steps": 6, "grad_accum_steps": 3, "log_every": 1},
    }


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return {arch: train_in_process(make_spec(tmp_path_factory.mktemp(arch), "reference", **hf_sections(arch, 8)))
            for arch in TINY}


ROWS = [(arch, row_id, row, procs, dp) for arch in TINY for row_id, row, procs, dp in (
    ("ddp", {"strategy": {"name": "ddp"}}, 2, 2),
    ("zero2", {"strategy": {"name": "zero", "stage": 2}}, 2, 2),
    ("zero3", {"strategy": {"name": "zero", "stage": 3}}, 2, 2),
    ("deepspeed2", {"strategy": {"name": "deepspeed", "stage": 2}}, 2, 2),
)] + [
    ("llama", "tensor2", {"parallel": {"tensor": 2}}, 2, 1),
    # stage modules: embeddings -> decoder layers with rotary positions computed in each stage -> norm + head;
    # the last stage recomputes the model's loss from its logits and the labels (the schedule's target)
    ("llama", "pipeline2", {"parallel": {"pipeline": 2, "schedule": "1f1b", "microbatches": 4}}, 2, 1),
]


@pytest.mark.parametrize("arch,row_id,row,procs,dp", ROWS, ids=[f"{r[0]}-{r[1]}" for r in ROWS])
def test_hf_model_matches_one_process(tmp_path, references, arch, row_id, row, procs, dp):
    spec = make_spec(tmp_path, row_id, **hf_sections(arch, 8 // dp), **row, resources={"procs_per_node": procs})
    assert_runs_match(references[arch], launch_ok(spec), 1e-5)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_exported_safetensors_load_with_from_pretrained(tmp_path, references, arch):
    run = references[arch]
    assert main(["export", str(run), "--format", "safetensors"]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(run / "export" / "safetensors").eval()
    from launcher.export import load_run_model

    trained = load_run_model(run)[1]
    batch = torch.stack([token_corpus(4, 16, seed=3)[i]["input_ids"] for i in range(4)])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch).logits, trained(input_ids=batch).logits)
    if arch == "gpt2":  # tied: the head is the embedding, in the file and after loading
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    state = final_params(run)
    assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items() if k in state)
    # model.init_from reads the same file back (tied weights stored once) into a fresh model
    recipe = ModelRecipe(lambda: causal_lm(**TINY[arch]),
                         init_from=str(run / "export" / "safetensors" / "model.safetensors"))
    assert max_param_diff(recipe.full().state_dict(), state) == 0
