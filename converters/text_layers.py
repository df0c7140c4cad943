"""`--prune-layers RATIO` for transformer encoders: keep a subset of the encoder layers, then distil the
smaller model from the full one on the user's unlabelled texts (`--calib texts.txt`).

The student is DistilBERT's and MiniLM's recipe: the teacher itself with fewer layers, each kept layer
initialised with the teacher's weights (the embeddings and pooling/classifier head too). The layers kept
are spread evenly and include the last one (`select_layers`: 6 layers at 0.5 keep 1, 3, 5), so student
layer j starts as teacher layer `kept[j]` and is trained to reproduce that layer's output.

Distillation (label-free, the teacher's outputs are the targets) minimises, on the tokens the attention
mask keeps:
- the hidden-state loss: MSE between student layer j's output and teacher layer `kept[j]`'s, divided by
  the teacher's variance, averaged over the kept layers;
- the output loss: for embeddings 1 - cosine to the teacher's pooled embedding (what the gate scores)
  plus its variance-normalised MSE; for classifiers the temperature-softened KL of `distill.py`.
It stops at `budget_s` seconds, at `max_steps`, or early when the loss on held-out texts (a fifth of the
calibration texts, at most `MAX_HELD_OUT`, never trained on) has not improved for `patience` checkpoints; the student kept is
the checkpoint best on those held-out texts, the untrained one included (`distill.HeldOutBest`, shared
with image distillation), so distilling never leaves it worse than plain layer dropping.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from converters.distill import HeldOutBest, distillation_loss, warmup_cosine
from converters.huggingface import HuggingFaceSource, pool_hidden, transformers_model, with_model
from edge.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from edge.processing.text import TextPreprocessor

COSINE_WEIGHT = 10.0  # 1 - cosine is ~0.05 where the normalised MSEs are ~0.5: weigh what the gate scores
MIN_HELD_OUT = 5
# The held-out loss is computed a dozen times inside the time budget (student and, once, teacher forward
# passes): 256 texts tell one checkpoint from another, while a fifth of 20,000 texts would spend most of a
# 900 s budget on it on 2 cores (a teacher forward pass is ~0.1 s a text there under load).
MAX_HELD_OUT = 256


def select_layers(total: int, ratio: float) -> list[int]:
    """Indices of the layers kept when `ratio` of `total` are dropped: evenly spread, the last included."""
    if not 0 < ratio < 1:
        raise ConfigError(f"--prune-layers {ratio}: must be in (0, 1)")
    keep = max(1, round(total * (1.0 - ratio)))
    return sorted({round((i + 1) * total / keep) - 1 for i in range(keep)})


def _encoder_layers(model: torch.nn.Module, total: int) -> tuple[torch.nn.Module, str]:
    """(parent module, attribute) of the ModuleList holding the `total` encoder layers."""
    import torch

    for _, module in model.named_modules():
        for name, child in module.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == total:
                return module, name
    raise ConfigError(f"--prune-layers: no list of {total} encoder layers found in {type(model).__name__}")


def layer_count(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layers", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError(f"--prune-layers: {type(model).__name__}'s config names no layer count")


def drop_layers(model: torch.nn.Module, kept: Sequence[int]) -> torch.nn.Module:
    """A copy of `model` with only the encoder layers `kept` (teacher weights), its config updated."""
    import torch

    total = layer_count(model)
    student = copy.deepcopy(model)
    parent, name = _encoder_layers(student, total)
    layers = getattr(parent, name)
    setattr(parent, name, torch.nn.ModuleList([layers[i] for i in kept]))
    for key in ("num_hidden_layers", "n_layers", "num_layers"):
        if isinstance(getattr(student.config, key, None), int):
            setattr(student.config, key, len(kept))
    for position, layer in enumerate(getattr(parent, name)):
        for module in layer.modules():  # layers that know their index (caches) are renumbered
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    return student.eval()


@dataclass
class LayerDistillResult:
    source: HuggingFaceSource  # the student, wrapped for export like the teacher
    kept: list[int]
    layers_before: int
    params_before: int
    params_after: int
    steps: int = 0
    seconds: float = 0.0
    stopped: str = "steps"  # steps | budget | early-stop
    losses: list[float] = field(default_factory=list)
    held_out: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out output loss)
    best_step: int = 0
    train_texts: int = 0
    held_out_texts: int = 0

    def record(self, ratio: float, lr: float, budget_s: float) -> dict[str, object]:
        """The manifest's `pruning` entry."""
        return {
            "mode": "layers",
            "ratio": ratio,
            "layers_before": self.layers_before,
            "layers_after": len(self.kept),
            "kept_layers": list(self.kept),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "distillation": {
                "steps": self.steps,
                "lr": lr,
                "budget_s": budget_s,
                "seconds": round(self.seconds, 1),
                "stopped": self.stopped,
                "samples": self.train_texts,
                "held_out_samples": self.held_out_texts,
                "loss_first": round(self.losses[0], 6) if self.losses else None,
                "loss_last": round(self.losses[-1], 6) if self.losses else None,
                "best_step": self.best_step,
                "held_out_loss": {str(step): round(loss, 6) for step, loss in self.held_out},
            },
        }


