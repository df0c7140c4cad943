"""Label-free knowledge distillation: recover a pruned student from its unpruned fp32 teacher.

Users bring a handful of calibration inputs, not a labelled training set, so the teacher's outputs are
the targets: KL divergence of temperature-softened class distributions for classifiers (scaled by T^2 so
gradients keep their size), a variance-normalized MSE for any other head. Few images are stretched with
random resized crops, flips and mixup; teacher and student always see the same augmented batch.

A share of the samples (`held_out`) is never trained on: the student's loss on it, un-augmented, is
measured before training and every few steps, and the student that did best there is the one returned —
the model before any step included, so distilling never leaves it worse on data it did not train on.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from converters.torch_outputs import flatten_outputs
from edge.errors import ConfigError

if TYPE_CHECKING:
    import torch


class DistillConfigError(ConfigError, ValueError):
    """A distillation option or sample is invalid."""


@dataclass
class DistillResult:
    model: Any  # the student, trained in place, back in eval mode
    losses: list[float] = field(default_factory=list)  # one per step
    seconds: float = 0.0
    # (step, loss on the held-out samples); step 0 is the student before training
    held_out: list[tuple[int, float]] = field(default_factory=list)
    best_step: int = 0  # the step whose weights the student has now (0: training never helped)


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    samples: Sequence[Any],
    steps: int,
    temperature: float = 4.0,
    lr: float = 1e-4,
    batch_size: int = 16,
    on_step: Callable[[int, float], None] | None = None,
    *,
    augment: bool = True,
    seed: int = 0,
    keep_zeros: bool = False,
    held_out: float = 0.2,
    evaluations: int = 10,
) -> DistillResult:
    """Train `student` (in place) to reproduce `teacher` on `samples`; deterministic for a given seed.

    `samples` holds input tensors (torch or numpy), each a batch of one or several stacked samples; a
    multi-input model takes a tuple per entry, in the model's input order. `keep_zeros` (after
    unstructured pruning) holds every weight that is exactly zero at the start at zero, so training
    recovers accuracy with the surviving weights instead of re-densifying the model. `held_out` is the
    share of samples kept aside to choose the best of `evaluations` checkpoints (none with fewer than 5
    samples: then the last step is kept).
    """
    import torch

    if not isinstance(steps, int) or steps < 0:
        raise DistillConfigError(f"--distill-steps: expected a non-negative integer, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise DistillConfigError(f"--distill-lr: expected a positive number, got {lr!r}")
    if temperature <= 0:
        raise DistillConfigError(f"distill temperature must be > 0, got {temperature!r}")
    if batch_size < 1:
        raise DistillConfigError(f"distill batch_size must be >= 1, got {batch_size!r}")
    pool = _stack_samples(samples)
    started = time.perf_counter()
    losses: list[float] = []
    if steps == 0:
        student.eval()
        return DistillResult(model=student, losses=losses, seconds=0.0)

    teacher.eval()  # its parameters are left as they are: it runs under no_grad only
    total = pool[0].shape[0]
    kept_aside = int(total * held_out) if total >= 5 and held_out > 0 else 0
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed + 1))
    check = tuple(tensor[order[:kept_aside]] for tensor in pool) if kept_aside else ()
    pool = tuple(tensor[order[kept_aside:]] for tensor in pool) if kept_aside else pool
    count = pool[0].shape[0]
    batch = min(batch_size, count) if not augment else batch_size
    scores: list[tuple[int, float]] = []
    best: tuple[float, int, dict[str, Any] | None] = (math.inf, 0, None)
    every = max(1, steps // max(1, evaluations))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        _set_train_mode(student)
        # A pruned copy of a frozen teacher inherits requires_grad=False: the whole student learns.
        trainable = [p.requires_grad_(True) for p in student.parameters() if p.is_floating_point()]
        masks = _zero_masks(trainable) if keep_zeros else []
        optimizer = torch.optim.Adam(trainable, lr=lr)
        warmup = max(1, steps // 20)

        def schedule(step: int) -> float:  # short warm-up, then cosine to zero
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

        def checkpoint(step: int) -> None:
            nonlocal best
            if not check:
                return
            score = _held_out_loss(student, teacher, check, temperature)
            scores.append((step, score))
            if score < best[0]:
                best = (score, step, copy.deepcopy(student.state_dict()))

        checkpoint(0)
        for step in range(steps):
            index = torch.randint(0, count, (batch,), generator=generator)
            inputs = tuple(tensor[index] for tensor in pool)
            if augment:
                inputs = _augment(inputs, generator)
            with torch.no_grad():
                targets = flatten_outputs(teacher(*inputs))
            loss = distillation_loss(flatten_outputs(student(*inputs)), targets, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _apply_masks(masks)
            scheduler.step()
            value = float(loss.detach())
            losses.append(value)
            if on_step is not None:
                on_step(step, value)
            if (step + 1) % every == 0 or step + 1 == steps:
                checkpoint(step + 1)
    best_step = steps
    if best[2] is not None:
        student.load_state_dict(best[2])
        best_step = best[1]
    student.eval()
    return DistillResult(
        model=student,
        losses=losses,
        seconds=time.perf_counter() - started,
        held_out=scores,
        best_step=best_step,
    )


def _held_out_loss(student: Any, teacher: Any, inputs: tuple[Any, ...], temperature: float) -> float:
    """The distillation loss on samples never trained on, un-augmented, the student in eval mode."""
    import torch

    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            loss = distillation_loss(
                flatten_outputs(student(*inputs)), flatten_outputs(teacher(*inputs)), temperature
            )
        return float(loss)
    finally:
        if was_training:
            _set_train_mode(student)


def _zero_masks(parameters: list[Any]) -> list[tuple[Any, Any]]:
    """(weight, keep) for every weight matrix/kernel holding zeros: what unstructured pruning removed."""
    masks = []
    for parameter in parameters:
        if parameter.dim() > 1:
            keep = parameter.detach() != 0
            if not bool(keep.all()):
                masks.append((parameter, keep))
    return masks


def _apply_masks(masks: list[tuple[Any, Any]]) -> None:
    import torch

    with torch.no_grad():
        for parameter, keep in masks:
            parameter.mul_(keep)


def distillation_loss(student_outputs: list[Any], teacher_outputs: list[Any], temperature: float) -> Any:
    """For one (N, classes) output: T^2 * KL(teacher || student) at `temperature`; for any other head:
    MSE normalized by the teacher output's variance, summed over outputs."""
    import torch.nn.functional as F

    if len(student_outputs) != len(teacher_outputs):
        raise DistillConfigError(
            f"distill: student has {len(student_outputs)} outputs, teacher {len(teacher_outputs)}"
        )
    if is_classifier_output(teacher_outputs):
        soft_student = F.log_softmax(student_outputs[0] / temperature, dim=1)
        soft_teacher = F.softmax(teacher_outputs[0] / temperature, dim=1)
        return F.kl_div(soft_student, soft_teacher, reduction="batchmean") * temperature**2
    total = None
    for produced, wanted in zip(student_outputs, teacher_outputs, strict=True):
        if produced.shape != wanted.shape:
            raise DistillConfigError(
                f"distill: student output shape {tuple(produced.shape)} != teacher {tuple(wanted.shape)}"
            )
        term = F.mse_loss(produced.float(), wanted.float()) / (wanted.float().var() + 1e-6)
        total = term if total is None else total + term
    return total


