"""Label-free knowledge distillation: recover a pruned student from its unpruned fp32 teacher.

Users bring a handful of calibration inputs, not a labelled training set, so the teacher's outputs are
the targets: KL divergence of temperature-softened class distributions for classifiers (scaled by T^2 so
gradients keep their size), a variance-normalized MSE for any other head, and optionally the same MSE on
intermediate features the pruning left the same shape (`feature_weight`). Few images are stretched with
random resized crops, flips, colour changes and mixup/cutmix; teacher and student always see the same
augmented batch ("a good teacher is patient and consistent", Beyer et al. 2022). The student trains in
eval mode: BatchNorm keeps its statistics, and dropout or stochastic depth written as plain functions
(EfficientNet's drop_connect) stays off, so the function trained is the one exported.

Training runs for `steps` or until `budget_s` seconds are spent, whichever comes first, on a cosine
schedule over that span; `patience` stops it early once the held-out loss stopped improving.

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
    steps: int = 0  # steps run (fewer than asked when the budget ran out or patience stopped it)
    stopped: str = "steps"  # "steps", "budget" or "patience": what ended training
    feature_layers: list[str] = field(default_factory=list)  # intermediate outputs matched


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
    budget_s: float | None = None,
    patience: int | None = None,
    feature_weight: float = 0.0,
    held_out_views: int = 0,
    strong_augment: bool = True,
    raw_share: float = 0.5,
) -> DistillResult:
    """Train `student` (in place) to reproduce `teacher` on `samples`; deterministic for a given seed
    when no `budget_s` is set.

    `samples` holds input tensors (torch or numpy), each a batch of one or several stacked samples; a
    multi-input model takes a tuple per entry, in the model's input order. `keep_zeros` (after
    unstructured pruning) holds every weight that is exactly zero at the start at zero, so training
    recovers accuracy with the surviving weights instead of re-densifying the model. `held_out` is the
    share of samples kept aside to choose the best of `evaluations` checkpoints (none with fewer than 5
    samples: then the last step is kept); `held_out_views` adds that many fixed augmented views of each
    held-out sample to the check. `budget_s` caps the wall time (the schedule then runs over the
    budget); `patience` stops once that many checkpoints in a row did not improve on the best.
    `raw_share` of each batch is left un-augmented (with many distinct samples, augmentation alone moved
    the digits CNN 3 points off its own test set).
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
    if budget_s is not None and not (math.isfinite(budget_s) and budget_s > 0):
        raise DistillConfigError(f"--distill-time: expected a positive duration, got {budget_s!r} s")
    pool = stack_samples(samples)
    started = time.perf_counter()
    losses: list[float] = []
    if steps == 0:
        student.eval()
        return DistillResult(model=student, losses=losses, seconds=0.0)

    teacher.eval()  # its parameters are left as they are: it runs under no_grad only
    pool, check = split_held_out(pool, held_out, seed, held_out_views, strong_augment)
    count = pool[0].shape[0]
    batch = min(batch_size, count) if not augment else batch_size
    scores: list[tuple[int, float]] = []
    best: tuple[float, int, dict[str, Any] | None] = (math.inf, 0, None)
    since_best = 0

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        student.eval()  # see the module docstring: the exported function is the one trained
        # A pruned copy of a frozen teacher inherits requires_grad=False: the whole student learns.
        trainable = [p.requires_grad_(True) for p in student.parameters() if p.is_floating_point()]
        masks = _zero_masks(trainable) if keep_zeros else []
        optimizer = torch.optim.Adam(trainable, lr=lr)
        features = _FeaturePairs(student, teacher, pool) if feature_weight > 0 else None
        teacher_check = teacher_outputs(teacher, check) if check else []
        warmup = max(1, steps // 20)

        def progress(step: int) -> float:
            """How far through training `step` steps are: by steps, or by time when that is shorter."""
            done = step / steps
            if budget_s is not None:
                done = max(done, (time.perf_counter() - started) / budget_s)
            return min(1.0, done)

        def checkpoint(step: int) -> None:
            nonlocal best, since_best
            if not check:
                return
            score = held_out_loss(student, teacher_check, check, temperature)
            scores.append((step, score))
            if score < best[0]:
                best, since_best = (score, step, copy.deepcopy(student.state_dict())), 0
            else:
                since_best += 1

        checkpoint(0)
        checks_done, stopped, step = 0, "steps", 0
        try:
            for step in range(1, steps + 1):
                done = progress(step - 1)
                # warm-up over the first 5 % (of the steps, or of the budget), then cosine to zero
                warm = min(1.0, max(step / warmup, done / 0.05))
                factor = warm * 0.5 * (1.0 + math.cos(math.pi * done))
                for group in optimizer.param_groups:
                    group["lr"] = lr * factor
                index = torch.randint(0, count, (batch,), generator=generator)
                inputs = tuple(tensor[index] for tensor in pool)
                if augment:
                    inputs = augment_share(inputs, generator, strong_augment, raw_share)
                with torch.no_grad():
                    targets = flatten_outputs(teacher(*inputs))
                    wanted = features.take_teacher() if features is not None else []
                loss = distillation_loss(flatten_outputs(student(*inputs)), targets, temperature)
                if features is not None:
                    loss = loss + feature_weight * features.loss(wanted)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                _apply_masks(masks)
                value = float(loss.detach())
                losses.append(value)
                if on_step is not None:
                    on_step(step - 1, value)
                done = progress(step)
                if step == steps or done >= 1.0 or done * evaluations >= checks_done + 1:
                    checks_done = int(done * evaluations + 1e-9)
                    checkpoint(step)
                    if done >= 1.0 and step < steps:
                        stopped = "budget"
                        break
                    if patience is not None and since_best >= patience:
                        stopped = "patience"
                        break
        finally:
            if features is not None:
                features.close()
    best_step = step
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
        steps=len(losses),
        stopped=stopped,
        feature_layers=features.names if features is not None else [],
    )


