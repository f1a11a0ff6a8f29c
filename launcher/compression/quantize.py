"""Post-training int8 quantization of a finished run (`meshyard quantize RUN`), with a report.

- `dynamic_int8` (int8 weights, activations quantized on the fly) and `weight_only_int8` (int8
  weights, fp32 compute) go through torchao (`quantize_` with its int8 configs; the `quant` extra),
  the successor of torch.ao.quantization, whose removal torch 2.13 announces. The artifact is a
  state dict of torchao's int8 tensors, loadable with weights_only=True; `load_quantized` loads it
  into a fresh fp32 model of the run's spec (`assign=True` swaps in the int8 tensors).
- `static_int8` (calibrated activation ranges) has no CPU equivalent in torchao 0.18, so it stays
  on torch.ao's FX graph mode, isolated in `_static_int8_torch_ao`, until torch removes it.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from launcher.components import build_datasets, build_loss, correct_predictions, model_factory
from launcher.errors import UserError
from launcher.export import load_run_model
from launcher.rundir import RunDir
from launcher.spec import spec_from_json_file

METHODS = ("dynamic_int8", "weight_only_int8", "static_int8")
TORCHAO_METHODS = ("dynamic_int8", "weight_only_int8")
LATENCY_REPEATS = 50


def quantize_run(run_dir: Path, method: str, calibrate: int | None) -> dict[str, Any]:
    """Quantize the run's newest checkpoint; write <run>/quantized/{model_fp32.pt, model_int8.pt, report.json}."""
    _check_method(method, calibrate)
    spec, model, checkpoint = load_run_model(run_dir)
    train_set, eval_set = build_datasets(spec.data)
    eval_loader = DataLoader(eval_set if eval_set is not None else train_set, batch_size=spec.data.micro_batch_size)
    calibration = [x for x, _ in DataLoader(train_set, batch_size=spec.data.micro_batch_size)][: calibrate or 16]
    quantized = quantize(model, method, calibration)

    final = RunDir(run_dir).quantized
    staging = final.with_name(f".{final.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    torch.save(model.state_dict(), staging / "model_fp32.pt")
    torch.save(quantized.state_dict(), staging / "model_int8.pt")
    loss_fn = build_loss(spec.loss)
    example = next(iter(eval_loader))[0]
    fp32_ms, int8_ms = _latency_ms(model, quantized, example)
    report: dict[str, Any] = {
        "method": method, "checkpoint": str(checkpoint),
        "calibration_batches": len(calibration) if method == "static_int8" else 0,
        "size_bytes": {"fp32": (staging / "model_fp32.pt").stat().st_size,
                       "int8": (staging / "model_int8.pt").stat().st_size},
        "eval": {"fp32": evaluate(model, eval_loader, loss_fn), "int8": evaluate(quantized, eval_loader, loss_fn)},
        "latency_ms_median": {"fp32": fp32_ms, "int8": int8_ms, "batch_size": len(example)},
    }
    report["size_ratio"] = report["size_bytes"]["int8"] / report["size_bytes"]["fp32"]
    (staging / "report.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)  # the artifact appears whole or not at all
    return report


def _check_method(method: str, calibrate: int | None) -> None:
    if method not in METHODS:
        raise UserError(f"--method {method}: allowed: {', '.join(METHODS)}")
    if calibrate is not None and (method != "static_int8" or calibrate <= 0):
        raise UserError("--calibrate N: a positive number of batches, and only with --method static_int8")


def quantize(model: nn.Module, method: str, calibration: list[torch.Tensor]) -> nn.Module:
    import copy

    model = copy.deepcopy(model).eval()
    if method in TORCHAO_METHODS:
        quantize_, configs = _torchao()
        quantize_(model, configs[method]())
        return model
    return _static_int8_torch_ao(model, calibration)


def _torchao() -> tuple[Any, dict[str, Any]]:
    """torchao's quantize_ and its int8 configs, imported quietly: on a CPU-only machine it logs a
    warning for each CUDA kernel library it cannot load."""
    import logging
    import warnings

    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise UserError("dynamic_int8 and weight_only_int8 use torchao: pip install 'meshyard[quant]'") from None
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    return quantize_, {"dynamic_int8": Int8DynamicActivationInt8WeightConfig,
                       "weight_only_int8": Int8WeightOnlyConfig}


def _static_int8_torch_ao(model: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    """The deprecated torch.ao.quantization path (FX graph mode), kept for static int8 only."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    try:
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (calibration[0],))
    except Exception as exc:  # symbolic tracing fails on data-dependent control flow
        raise UserError(f"static_int8: the model cannot be traced for static quantization ({exc});"
                        " use dynamic_int8") from None
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    return convert_fx(prepared)


def load_quantized(run_dir: Path) -> nn.Module:
    """Rebuild the quantized model from <run>/quantized in any process (no process group needed)."""
    files = RunDir(run_dir)
    report = json.loads((files.quantized / "report.json").read_text())
    spec = spec_from_json_file(files.spec)
    artifact = files.quantized / "model_int8.pt"
    if report["method"] in TORCHAO_METHODS:
        _torchao()  # registers torchao's int8 tensor types with weights_only loading
        model = model_factory(spec.model)().eval()
        model.load_state_dict(torch.load(artifact, weights_only=True), assign=True)  # int8 tensors replace fp32
        return model
    # The structure comes from quantizing a fresh fp32 model; the values from the artifact.
    train_set, _ = build_datasets(spec.data)
    sample = next(iter(DataLoader(train_set, batch_size=spec.data.micro_batch_size)))[0]
    model = quantize(model_factory(spec.model)(), report["method"], [sample])
    model.load_state_dict(torch.load(artifact, weights_only=True))
    return model


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: Any) -> dict[str, float]:
    total, correct, count, classify = 0.0, 0, 0, False
    for inputs, targets in loader:
        output = model(inputs)
        total += loss_fn(output, targets).item() * len(inputs)
        hits = correct_predictions(output, targets)
        if hits is not None:
            classify, correct = True, correct + hits
        count += len(inputs)
    metrics = {"loss": total / count}
    if classify:
        metrics["accuracy"] = correct / count
    return metrics


@torch.no_grad()
def _latency_ms(fp32: nn.Module, int8: nn.Module, batch: torch.Tensor) -> tuple[float, float]:
    """Median forward latency of each, interleaved call by call so machine noise hits both alike."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(5):
        fp32(batch), int8(batch)  # warm-up
    for _ in range(LATENCY_REPEATS):
        for index, model in enumerate((fp32, int8)):
            tick = time.perf_counter()
            model(batch)
            times[index].append(1000 * (time.perf_counter() - tick))
    return statistics.median(times[0]), statistics.median(times[1])
