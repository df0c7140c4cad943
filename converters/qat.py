"""Quantization-aware fine-tuning (`edge-convert --qat`): train the float model against the int8 rounding
the profile's scheme will apply, for models where post-training int8 loses the last points.

What is simulated is what ONNX Runtime's static QDQ quantization (converters.quantize) does to the
exported graph, with ORT's own integer ranges (`get_qmin_qmax_for_qType`):
- weights of every Conv and Linear, symmetric, per output channel when the scheme says `per_channel`
  (else per tensor), scale = max|w| / 127 (/ 64 with the scheme's `reduce_range`): ORT's rule for
  symmetric weights. BatchNorm folded into a convolution at export scales each output channel by one
  factor, and per-channel symmetric rounding is invariant to that, so the integers trained here are the
  ones ORT computes from the folded weights (per tensor that holds only without BatchNorm: an
  approximation there);
- activations per tensor in the scheme's activation type (uint8 asymmetric, int8 symmetric), at the
  tensors ORT puts QDQ pairs on: the input of every Conv/Linear, the output of every ReLU/ReLU6 module
  (ORT fuses the activation into the Conv before it and quantizes its output; BatchNorm between them is
  folded) and of every Linear (the classifier's logits are quantized too). A Conv output that reaches
  the graph without such a module (a BatchNorm straight into a residual Add) is left unsimulated. Their
  ranges are first measured as ORT's MinMax calibration does (global min/max over the calibration
  samples, run in float, zero included), then follow an exponential moving average of the training
  batches over a warm-up share of the training, and are then measured the MinMax way again and frozen,
  so the rest of the training sees the ranges ORT's calibration on the same data will find.
Rounding uses a straight-through estimator (`torch.fake_quantize_per_*_affine`: identity gradient
inside the range, zero outside).

Training reuses distillation's pieces (converters.distill): the float teacher's outputs are the targets
(`distillation_loss`), batches are augmented the same way (`augment_share`), a held-out share of the
calibration inputs (`split_held_out`) is scored with fake quantization on, and the checkpoint best there
is kept (`HeldOutBest`, the untrained model included: QAT never leaves the int8 model worse on data it
did not train on). BatchNorm stays in eval mode (running statistics frozen), so the trained function is
the exported one. Cosine schedule (`warmup_cosine`) over the step cap or the time budget, whichever ends
first; `patience` checkpoints without improvement stop it early.

At the end the fake-quant wrappers are removed: the result is the plain float module, whose weights
are now quantization-friendly. The pipeline exports it to ONNX exactly as any other student and
quantizes it with the same recipe search and accuracy gate, so the shipped graph is the same QDQ graph:
ORT's calibration on the same data reproduces the activation ranges trained with, and the weights round
to the integers training saw.

torch is imported at module level: the pipeline imports this module only for `--qat`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from converters.distill import (
    HeldOutBest,
    augment_share,
    distillation_loss,
    held_out_loss,
    split_held_out,
    stack_samples,
    teacher_outputs,
    warmup_cosine,
)
from converters.torch_outputs import flatten_outputs
from edge.errors import ConfigError
from edge.profiles import QuantizationScheme

Sample = np.ndarray | torch.Tensor | tuple[np.ndarray | torch.Tensor, ...]
Stopped = Literal["steps", "budget", "patience"]
Mode = Literal["calibrate", "observe", "frozen"]
EMA_WEIGHT = 0.1  # share of each warm-up batch's min/max in the running range
CALIBRATION_BATCH = 32  # samples per forward pass when measuring the MinMax ranges


class QatConfigError(ConfigError, ValueError):
    """A QAT option is invalid."""


@dataclass(frozen=True)
class QatResult:
    steps: int  # steps run
    seconds: float
    best_step: int  # the step whose weights the module has now (0: training never helped)
    stopped: Stopped  # what ended training
    layers: int  # Conv/Linear layers trained with fake-quantized weights and inputs
    observed_steps: int  # steps whose batches moved the activation ranges before they were frozen
    # (step, held-out loss of the fake-quantized model); step 0 is the model before training
    held_out: list[tuple[int, float]] = field(default_factory=list)

    @property
    def held_out_before(self) -> float | None:
        return self.held_out[0][1] if self.held_out else None

    @property
    def held_out_after(self) -> float | None:
        """The held-out loss of the checkpoint kept."""
        return min(loss for _, loss in self.held_out) if self.held_out else None


def _integer_range(qtype: Literal["int8", "uint8"], symmetric: bool, reduce_range: bool) -> tuple[int, int]:
    """ORT's own integer range for the type, so the simulation cannot drift from the quantizer."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    code = TensorProto.INT8 if qtype == "int8" else TensorProto.UINT8
    low, high = get_qmin_qmax_for_qType(code, reduce_range=reduce_range, symmetric=symmetric)
    return int(low), int(high)


