"""Pipeline parallel: cut the model into stages at its layers and build a torch.distributed.pipelining schedule.

A rank's stages share one `owner` module that holds every parameter the rank keeps under its
whole-model name (so checkpoints, optimizer state, clipping and `meshyard export` see ordinary
parameter names). Two kinds of models are cut:

- Models whose forward skips a module that is None (the built-in ones, see launcher/models.py):
  each stage is a view of the model (a shallow copy sharing its submodules) that keeps only its own
  layers; top-level modules registered before the layer list belong to the first stage, those
  after it to the last, and the others are set to None. The layer list must be a direct child.
- Hugging Face decoder-only causal LMs (`LlamaForCausalLM`, `GPT2LMHeadModel`), as torchtitan
  does it: a `DecoderStage` per stage runs the token embeddings (first stage), its decoder layers
  with causal attention and positions 0..T-1 computed in the stage itself (Llama's rotary
  embedding, GPT-2's position embedding on the first stage), then the final norm and the LM head
  (last stage). It registers the model's own modules under their whole-model paths
  (`model.layers.3...`, `lm_head`). With `loss: model` the last stage returns logits, and the
  loss the model would return (shifted next-token cross-entropy, labels -100 ignored, mean over
  tokens) is recomputed from them and the batch's labels by `causal_lm_loss`.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from strategies.batch import model_output
from strategies.layout import MeshLayout, stage_block_ranges

if TYPE_CHECKING:
    from torch.distributed.pipelining.schedules import _PipelineSchedule
    from torch.distributed.pipelining.stage import _PipelineStageBase

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}
IGNORE_INDEX = -100


class StageBlocks(nn.Module):
    """Some of `model.blocks`, registered under their original indices so names match the whole model."""

    def __init__(self, blocks: dict[int, nn.Module]) -> None:
        super().__init__()
        for index, block in blocks.items():
            self.add_module(str(index), block)

    def __iter__(self) -> Iterator[nn.Module | None]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)


def _view(source: nn.Module, layers_name: str, blocks: nn.ModuleList | nn.Sequential, blocks_kept: list[int],
          first: bool, last: bool) -> nn.Module:
    """A shallow copy of `source` sharing its submodules, with only `blocks_kept` and the ends it owns.

    nn.Module has no public shallow copy: copy.copy would share the registries themselves, so
    setting a child to None on the view would remove it from the model. The view gets its own
    copies of the (private) `_modules`/`_parameters`/`_buffers` dicts holding the same objects."""
    view = copy.copy(source)
    view._modules, view._parameters, view._buffers = (dict(source._modules), dict(source._parameters),
                                                      dict(source._buffers))
    names = list(source._modules)
    position = names.index(layers_name)
    setattr(view, layers_name, StageBlocks({i: blocks[i] for i in blocks_kept}))
    for name in names[:position] if not first else []:
        setattr(view, name, None)
    for name in names[position + 1:] if not last else []:
        setattr(view, name, None)
    return view


# -- Hugging Face decoder-only causal LMs ---------------------------------------------------------

@dataclass(frozen=True)
class Decoder:
    """Where an HF causal LM keeps its parts (module paths of the whole model)."""

    arch: str
    embed: tuple[str, ...]  # first stage only: token (and position) embeddings
    layers: str  # the decoder layers, split between the stages
    head: tuple[str, ...]  # last stage only: final norm, LM head
    shared: tuple[str, ...] = ()  # every stage: Llama's rotary embedding (non-persistent buffers only)
    embedding: str = ""  # the token embedding, which the head must not be tied to
    lm_head: str = "lm_head"


DECODERS = {
    "LlamaForCausalLM": Decoder("llama", ("model.embed_tokens",), "model.layers", ("model.norm", "lm_head"),
                                ("model.rotary_emb",), "model.embed_tokens"),
    "GPT2LMHeadModel": Decoder("gpt2", ("transformer.wte", "transformer.wpe", "transformer.drop"), "transformer.h",
                               ("transformer.ln_f", "lm_head"), (), "transformer.wte"),
}


def hf_decoder(model: nn.Module) -> Decoder | None:
    """How to cut `model` if it is one of the HF causal LMs pipeline stages know (the exact class)."""
    cls = type(model)
    return DECODERS.get(cls.__name__) if cls.__module__.startswith("transformers.") else None


def check_pipeline_model(model: nn.Module, layers_path: str, loss_from_model: bool, feed: str, degree: int) -> None:
    """Refuse (ValueError, one line naming the setting) a model, layer list or loss that pipeline
    stages cannot run the way one process does."""
    decoder = hf_decoder(model)
    name, pipeline = type(model).__name__, f"parallel.pipeline={degree}"
    if decoder is None:
        if type(model).__module__.startswith("transformers."):
            raise ValueError(f"{pipeline}: {name} is not a model pipeline stages can run; supported Hugging Face"
                             f" models: {', '.join(DECODERS)}")
        if "." in layers_path:
            raise ValueError(f"{pipeline}: the layer list {layers_path} is nested; pipeline stages need it as a direct"
                             " child of the model (whose forward skips modules set to None)")
        if loss_from_model:
            raise ValueError(f"loss=model with {pipeline}: the last stage does not see the batch's labels; name a loss"
                             " function (e.g. token_cross_entropy)")
        return
    if layers_path != decoder.layers:
        raise ValueError(f"{pipeline}: model.layers={layers_path}, but pipeline stages of {name} split"
                         f" {decoder.layers}")
    head, embedding = model.get_submodule(decoder.lm_head), model.get_submodule(decoder.embedding)
    if head.weight is embedding.weight:
        raise ValueError(f"{pipeline}: {name} ties {decoder.lm_head}.weight to {decoder.embedding}.weight, which would"
                         " live on the first and the last stage; pipeline stages need untied weights (model.kwargs"
                         " tie_word_embeddings: false)")
    if getattr(model.config, "add_cross_attention", False):
        raise ValueError(f"{pipeline}: {name} has cross-attention (add_cross_attention); pipeline stages run"
                         " decoder-only models")
    if loss_from_model and feed != "kwargs":
        raise ValueError(f"loss=model with {pipeline}: the last stage recomputes the model's loss from the batch's"
                         " labels; use data.feed: kwargs (dict samples with the labels under data.target_key)")


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register `module` at the dotted `path` under `root`, creating empty containers on the way."""
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        if part not in dict(node.named_children()):
            node.add_module(part, StageBlocks({}))
        node = node.get_submodule(part)
    node.add_module(leaf, module)