def split_held_out(
    pool: tuple[Any, ...], share: float, seed: int, views: int, strong_augment: bool
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(training pool, held-out check) from stacked samples: `share` of them (none with fewer than 5)
    set aside in a seeded order, plus `views` fixed augmented views of each held-out sample."""
    import torch

    total = pool[0].shape[0]
    kept_aside = int(total * share) if total >= 5 and share > 0 else 0
    if not kept_aside:
        return pool, ()
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed + 1))
    check = tuple(tensor[order[:kept_aside]] for tensor in pool)
    pool = tuple(tensor[order[kept_aside:]] for tensor in pool)
    if views > 0:
        generator = torch.Generator().manual_seed(seed + 2)
        extra = [_augment(check, generator, strong_augment) for _ in range(views)]
        check = tuple(torch.cat([part, *(view[i] for view in extra)]) for i, part in enumerate(check))
    return pool, check


def teacher_outputs(teacher: Any, inputs: tuple[Any, ...]) -> list[Any]:
    import torch

    with torch.no_grad():
        return flatten_outputs(teacher(*inputs))


class _FeaturePairs:
    """Intermediate outputs of the blocks (children of a Sequential/ModuleList) that the pruning left the
    same shape in student and teacher (on EfficientNet the residual streams, which are kept whole): their
    variance-normalized MSE guides the student's inside, not only its logits."""

    def __init__(self, student: Any, teacher: Any, pool: tuple[Any, ...]) -> None:
        import torch

        self._student: dict[str, Any] = {}
        self._teacher: dict[str, Any] = {}
        self._handles: list[Any] = []
        probe = tuple(tensor[:1] for tensor in pool)
        student_blocks, teacher_blocks = dict(_blocks(student)), dict(_blocks(teacher))
        names = [name for name in student_blocks if name in teacher_blocks]
        self._hook(student_blocks, names, self._student)
        self._hook(teacher_blocks, names, self._teacher)
        with torch.no_grad():
            final = flatten_outputs(student(*probe))
            teacher(*probe)
        finals = {tuple(t.shape) for t in final}
        self.names = [
            name
            for name in names
            if name in self._student
            and name in self._teacher
            and self._student[name].shape == self._teacher[name].shape
            and tuple(self._student[name].shape) not in finals
        ]
        self._student.clear()
        self._teacher.clear()

    def _hook(self, modules: dict[str, Any], names: list[str], store: dict[str, Any]) -> None:
        import torch

        for name in names:

            def record(_module: Any, _args: Any, output: Any, name: str = name) -> None:
                if isinstance(output, torch.Tensor):
                    store[name] = output

            self._handles.append(modules[name].register_forward_hook(record))

    def take_teacher(self) -> list[Any]:
        wanted = [self._teacher[name].detach() for name in self.names]
        self._teacher.clear()
        return wanted

    def loss(self, wanted: list[Any]) -> Any:
        import torch
        import torch.nn.functional as F

        produced = [self._student[name] for name in self.names]
        self._student.clear()
        if not produced:
            return torch.zeros(())
        terms = [F.mse_loss(p, w) / (w.var() + 1e-6) for p, w in zip(produced, wanted, strict=True)]
        return torch.stack(terms).mean()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _blocks(model: Any) -> list[tuple[str, Any]]:
    """(name, module) of every direct child of a Sequential or ModuleList: a network's blocks."""
    import torch

    found = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Sequential, torch.nn.ModuleList)):
            found += [(f"{name}.{child}" if name else child, sub) for child, sub in module.named_children()]
    return found


