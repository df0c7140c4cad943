"""Pruning stage of `edge-convert`: structured (channels really removed) or unstructured (zeros only).

Structured pruning uses torch-pruning's dependency graph so that every layer that consumes a pruned
channel (BatchNorm, depthwise convs, residual adds, concatenations) is cut consistently; the exported
graph is then really smaller and faster. Unstructured L1 pruning only zeroes weights: the file
compresses better but dense kernels run exactly as fast as before, and the result says so.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from converters.torch_outputs import flatten_outputs
from edge.errors import ConfigError

if TYPE_CHECKING:
    import torch

MAX_RATIO = 0.95
PruneMode = Literal["structured", "unstructured"]


class PruneConfigError(ConfigError, ValueError):
    """A pruning option is out of range (a ConfigError for the CLI, a ValueError for library callers)."""


@dataclass
class PruneResult:
    model: Any  # torch.nn.Module, eval mode
    mode: str
    ratio: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    nonzero_params_after: int
    sparsity: float = 0.0  # zeros among Conv/Linear weights (`weight_sparsity`)
    weights_gzip_bytes_before: int = 0
    weights_gzip_bytes_after: int = 0
    kept_layers: list[str] = field(default_factory=list)  # output layers left whole
    notes: list[str] = field(default_factory=list)  # honest one-liners for the report

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def gzip_ratio(self) -> float:
        if not self.weights_gzip_bytes_before:
            return 1.0
        return self.weights_gzip_bytes_after / self.weights_gzip_bytes_before


def validate_prune_options(ratio: float, mode: str, round_to: int = 8) -> None:
    if mode not in ("structured", "unstructured"):
        raise PruneConfigError(f"--prune-mode: expected 'structured' or 'unstructured', got {mode!r}")
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= MAX_RATIO:
        raise PruneConfigError(f"--prune: ratio must be within [0, {MAX_RATIO}], got {ratio!r}")
    if not isinstance(round_to, int) or round_to < 1:
        raise PruneConfigError(f"--prune round_to: expected a positive integer, got {round_to!r}")


def prune_model(
    model: torch.nn.Module,
    example_inputs: Any,
    ratio: float,
    mode: PruneMode,
    round_to: int = 8,
    calibration: list[Any] | None = None,
    group_ratios: Mapping[str, float] | None = None,
    saliency: Saliency | None = None,
) -> PruneResult:
    """Prune a copy of `model`; the original is left untouched.

    `example_inputs` is one tensor or a tuple of tensors (a batch of one is enough) used to trace the
    dependency graph and count MACs. `calibration` (batches shaped like `example_inputs`) lets structured
    pruning fold what each removed channel contributed on average into the next layer's bias.
    `group_ratios` (structured only) gives channel groups, named by their root layer as
    `channel_groups` lists them, their own ratio; the groups it does not name get `ratio`.
    `saliency`: `measure_saliency(model, calibration)` measured once, for callers that prune one model
    many ways (it replaces `calibration`, which it was measured on).
    """
    import copy

    import torch
    import torch_pruning as tp

    validate_prune_options(ratio, mode, round_to)
    for value in (group_ratios or {}).values():
        validate_prune_options(value, mode, round_to)
    if group_ratios and mode != "structured":
        raise PruneConfigError("prune: per-group ratios need structured pruning")
    inputs = _as_input_tuple(example_inputs)
    pruned = copy.deepcopy(model).eval()

    with torch.no_grad():
        reference_outputs = flatten_outputs(pruned(*inputs))
    macs_before, params_before = _count(pruned, inputs)
    gzip_before = weights_gzip_bytes(pruned)
    kept = _output_layers(pruned, inputs, reference_outputs)
    notes: list[str] = []
    numel_before = sum(p.numel() for p in pruned.parameters())

    if mode == "structured" and (ratio > 0 or any(r > 0 for r in (group_ratios or {}).values())):
        ignored = [module for _, module in kept]
        plan = plan_structured(tp, pruned, inputs, float(ratio), round_to, ignored, group_ratios)
        means: dict[Any, Any] = {}
        if plan.ratios:
            if saliency is None and calibration:
                saliency = measure_saliency(pruned, calibration)
            modules = dict(pruned.named_modules())
            if saliency is not None:
                means = {modules[name]: mean for name, mean in saliency.channel_means.items()}
            importance: Any = tp.importance.MagnitudeImportance(p=1)
            if saliency is not None:
                # Which channels the outputs depend on, measured on real inputs, not guessed from weight size.
                importance = tp.importance.GroupTaylorImportance()
                for name, parameter in pruned.named_parameters():
                    gradient = saliency.gradients.get(name)
                    parameter.grad = None if gradient is None else gradient.clone()
            pruner = tp.pruner.MagnitudePruner(
                pruned,
                inputs if len(inputs) > 1 else inputs[0],
                importance=importance,
                pruning_ratio=0.0,
                pruning_ratio_dict=plan.ratios,
                ignored_layers=[module for _, module in kept],
            )
            for group in pruner.step(interactive=True):
                for dep, indices in group:
                    if pruner.DG.is_in_channel_pruning_fn(dep.handler) and dep.target.module in means:
                        _fold_removed_inputs_into_bias(dep.target.module, indices, means[dep.target.module])
                group.prune()
            for parameter in pruned.parameters():
                parameter.grad = None
        removed_any = sum(p.numel() for p in pruned.parameters()) < numel_before
        if removed_any:
            notes.append(
                f"structured: whole channels removed from {len(plan.ratios)} channel groups, each left with "
                f"a multiple of {round_to} channels (rounded up: never more removed than asked); the "
                "exported graph is smaller and runs faster"
            )
        else:
            asked = f"ratio {ratio}" if not group_ratios else "the ratios asked"
            notes.append(
                f"structured: nothing removed: at {asked} every channel group keeps all its channels "
                f"once rounded up to a multiple of {round_to} (the device profile's channel_multiple); "
                "ask for a larger --prune"
            )
        if saliency is not None and removed_any:
            notes.append(
                "structured: channels ranked by first-order Taylor saliency |w * dL/dw| on the calibration "
                "samples (L: cross-entropy to the model's own top-1, or output energy for other heads)"
            )
        if means and removed_any:
            notes.append(
                "structured: each removed channel's mean activation on the calibration samples is folded "
                "into the next layer's bias (the BatchNorm offset it carried is not simply lost)"
            )
        if plan.residual_groups:
            notes.append(
                f"structured: {plan.residual_groups} residual streams left whole (channels shared by several "
                "layers through additions; one channel there feeds every block of a stage)"
            )
        if plan.too_narrow:
            notes.append(f"structured: {plan.too_narrow} groups too narrow to lose a multiple of {round_to}")
    elif ratio > 0:
        # Shapes do not change, so output layers are thinned too: `ratio` is the real weight sparsity.
        _unstructured_l1(pruned, float(ratio))
        kept = []
        notes.append(
            "unstructured: weights zeroed in place, tensor shapes unchanged; smaller only once compressed, "
            "no speed-up with dense kernels"
        )
    pruned.eval()

    with torch.no_grad():
        new_outputs = flatten_outputs(pruned(*inputs))
    old_shapes = [tuple(t.shape) for t in reference_outputs]
    new_shapes = [tuple(t.shape) for t in new_outputs]
    if old_shapes != new_shapes:
        raise PruneConfigError(
            f"pruning changed the model's output shapes {old_shapes} -> {new_shapes}; "
            "its output layers could not be identified to keep them whole"
        )

    macs_after, params_after = _count(pruned, inputs)
    if mode == "unstructured":
        macs_after = macs_before  # dense kernels multiply the zeros too
    return PruneResult(
        model=pruned,
        mode=mode,
        ratio=float(ratio),
        macs_before=macs_before,
        macs_after=macs_after,
        params_before=params_before,
        params_after=params_after,
        nonzero_params_after=sum(int(p.count_nonzero()) for p in pruned.parameters()),
        sparsity=weight_sparsity(pruned),
        weights_gzip_bytes_before=gzip_before,
        weights_gzip_bytes_after=weights_gzip_bytes(pruned),
        kept_layers=[name for name, _ in kept],
        notes=notes,
    )


@dataclass
class StructuredPlan:
    ratios: dict[Any, float]  # root module -> fraction of its channels to remove
    residual_groups: int = 0
    too_narrow: int = 0


@dataclass
class ChannelGroup:
    """One set of channels structured pruning cuts together, as `plan_structured` sees it."""

    root: str  # the layer torch-pruning roots the group at: the key of `prune_model(group_ratios=...)`
    channels: int
    writers: list[str]  # the Conv/Linear layers whose output channels the group removes, in model order


def channel_groups(model: torch.nn.Module, example_inputs: Any) -> list[ChannelGroup]:
    """The channel groups structured pruning may cut (output layers and residual streams left out)."""
    import torch
    import torch_pruning as tp

    inputs = _as_input_tuple(example_inputs)
    model = model.eval()
    with torch.no_grad():
        outputs = flatten_outputs(model(*inputs))
    ignored = [module for _, module in _output_layers(model, inputs, outputs)]
    names = {module: name for name, module in model.named_modules()}
    order = {name: index for index, name in enumerate(names.values())}
    groups = []
    for graph, group, root, channels, writers in _prunable_groups(tp, model, inputs, ignored):
        if writers > 1:
            continue  # a residual stream: plan_structured leaves it whole
        layers = {
            names[dep.target.module]
            for dep, _ in group
            if graph.is_out_channel_pruning_fn(dep.handler)
            and isinstance(dep.target.module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))
        }
        groups.append(ChannelGroup(names[root], channels, sorted(layers, key=order.__getitem__)))
    return groups


def plan_structured(
    tp: Any,
    model: torch.nn.Module,
    inputs: tuple[Any, ...],
    ratio: float,
    round_to: int,
    ignored: list[Any],
    group_ratios: Mapping[str, float] | None = None,
) -> StructuredPlan:
    """Per channel group, how many channels to remove (`group_ratios[root name]`, else `ratio`).

    torch-pruning's own `round_to` rounds the kept channels *down*, so a 16-channel layer asked to lose
    10 % loses half; here the kept count is rounded *up* to a multiple of `round_to` instead. Groups
    coupled through residual additions (several full convolutions write the same channels) are left
    whole: removing one channel there changes every block of the stage at once (measured on
    EfficientNet-Lite0: one residual channel of 40 alone drops the output cosine to 0.90).
    """
    names = {module: name for name, module in model.named_modules()}
    plan = StructuredPlan(ratios={})
    for _graph, _group, root, channels, writers in _prunable_groups(tp, model, inputs, ignored):
        if writers > 1:
            plan.residual_groups += 1
            continue
        asked = (group_ratios or {}).get(names[root], ratio)
        if asked <= 0:
            continue
        kept_channels = kept_channel_count(channels, asked, round_to)
        if kept_channels >= channels:
            plan.too_narrow += 1
            continue
        # tp keeps int(channels * (1 - r)); the half channel absorbs float error in that product.
        plan.ratios[root] = (channels - kept_channels - 0.5) / channels
    return plan


def kept_channel_count(channels: int, ratio: float, round_to: int) -> int:
    """Channels a group of `channels` keeps at `ratio`: rounded up to a multiple of `round_to`."""
    wanted_kept = channels - int(channels * ratio)
    return min(channels, -(-wanted_kept // round_to) * round_to)


def _prunable_groups(
    tp: Any, model: torch.nn.Module, inputs: tuple[Any, ...], ignored: list[Any]
) -> list[tuple[Any, Any, Any, int, int]]:
    """(graph, group, root module, its output channels, how many full layers write them) per channel
    group of the dependency graph; residual streams (writers > 1) included, for the caller to count."""
    import torch

    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=inputs if len(inputs) > 1 else inputs[0]
    )
    found = []
    for group in graph.get_all_groups(
        ignored_layers=ignored, root_module_types=(torch.nn.modules.conv._ConvNd, torch.nn.Linear)
    ):
        writers = [
            dep.target.module
            for dep, _ in group
            if graph.is_out_channel_pruning_fn(dep.handler) and _is_full_layer(dep.target.module)
        ]
        root = group[0].dep.target.module
        channels = graph.get_out_channels(root)
        if channels:
            found.append((graph, group, root, int(channels), len(writers)))
    return found


@dataclass
class Saliency:
    """What structured pruning measures on the calibration samples before it cuts. It depends on the
    unpruned model alone, so a search that prunes one model many ways measures it once (on
    EfficientNet-Lite0 and 64 samples it is most of a prune: about 10 s of 16 on 2 cores)."""

    channel_means: dict[str, Any]  # layer name -> mean of each of its input channels
    gradients: dict[str, Any]  # parameter name -> dL/dw summed over the batches (Taylor saliency)


def measure_saliency(model: torch.nn.Module, calibration: list[Any]) -> Saliency:
    """`Saliency` of `model` (left untouched) on `calibration`, batches shaped like its inputs."""
    import copy

    batches = [_as_input_tuple(batch) for batch in calibration]
    work = copy.deepcopy(model).eval()
    means = _input_channel_means(work, batches)
    _accumulate_saliency_gradients(work, batches)
    names = {module: name for name, module in work.named_modules()}
    gradients = {
        name: parameter.grad.detach().clone()
        for name, parameter in work.named_parameters()
        if parameter.grad is not None
    }
    return Saliency({names[module]: mean for module, mean in means.items()}, gradients)


def _input_channel_means(model: torch.nn.Module, batches: list[tuple[Any, ...]]) -> dict[Any, Any]:
    """Mean of every input channel of every channel-mixing layer, over the calibration batches."""
    import torch

    if not batches:
        return {}
    sums: dict[Any, Any] = {}

    def record(module: Any, args: tuple[Any, ...]) -> None:
        tensor = args[0].detach().float()
        axes = (
            [0, *range(2, tensor.dim())]
            if not isinstance(module, torch.nn.Linear)
            else [*range(tensor.dim() - 1)]
        )
        sums[module] = sums.get(module, 0) + tensor.mean(dim=axes)

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if _is_full_layer(m)]
    _forward_then_remove(model, batches, handles)
    return {module: total / len(batches) for module, total in sums.items()}


def _fold_removed_inputs_into_bias(layer: Any, indices: list[int], channel_means: Any) -> None:
    """Add W[:, removed] · mean(removed inputs) to the bias: the layer's output keeps its expected value.

    For a k x k convolution the border (zero padding) makes this approximate; for 1 x 1 and Linear it is
    exact in expectation.
    """
    import torch

    index = torch.as_tensor(indices, dtype=torch.long)
    if index.numel() == 0 or layer.weight.dim() < 2 or int(index.max()) >= layer.weight.shape[1]:
        return
    weight = layer.weight.detach()
    removed = weight[:, index]
    if removed.dim() > 2:
        removed = removed.sum(dim=tuple(range(2, removed.dim())))
    shift = removed @ channel_means[index].to(weight.dtype)
    with torch.no_grad():
        if layer.bias is None:
            layer.bias = torch.nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype))
        layer.bias += shift


def _accumulate_saliency_gradients(model: torch.nn.Module, batches: list[tuple[Any, ...]]) -> None:
    """Leave in each parameter's .grad how much the model's own decisions depend on it.

    The unpruned model agrees with itself, so a distillation loss would have zero gradient here; the
    cross-entropy to its own top-1 class (classifiers) or half the output energy (other heads) does not.
    """
    import torch
    import torch.nn.functional as F

    from converters.distill import is_classifier_output

    for parameter in model.parameters():
        parameter.requires_grad_(parameter.is_floating_point())
        parameter.grad = None
    for batch in batches:
        outputs = flatten_outputs(model(*batch))
        if is_classifier_output(outputs):
            loss = F.cross_entropy(outputs[0], outputs[0].detach().argmax(1))
        else:
            loss = torch.stack([0.5 * output.float().pow(2).mean() for output in outputs]).sum()
        loss.backward()


def _forward_then_remove(model: torch.nn.Module, batches: list[tuple[Any, ...]], handles: list[Any]) -> None:
    """Run `batches` through `model` for the hooks behind `handles`, which are removed even on error."""
    import torch

    try:
        with torch.no_grad():
            for batch in batches:
                model(*batch)
    finally:
        for handle in handles:
            handle.remove()


def _is_full_layer(module: Any) -> bool:
    """A Linear or a convolution that mixes channels (not depthwise, which only follows its input)."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return not (module.groups > 1 and module.groups == module.in_channels)
    return False