@dataclass(frozen=True)
class _Grid:
    """An integer range and whether it is symmetric around its middle (ORT's `compute_scale_zp`)."""

    low: int
    high: int
    symmetric: bool

    def scale_zero(self, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point for real ranges [lower, upper] (tensors of one range each), as ORT computes
        them: the range widened to include 0, symmetric ones around it; an empty range gets scale 1."""
        lower, upper = lower.clamp(max=0.0), upper.clamp(min=0.0)
        if self.symmetric:
            bound = torch.maximum(lower.abs(), upper)
            lower, upper = -bound, bound
        scale = (upper - lower) / float(self.high - self.low)
        empty = scale < torch.finfo(torch.float32).tiny
        scale = torch.where(empty, torch.ones_like(scale), scale)
        if self.symmetric:
            zero = torch.full_like(scale, round((self.low + self.high) / 2))
        else:
            zero = torch.round(self.low - lower / scale)
        zero = torch.where(empty, torch.zeros_like(zero), zero)
        return scale.float(), zero.to(torch.int32)


class _ActivationQuant(nn.Module):
    """Per-tensor fake quantization of one activation, its range measured (`calibrate`: running min/max,
    no rounding, as ORT calibrates the float model), tracked (`observe`: moving average of each batch's
    min/max) or `frozen`."""

    def __init__(self, grid: _Grid) -> None:
        super().__init__()
        self.grid = grid
        self.mode: Mode = "calibrate"
        self.register_buffer("lower", torch.tensor(math.inf))
        self.register_buffer("upper", torch.tensor(-math.inf))
        self.lower: torch.Tensor
        self.upper: torch.Tensor

    def reset(self) -> None:
        self.lower.fill_(math.inf)
        self.upper.fill_(-math.inf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "calibrate":
            with torch.no_grad():
                self.lower.copy_(torch.minimum(self.lower, x.min()))
                self.upper.copy_(torch.maximum(self.upper, x.max()))
            return x
        if self.mode == "observe":
            with torch.no_grad():
                self.lower.lerp_(x.min().detach(), EMA_WEIGHT)
                self.upper.lerp_(x.max().detach(), EMA_WEIGHT)
        scale, zero = self.grid.scale_zero(self.lower, self.upper)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, self.grid.low, self.grid.high)


class _QuantizedActivation(nn.Module):
    """A ReLU/ReLU6 module whose output is fake-quantized: the Conv output ORT quantizes after fusing it."""

    def __init__(self, activation: nn.ReLU | nn.ReLU6, grid: _Grid) -> None:
        super().__init__()
        self.activation = activation
        self.outputs = _ActivationQuant(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(self.activation(x))


def _activation_grid(scheme: QuantizationScheme) -> _Grid:
    symmetric = scheme.activations == "int8"  # converters.quantize: ActivationSymmetric
    return _Grid(*_integer_range(scheme.activations, symmetric, False), symmetric)


class _QuantizedLayer(nn.Module):
    """A Conv or Linear with fake-quantized weights and input (and output, for Linear: ORT's Gemm output
    QDQ); the wrapped layer keeps its own parameters, so removing the wrapper leaves them trained."""

    def __init__(self, layer: nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear, scheme: QuantizationScheme):
        super().__init__()
        self.layer = layer
        self.per_channel = scheme.per_channel
        activations = _activation_grid(scheme)
        self.weights = _Grid(*_integer_range(scheme.weights, True, scheme.reduce_range), True)
        self.inputs = _ActivationQuant(activations)
        self.outputs = _ActivationQuant(activations) if isinstance(layer, nn.Linear) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.inputs.mode
        x = self.inputs(x)
        weight = self.layer.weight if mode == "calibrate" else self._rounded_weight()
        # The layer's own forward with the rounded weight: subclasses pad or reshape there (EfficientNet's
        # Conv2dStaticSamePadding pads before its convolution), which a bare F.conv2d would skip.
        out = torch.func.functional_call(self.layer, {"weight": weight}, (x,), strict=False)
        return self.outputs(out) if self.outputs is not None else out

    def _rounded_weight(self) -> torch.Tensor:
        weight = self.layer.weight
        with torch.no_grad():  # the scale follows the weights; the estimator passes gradients to them only
            if self.per_channel:
                bound = weight.abs().flatten(1).amax(dim=1)
            else:
                bound = weight.abs().amax().reshape(1)
            scale, zero = self.weights.scale_zero(-bound, bound)
        if self.per_channel:  # axis 0: output channels, ORT's axis for Conv and for Gemm with transB
            return torch.fake_quantize_per_channel_affine(
                weight, scale, zero, 0, self.weights.low, self.weights.high
            )
        return torch.fake_quantize_per_tensor_affine(
            weight, scale[0], zero[0], self.weights.low, self.weights.high
        )


QUANTIZED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@contextmanager
def _fake_quantized(model: nn.Module, scheme: QuantizationScheme) -> Iterator[_Quantized]:
    """Every Conv/Linear and ReLU/ReLU6 of `model` wrapped in place for the block, the originals put back
    after (their parameters are the same objects throughout)."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    layers: list[_QuantizedLayer] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            wrapper: nn.Module
            if isinstance(child, QUANTIZED_TYPES):
                wrapper = _QuantizedLayer(child, scheme)
                layers.append(wrapper)
            elif isinstance(child, (nn.ReLU, nn.ReLU6)):
                wrapper = _QuantizedActivation(child, _activation_grid(scheme))
            else:
                continue
            setattr(parent, name, wrapper)
            swapped.append((parent, name, child))
    try:
        yield _Quantized(model, layers, [m for m in model.modules() if isinstance(m, _ActivationQuant)])
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


@dataclass
class _Quantized:
    """The model while wrapped: its quantized layers and every activation range."""

    model: nn.Module
    layers: list[_QuantizedLayer]
    ranges: list[_ActivationQuant]

    def set_mode(self, mode: Mode) -> None:
        for quant in self.ranges:
            quant.mode = mode

    def calibrate(self, pool: tuple[torch.Tensor, ...]) -> None:
        """Measure every activation range the MinMax way over all samples, in float, as ORT will."""
        for quant in self.ranges:
            quant.reset()
        self.set_mode("calibrate")
        with torch.no_grad():
            for start in range(0, pool[0].shape[0], CALIBRATION_BATCH):
                self.model(*(tensor[start : start + CALIBRATION_BATCH] for tensor in pool))

    def held_out_loss(
        self, wanted: list[torch.Tensor], check: tuple[torch.Tensor, ...], temperature: float
    ) -> float:
        """The fake-quantized model's loss on the held-out samples, ranges left as they are."""
        modes = [quant.mode for quant in self.ranges]
        self.set_mode("frozen")
        try:
            return held_out_loss(self.model, wanted, check, temperature)
        finally:
            for quant, mode in zip(self.ranges, modes, strict=True):
                quant.mode = mode


def quantization_aware_finetune(
    model: nn.Module,
    teacher: nn.Module,
    samples: Sequence[Sample],
    scheme: QuantizationScheme,
    steps: int,
    *,
    budget_s: float | None = None,
    lr: float = 1e-4,
    batch_size: int = 16,
    temperature: float = 1.0,
    strong_augment: bool = True,
    raw_share: float = 0.5,
    held_out: float = 0.2,
    held_out_views: int = 2,
    evaluations: int = 10,
    patience: int | None = None,
    observe_share: float = 0.1,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> QatResult:
    """Fine-tune `model` in place under `scheme`'s int8 rounding towards the float `teacher` on `samples`
    (arrays or tensors, each a batch of one or more; a tuple per sample for several inputs). Runs `steps`
    at most and `budget_s` seconds at most; `observe_share` of that span lets the activation ranges move
    before they are frozen. `model` is left a plain float module in eval mode with the best checkpoint's
    weights; the result says what ran."""
    if not isinstance(steps, int) or steps < 1:
        raise QatConfigError(f"--qat: expected a positive step cap, got {steps!r}")
    if budget_s is not None and not (math.isfinite(budget_s) and budget_s > 0):
        raise QatConfigError(f"--qat-time: expected a positive duration, got {budget_s!r} s")
    if not (math.isfinite(lr) and lr > 0):
        raise QatConfigError(f"--qat: learning rate must be > 0, got {lr!r}")
    if not 0 <= observe_share < 1:
        raise QatConfigError(f"--qat: observe_share must be in [0, 1), got {observe_share!r}")
    if model is teacher:  # the wrappers would fake-quantize the targets too
        raise QatConfigError("--qat: fine-tune a copy of the teacher, not the teacher itself")
    started = time.perf_counter()
    everything = stack_samples(samples)
    pool, check = split_held_out(everything, held_out, seed, held_out_views, strong_augment)
    count = pool[0].shape[0]
    teacher.eval()
    model.eval()  # BatchNorm keeps its running statistics, as in distillation
    wanted = teacher_outputs(teacher, check) if check else []
    best = HeldOutBest()
    schedule = warmup_cosine(100)  # over the share of the steps or the budget spent, in percent
    stopped: Stopped = "steps"
    step = observed = stale = 0

    def progress() -> float:
        done = step / steps
        if budget_s is not None:
            done = max(done, (time.perf_counter() - started) / budget_s)
        return min(1.0, done)

    with torch.random.fork_rng(devices=[]), _fake_quantized(model, scheme) as quantized:
        if not quantized.layers:
            raise QatConfigError("--qat: the model has no Conv or Linear layer to train for int8")
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        trainable = [p.requires_grad_(True) for p in model.parameters() if p.is_floating_point()]
        optimizer = torch.optim.Adam(trainable, lr=lr)
        quantized.calibrate(everything)
        observing = observe_share > 0
        quantized.set_mode("observe" if observing else "frozen")
        if check:
            best.offer(0, quantized.held_out_loss(wanted, check, temperature), model)
        next_check = 1
        while True:
            done = progress()
            if done >= 1.0:
                stopped = "steps" if step >= steps else "budget"
                break
            if observing and done >= observe_share:
                quantized.calibrate(everything)  # the ranges ORT will measure, for the rest
                quantized.set_mode("frozen")
                observing = False
            for group in optimizer.param_groups:
                group["lr"] = lr * schedule(min(99, int(done * 100)))
            index = torch.randint(0, count, (min(batch_size, count),), generator=generator)
            inputs = augment_share(
                tuple(tensor[index] for tensor in pool), generator, strong_augment, raw_share
            )
            with torch.no_grad():
                targets = flatten_outputs(teacher(*inputs))
            loss = distillation_loss(flatten_outputs(model(*inputs)), targets, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            observed += observing
            if on_step is not None:
                on_step(step, float(loss.detach()))
            done = progress()
            if check and (done >= 1.0 or done * evaluations >= next_check):
                next_check = int(done * evaluations) + 1
                improved = best.offer(step, quantized.held_out_loss(wanted, check, temperature), model)
                stale = 0 if improved else stale + 1
                if patience is not None and stale >= patience:
                    stopped = "patience"
                    break
        best_step = best.restore(model) if check else step
    model.eval()
    return QatResult(
        steps=step,
        seconds=time.perf_counter() - started,
        best_step=best_step,
        stopped=stopped,
        layers=len(quantized.layers),
        observed_steps=observed,
        held_out=list(best.scores),
    )