def held_out_loss(student: Any, wanted: list[Any], inputs: tuple[Any, ...], temperature: float) -> float:
    """The distillation loss on samples never trained on (the teacher's outputs `wanted` computed once)."""
    import torch

    with torch.no_grad():
        return float(distillation_loss(flatten_outputs(student(*inputs)), wanted, temperature))


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


def stack_samples(samples: Sequence[Any]) -> tuple[Any, ...]:
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


def augment_share(
    inputs: tuple[Any, ...], generator: torch.Generator, strong: bool, raw_share: float
) -> tuple[Any, ...]:
    """`_augment` on the batch, except its first `raw_share` which stays as the samples are."""
    import torch

    raw = round(inputs[0].shape[0] * raw_share)
    if raw <= 0:
        return _augment(inputs, generator, strong)
    changed = _augment(tuple(tensor[raw:] for tensor in inputs), generator, strong)
    return tuple(torch.cat([tensor[:raw], part]) for tensor, part in zip(inputs, changed, strict=True))


def _augment(inputs: tuple[Any, ...], generator: torch.Generator, strong: bool = True) -> tuple[Any, ...]:
    """Random resized crop + horizontal flip + mixup on image-like (N, C, H, W) float inputs only; `strong`
    widens the crops (25-100 % of the area, not 55-100 %), changes brightness, contrast and colour balance,
    and mixes half the batch by cutmix instead of mixup. Other inputs pass through unchanged."""
    import torch
    import torch.nn.functional as F

    augmented = []
    smallest_area = 0.25 if strong else 0.55
    for tensor in inputs:
        if tensor.dim() != 4 or not tensor.is_floating_point() or min(tensor.shape[2:]) < 8:
            augmented.append(tensor)
            continue
        count, _, height, width = tensor.shape
        out = torch.empty_like(tensor)
        for i in range(count):
            scale, aspect, flip, fx, fy = torch.rand(5, generator=generator).tolist()
            area = smallest_area + (1 - smallest_area) * scale
            ratio = math.exp((aspect - 0.5) * 2 * math.log(4 / 3))
            crop_h = max(4, min(height, round(height * math.sqrt(area / ratio))))
            crop_w = max(4, min(width, round(width * math.sqrt(area * ratio))))
            top = round(fy * (height - crop_h))
            left = round(fx * (width - crop_w))
            crop = tensor[i : i + 1, :, top : top + crop_h, left : left + crop_w]
            crop = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
            out[i] = crop[0].flip(-1) if flip < 0.5 else crop[0]
        if strong:
            out = _jitter_colour(out, generator)
        if count > 1:
            partner = torch.randperm(count, generator=generator)
            weight = 0.4 * torch.rand(count, 1, 1, 1, generator=generator)
            mixed = torch.rand(count, 1, 1, 1, generator=generator) < 0.5
            blended = (1 - weight) * out + weight * out[partner]
            if strong:
                cut = torch.rand(count, 1, 1, 1, generator=generator) < 0.5
                blended = torch.where(cut, _cutmix(out, out[partner], generator), blended)
            out = torch.where(mixed, blended, out)
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


def _jitter_colour(images: Any, generator: torch.Generator) -> Any:
    """Per image: brightness shift and contrast scale in units of the batch's own spread (the inputs are
    already normalized, to whatever mean/std the model uses), and for 3 channels a colour-balance gain."""
    import torch

    count, channels = images.shape[:2]
    spread = images.std().clamp_min(1e-6)
    shift = (torch.rand(count, 1, 1, 1, generator=generator) - 0.5) * 0.4 * spread
    contrast = 0.7 + 0.6 * torch.rand(count, 1, 1, 1, generator=generator)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    out = (images - mean) * contrast + mean + shift
    if channels == 3:
        gain = 0.9 + 0.2 * torch.rand(count, 3, 1, 1, generator=generator)
        channel_mean = out.mean(dim=(2, 3), keepdim=True)
        out = (out - channel_mean) * gain + channel_mean * (0.5 + 0.5 * gain)
    return out


def _cutmix(images: Any, partners: Any, generator: torch.Generator) -> Any:
    """Each image with one rectangle (10-50 % of its area) pasted from its partner."""
    import torch

    count, _, height, width = images.shape
    out = images.clone()
    for i in range(count):
        area, aspect, fx, fy = torch.rand(4, generator=generator).tolist()
        share = 0.1 + 0.4 * area
        ratio = math.exp((aspect - 0.5) * math.log(2))
        box_h = max(1, min(height, round(height * math.sqrt(share / ratio))))
        box_w = max(1, min(width, round(width * math.sqrt(share * ratio))))
        top, left = round(fy * (height - box_h)), round(fx * (width - box_w))
        out[i, :, top : top + box_h, left : left + box_w] = partners[
            i, :, top : top + box_h, left : left + box_w
        ]
    return out