def is_classifier_output(outputs: list[Any]) -> bool:
    return len(outputs) == 1 and outputs[0].dim() == 2 and outputs[0].shape[1] > 1


def _stack_samples(samples: Sequence[Any]) -> tuple[Any, ...]:
    """One tensor per model input, samples stacked along axis 0."""
    import numpy as np
    import torch

    if not samples:
        raise DistillConfigError("distill: no calibration samples to distill on")
    columns: list[list[Any]] = []
    for position, sample in enumerate(samples):
        parts = sample if isinstance(sample, (tuple, list)) else (sample,)
        if not columns:
            columns = [[] for _ in parts]
        if len(parts) != len(columns):
            raise DistillConfigError(
                f"distill: sample {position} has {len(parts)} inputs, the first had {len(columns)}"
            )
        for column, part in zip(columns, parts, strict=True):
            if isinstance(part, np.ndarray):
                part = torch.from_numpy(np.ascontiguousarray(part))
            if not isinstance(part, torch.Tensor):
                raise DistillConfigError(f"distill: sample {position} is {type(part).__name__}, not a tensor")
            column.append(part)
    stacked = []
    for position, column in enumerate(columns):
        shapes = {tuple(t.shape[1:]) for t in column}
        if len(shapes) != 1:
            raise DistillConfigError(
                f"distill: input {position} has samples of different shapes {sorted(shapes)}"
            )
        tensor = torch.cat(column, dim=0)
        stacked.append(tensor.float() if tensor.is_floating_point() else tensor)
    return tuple(stacked)