class DecoderStage(nn.Module):
    """One pipeline stage of an HF decoder-only causal LM. Its submodules are the model's own
    modules under their whole-model paths; it holds no tensors of its own."""

    def __init__(self, model: nn.Module, decoder: Decoder, kept: list[int], first: bool, last: bool) -> None:
        super().__init__()
        self.decoder, self.config, self.is_first, self.is_last = decoder, model.config, first, last
        layers = cast(nn.ModuleList, model.get_submodule(decoder.layers))  # HF keeps its decoder layers in one
        paths = [*(decoder.embed if first else ()), *decoder.shared, *(decoder.head if last else ())]
        parts = {path: model.get_submodule(path) for path in paths}
        parts[decoder.layers] = StageBlocks({i: layers[i] for i in kept})
        order = [name for name, _ in model.named_modules()]
        for path in sorted(parts, key=order.index):
            _attach(self, path, parts[path])

    def forward(self, hidden: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **other: Any) -> torch.Tensor:
        """First stage: token ids (positionally or as `input_ids`) -> hidden states; later stages:
        hidden states in; the last stage returns logits."""
        if other:
            raise TypeError(f"pipeline stages of {type(self.config).__name__.removesuffix('Config')} take input_ids and"
                            f" attention_mask; the batch also has {', '.join(sorted(other))}")
        if self.is_first:
            ids = input_ids if input_ids is not None else hidden
            if attention_mask is not None and not bool(attention_mask.all()):
                raise ValueError("pipeline parallel: the batch's attention_mask masks some tokens (padding), which"
                                 " pipeline stages do not pass on; pad on the right with labels -100 and an all-ones"
                                 " mask (the same loss under causal attention), or train without parallel.pipeline")
            hidden = ids
        # hidden: the first stage's token ids, a later stage's input from the schedule
        return (_run_llama if self.decoder.arch == "llama" else _run_gpt2)(self, cast(torch.Tensor, hidden))


def _causal_mask(config: Any, hidden: torch.Tensor, positions: torch.Tensor) -> Any:
    from transformers.masking_utils import create_causal_mask

    # What the model builds for an all-ones attention mask (None with sdpa: its own is_causal).
    return create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None, cache=None,
                              position_ids=positions)


