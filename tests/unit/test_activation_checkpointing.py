"""Activation checkpointing is really on where asked, on the layers asked, in the single-process and
the composed strategy alike, and changes neither the gradients nor the names checkpoints use.

Recomputation is counted, not assumed: a hook on each block's Linear counts its calls during one
forward and backward; a checkpointed block runs it twice (forward, then again in backward)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from launcher.models import mlp
from strategies import build_strategy
from strategies.checkpointing import checkpointed_layers, layer_interval
from strategies.model_init import ModelRecipe

DEPTH = 4


def recipe(policy: str) -> ModelRecipe:
    return ModelRecipe(lambda: mlp(in_dim=8, hidden=8, out_dim=1, depth=DEPTH), seed=3,
                       activation_checkpointing=policy)


def calls_per_block_in_one_step(strategy_name: str,
                                policy: str) -> tuple[list[int], dict[str, torch.Tensor], list[str]]:
    """Linear calls per block in one forward/backward; the gradients; the model's state-dict keys."""
    torch.manual_seed(0)
    strategy = build_strategy(strategy_name, torch.device("cpu"), "fp32")
    strategy.setup(recipe(policy), lambda params: torch.optim.SGD(params, lr=0.1), torch.nn.functional.mse_loss)
    model = strategy.model_parts[0]
    calls = [0] * DEPTH
    for index, block in enumerate(model.blocks):
        block[0].register_forward_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    generator = torch.Generator().manual_seed(1)
    batch = (torch.randn(6, 8, generator=generator), torch.randn(6, 1, generator=generator))
    strategy.forward_backward([batch])
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    return calls, grads, list(get_model_state_dict(model))


def test_every_k_counts_over_the_whole_layer_list():
    layers = [torch.nn.Linear(1, 1) for _ in range(5)]
    assert layer_interval("none") == 0 and layer_interval("full") == 1 and layer_interval("every_3") == 3
    assert checkpointed_layers(layers, "none") == []
    assert checkpointed_layers(layers, "full") == layers
    assert checkpointed_layers(layers, "every_2") == [layers[1], layers[3]]  # the 2nd and 4th, as torchtitan
    assert checkpointed_layers(layers, "every_9") == []


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one rank, so the composed strategy builds its mesh."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("strategy_name", ["single", "ddp"])
def test_checkpointed_blocks_recompute_and_nothing_else_changes(strategy_name, request):
    """`single` is SingleProcessStrategy.setup; `ddp` runs the composed strategy's `parallelize`."""
    if strategy_name != "single":
        request.getfixturevalue("one_rank_group")
    plain_calls, plain_grads, plain_keys = calls_per_block_in_one_step(strategy_name, "none")
    assert plain_calls == [1, 1, 1, 1]
    for policy, expected in (("full", [2, 2, 2, 2]), ("every_2", [1, 2, 1, 2])):
        calls, grads, keys = calls_per_block_in_one_step(strategy_name, policy)
        assert calls == expected, policy
        assert keys == plain_keys  # what DCP saves and export writes: no wrapper level in the names
        assert grads.keys() == plain_grads.keys()
        assert all(torch.equal(grads[name], plain_grads[name]) for name in grads), policy