def weights_gzip_bytes(model: torch.nn.Module) -> int:
    """Size of all parameters and buffers as raw float bytes after gzip: what a sparse file saves."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=6, mtime=0) as stream:
        for tensor in model.state_dict().values():
            stream.write(tensor.detach().cpu().contiguous().numpy().tobytes())
    return buffer.tell()


def _as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    import numpy as np
    import torch

    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    converted = tuple(torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x for x in items)
    if not converted or not all(isinstance(x, torch.Tensor) for x in converted):
        raise PruneConfigError("prune: example_inputs must be a tensor or a tuple of tensors")
    return converted


def _count(model: torch.nn.Module, inputs: tuple[Any, ...]) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass and parameter count.

    Counted with hooks on every Conv/Linear *subclass* too: torch-pruning's counter looks modules up by
    exact type and misses wrappers such as EfficientNet's Conv2dStaticSamePadding (it saw 5 % of the MACs).
    """
    import math

    import torch

    macs = 0

    def count(module: Any, _args: Any, output: Any) -> None:
        nonlocal macs
        per_output = (
            module.in_features
            if isinstance(module, torch.nn.Linear)
            else module.in_channels // module.groups * math.prod(module.kernel_size)
        )
        macs += output.numel() // max(1, output.shape[0]) * per_output

    handles = [
        module.register_forward_hook(count)
        for module in model.modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))
    ]
    _forward_then_remove(model, [inputs], handles)
    return macs, sum(p.numel() for p in model.parameters())