def _run_llama(stage: DecoderStage, hidden: torch.Tensor) -> torch.Tensor:
    model: Any = stage.get_submodule("model")  # LlamaModel: its parts are read as attributes
    if stage.is_first:
        hidden = model.embed_tokens(hidden)
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = _causal_mask(stage.config, hidden, positions)
    rotary = model.rotary_emb(hidden, position_ids=positions)  # every stage: cos/sin of positions 0..T-1
    for layer in model.layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
    if stage.is_last:
        hidden = stage.get_submodule("lm_head")(model.norm(hidden))
    return hidden


def _run_gpt2(stage: DecoderStage, hidden: torch.Tensor) -> torch.Tensor:
    model: Any = stage.get_submodule("transformer")  # GPT2Model: its parts are read as attributes
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    if stage.is_first:
        hidden = model.wte(hidden)
        mask = _causal_mask(stage.config, hidden, positions)
        hidden = model.drop(hidden + model.wpe(positions))
    else:
        mask = _causal_mask(stage.config, hidden, positions)
    for block in model.h:
        hidden = block(hidden, None, mask, None, use_cache=False, position_ids=positions)
    if stage.is_last:
        hidden = stage.get_submodule("lm_head")(model.ln_f(hidden))
    return hidden


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What an HF causal LM returns as `loss` for these logits and (unshifted) labels: the
    prediction at t is scored against label t + 1, labels -100 are ignored, mean over tokens (fp32)."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1).to(logits.device),
                           ignore_index=IGNORE_INDEX)


def pipeline_model_loss(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function that stands for `loss: model` under pipeline parallel (the last stage
    returns logits, not the model's output)."""
    if hf_decoder(model) is None:
        raise ValueError(f"loss=model with parallel.pipeline: {type(model).__name__}'s last stage does not see the"
                         " batch's labels; name a loss function")
    return causal_lm_loss


# -- the split and the schedule -------------------------------------------------------------------

def pipeline_split(model: nn.Module, layout: MeshLayout, pp_rank: int,
                   layers_name: str = "blocks") -> tuple[nn.Module, list[nn.Module]]:
    """(owner, stage modules) of pipeline rank `pp_rank`; the stage modules share the owner's parameters."""
    if any(True for _ in [*model.parameters(recurse=False), *model.buffers(recurse=False)]):
        raise TypeError(f"{type(model).__name__} holds parameters or buffers directly on the root module; pipeline"
                        " parallel assigns whole submodules to stages, so move them into a submodule")
    blocks = cast("nn.ModuleList | nn.Sequential", model.get_submodule(layers_name))  # indexed and counted
    ranges = stage_block_ranges(len(blocks), layout.num_stages, layout.split_points, layers_name)
    local = layout.stage_indices(pp_rank)
    last = layout.num_stages - 1
    decoder = hf_decoder(model)

    def view_of(source: nn.Module, stages: list[int]) -> nn.Module:
        kept = [i for s in stages for i in ranges[s]]
        if decoder is not None:
            return DecoderStage(model, decoder, kept, first=0 in stages, last=last in stages)
        return _view(source, layers_name, blocks, kept, first=0 in stages, last=last in stages)

    owner = view_of(model, local)
    stages = [view_of(owner, [s]) for s in local] if len(local) > 1 else [owner]
    return owner, stages


class TensorOutput(nn.Module):
    """The last stage as torch's pipelining wants it: its output is a tensor (the `logits` of a
    dict/ModelOutput, the first element of a tuple; strategies/batch.py). Only the schedule (and the
    data-parallel wrapper around the stage it runs) sees this wrapper; parameter names everywhere
    else are the model's."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return model_output(self.stage(*args, **kwargs))


def build_schedule(layout: MeshLayout, stage_modules: list[nn.Module], pp_rank: int, device: torch.device,
                   group: torch.distributed.ProcessGroup, loss_fn: Callable | None, microbatches: int,
                   schedule: str | None = None) -> _PipelineSchedule:
    """The schedule over this rank's stages (the last stage's module must return a tensor: see
    TensorOutput). Gradients are NOT scaled by the schedule: the loss function carries the
    1/(microbatches x accumulation) factor, so a window of several `step` calls accumulates the
    gradient of the window's mean loss."""
    stages: list[_PipelineStageBase] = [
        PipelineStage(module, index, layout.num_stages, device, group=group)
        for module, index in zip(stage_modules, layout.stage_indices(pp_rank))
    ]
    cls = SCHEDULES[schedule or layout.schedule]
    if cls is ScheduleInterleaved1F1B:
        return cls(stages, microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