def _set_train_mode(student: torch.nn.Module) -> None:
    """Train mode with dropout off (the targets are already soft) and BatchNorm frozen.

    BatchNorm keeps the running statistics learnt on the original training set: re-estimated on a few
    calibration photos they describe those photos, not the world (measured on EfficientNet-Lite0: the
    unpruned model's top-1 agreement with itself falls to 0.19 after re-estimating BN on 70 photo crops).
    Its affine weights still learn.
    """
    import torch

    student.train()
    for module in student.modules():
        if isinstance(module, (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm)):
            module.eval()


def _augment(inputs: tuple[Any, ...], generator: torch.Generator) -> tuple[Any, ...]:
    """Random resized crop + horizontal flip + mixup on image-like (N, C, H, W) float inputs only."""
    import torch
    import torch.nn.functional as F

    augmented = []
    for tensor in inputs:
        if tensor.dim() != 4 or not tensor.is_floating_point() or min(tensor.shape[2:]) < 8:
            augmented.append(tensor)
            continue
        count, _, height, width = tensor.shape
        out = torch.empty_like(tensor)
        for i in range(count):
            scale, aspect, flip, fx, fy = torch.rand(5, generator=generator).tolist()
            area = 0.55 + 0.45 * scale
            ratio = math.exp((aspect - 0.5) * 2 * math.log(4 / 3))
            crop_h = max(4, min(height, round(height * math.sqrt(area / ratio))))
            crop_w = max(4, min(width, round(width * math.sqrt(area * ratio))))
            top = round(fy * (height - crop_h))
            left = round(fx * (width - crop_w))
            crop = tensor[i : i + 1, :, top : top + crop_h, left : left + crop_w]
            crop = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
            out[i] = crop[0].flip(-1) if flip < 0.5 else crop[0]
        if count > 1:
            partner = torch.randperm(count, generator=generator)
            weight = 0.4 * torch.rand(count, 1, 1, 1, generator=generator)
            mixed = torch.rand(count, 1, 1, 1, generator=generator) < 0.5
            out = torch.where(mixed, (1 - weight) * out + weight * out[partner], out)
        augmented.append(out)
    return tuple(augmented)


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """The learning-rate factor at a step of `steps`: a short warm-up (5 %), then cosine to zero."""
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return schedule


class HeldOutBest:
    """The checkpoint that did best on held-out samples: `offer(step, loss, model)` copies the weights
    when `loss` is the lowest so far (step 0, the untrained student, included); `restore(model)` loads
    them and returns their step. `scores` lists every (step, loss) offered."""

    def __init__(self) -> None:
        self.scores: list[tuple[int, float]] = []
        self._best: tuple[float, int, dict[str, Any] | None] = (math.inf, 0, None)

    def offer(self, step: int, loss: float, model: torch.nn.Module) -> bool:
        self.scores.append((step, loss))
        if loss < self._best[0]:
            self._best = (loss, step, copy.deepcopy(model.state_dict()))
            return True
        return False

    def restore(self, model: torch.nn.Module) -> int:
        if self._best[2] is not None:
            model.load_state_dict(self._best[2])
        return self._best[1]