def _output_layers(
    model: torch.nn.Module, inputs: tuple[Any, ...], outputs: list[Any]
) -> list[tuple[str, torch.nn.Module]]:
    """Conv/Linear layers whose channels reach a model output: pruning them would change its shape.

    For each output, the last-executed Conv/Linear whose channel count matches one of that output's
    dimensions is kept whole (the classifier head, a detector's box/score convs).
    """
    import torch

    executed: list[tuple[str, torch.nn.Module, int]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
            channels = module.out_features if isinstance(module, torch.nn.Linear) else module.out_channels

            def record(mod: Any, _args: Any, _out: Any, name: str = name, channels: int = channels) -> None:
                executed.append((name, mod, channels))

            handles.append(module.register_forward_hook(record))
    _forward_then_remove(model, [inputs], handles)

    kept: dict[str, torch.nn.Module] = {}
    for output in outputs:
        dims = set(output.shape[1:]) if output.dim() > 1 else set(output.shape)
        for name, module, channels in reversed(executed):
            if channels in dims:
                kept[name] = module
                break
    return list(kept.items())


def weight_sparsity(model: torch.nn.Module) -> float:
    """Fraction of Conv/Linear weights that are exactly zero (biases and norms, which no pruning here
    zeroes, are left out so that a bias that happens to be 0 does not count)."""
    weights = [module.weight for module in _weighted_modules(model)]
    total = sum(w.numel() for w in weights)
    return 1.0 - sum(int(w.count_nonzero()) for w in weights) / total if total else 0.0


def _weighted_modules(model: torch.nn.Module) -> list[Any]:
    import torch

    return [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))]


def _unstructured_l1(model: torch.nn.Module, ratio: float) -> None:
    from torch.nn.utils import prune

    for module in _weighted_modules(model):
        prune.l1_unstructured(module, name="weight", amount=ratio)
        prune.remove(module, "weight")  # bake the mask in: a plain tensor with zeros