def _params(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def prune_and_distill(
    teacher: HuggingFaceSource,
    pre: TextPreprocessor,
    texts: list[str],
    ratio: float,
    *,
    budget_s: float,
    max_steps: int = 0,
    lr: float = 1e-4,
    batch_size: int = 16,
    held_out: float = 0.2,
    evaluations: int = 12,
    patience: int = 4,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> LayerDistillResult:
    """Drop `ratio` of the teacher's encoder layers and distil the rest (see the module docstring);
    deterministic for a seed apart from where the time budget cuts."""
    import torch

    if budget_s <= 0 and max_steps <= 0:
        raise ConfigError("--prune-layers: give a distillation time budget or --distill-steps")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--distill-lr: expected a positive number, got {lr!r}")
    model = transformers_model(teacher).eval()
    total = layer_count(model)
    kept = select_layers(total, ratio)
    if len(kept) == total:
        raise ConfigError(f"--prune-layers {ratio}: drops none of the {total} layers; give a larger ratio")
    student = drop_layers(model, kept)
    result = LayerDistillResult(
        source=with_model(teacher, student),
        kept=kept,
        layers_before=total,
        params_before=_params(model),
        params_after=_params(student),
    )
    order = np.random.default_rng(seed).permutation(len(texts))
    aside = min(int(len(texts) * held_out), MAX_HELD_OUT) if len(texts) >= 2 * MIN_HELD_OUT else 0
    check = [texts[i] for i in order[:aside]]
    train = [texts[i] for i in order[aside:]]
    result.train_texts, result.held_out_texts = len(train), len(check)
    if not train:
        raise ConfigError("--prune-layers: no calibration texts to distil on")
    steps_cap = max_steps if max_steps > 0 else 1 << 30
    started = time.perf_counter()
    names = teacher.input_names

    def batch_of(chosen: list[str]) -> dict[str, torch.Tensor]:
        length = max(pre.bucket(len(pre.tokenizer.encode(t).ids)) for t in chosen)
        feeds = [pre.encode(t, length=length) for t in chosen]
        return {n: torch.from_numpy(np.concatenate([f[n] for f in feeds])) for n in names}

    # Training batches are drawn from one length bucket at a time: one long sentence pads a whole batch,
    # so 16 random sentences of the large test corpus are padded to 82 tokens on average against 36 for
    # batches of one bucket (their mean length is 26): mixed batches spent over half of each step on
    # padding. A bucket is picked in proportion to the batches it fills (a bucket smaller than a batch
    # gives a smaller one), so every text is as likely to be drawn as in a mixed batch.
    by_bucket: dict[int, list[str]] = {}
    for text in train:
        by_bucket.setdefault(pre.bucket(len(pre.tokenizer.encode(text).ids)), []).append(text)
    groups = [by_bucket[length] for length in sorted(by_bucket)]
    batches_in = np.array([len(g) / min(batch_size, len(g)) for g in groups])
    group_share = batches_in / batches_in.sum()
    check_batches = [batch_of(check[i : i + 32]) for i in range(0, len(check), 32)]
    with torch.no_grad():  # only the served output is scored: the hidden states need not be kept
        check_targets = [_forward(model, teacher, b)[1] for b in check_batches]

    def held_out_loss() -> float:
        with torch.no_grad():
            losses = [
                float(_output_loss(_forward(student, teacher, b)[1], target, teacher))
                for b, target in zip(check_batches, check_targets, strict=True)
            ]
        return float(np.mean(losses))

    best = HeldOutBest()
    stale = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = np.random.default_rng(seed + 1)
        trainable = [p.requires_grad_(True) for p in student.parameters() if p.is_floating_point()]
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        schedule = warmup_cosine(100)  # over the share of the budget (time or steps) spent, in percent
        if check:
            best.offer(0, held_out_loss(), student)
        next_check, step = 1, 0
        while True:
            elapsed = time.perf_counter() - started
            progress = max(step / steps_cap, elapsed / budget_s if budget_s > 0 else 0.0)
            if progress >= 1.0:
                result.stopped = "steps" if step >= steps_cap else "budget"
                break
            for group in optimizer.param_groups:
                group["lr"] = lr * schedule(min(99, int(progress * 100)))
            pool = groups[int(generator.choice(len(groups), p=group_share))]
            chosen = [pool[i] for i in generator.integers(0, len(pool), min(batch_size, len(pool)))]
            batch = batch_of(chosen)
            with torch.no_grad():
                target_hidden, target_out = _forward(model, teacher, batch)
            hidden, out = _forward(student, teacher, batch)
            mask = batch.get("attention_mask")
            loss = _hidden_loss(hidden, [target_hidden[i] for i in kept], mask) + _output_loss(
                out, target_out, teacher
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            result.losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, result.losses[-1])
            if check and progress * evaluations >= next_check:
                next_check = int(progress * evaluations) + 1
                stale = 0 if best.offer(step, held_out_loss(), student) else stale + 1
                if stale >= patience:
                    result.stopped = "early-stop"
                    break
    if check and (not best.scores or best.scores[-1][0] != step):
        best.offer(step, held_out_loss(), student)
    result.best_step = best.restore(student) if check else step
    result.held_out = list(best.scores)
    result.steps = step
    result.seconds = time.perf_counter() - started
    student.eval()
    return result


def _forward(
    model: torch.nn.Module, source: HuggingFaceSource, batch: dict[str, torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(output of every encoder layer, the served output: pooled embedding or logits)."""
    outputs = model(**batch, output_hidden_states=True)
    layers = list(outputs.hidden_states[1:])
    if source.pooling is None:
        return layers, outputs.logits
    return layers, pool_hidden(outputs.hidden_states[-1], batch.get("attention_mask"), source.pooling)


def _hidden_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor | None
) -> torch.Tensor:
    total = None
    for produced, wanted in zip(student, teacher, strict=True):
        keep = (mask.unsqueeze(-1) > 0) if mask is not None else None
        diff = (produced - wanted) ** 2
        if keep is not None:
            counted = keep.sum().clamp(min=1) * produced.shape[-1]
            mse = (diff * keep).sum() / counted
            variance = (((wanted - (wanted * keep).sum() / counted) ** 2) * keep).sum() / counted
        else:
            mse, variance = diff.mean(), wanted.var()
        term = mse / (variance + 1e-6)
        total = term if total is None else total + term
    assert total is not None
    return total / len(student)


def _output_loss(produced: torch.Tensor, wanted: torch.Tensor, source: HuggingFaceSource) -> torch.Tensor:
    import torch.nn.functional as F

    if source.pooling is None:  # logits
        return distillation_loss([produced], [wanted], temperature=2.0)
    cosine = F.cosine_similarity(produced, wanted, dim=-1).mean()
    return COSINE_WEIGHT * (1.0 - cosine) + F.mse_loss(produced, wanted) / (wanted.var() + 1e-6)
