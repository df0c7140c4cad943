"""int8 recipes for transformer encoders, and the gate that picks one.

Every recipe is dynamic int8 in ONNX Runtime (weights int8 per output channel, activations quantized per
tensor at run time by `DynamicQuantizeLinear`, so no activation range is baked in); they differ in what
comes first:

- `dynamic-int8` — ORT's `quantize_dynamic` with its defaults (per-tensor weights): the baseline a user
  gets without this converter. Listed, never chosen unless it passes.
- `dynamic-int8-per-channel` — MatMul/Gather weights per channel on the exported graph.
- `fused+dynamic-int8-per-channel` — ORT's transformer optimizer first (`model_type` bert:
  EmbedLayerNormalization, Attention, SkipLayerNormalization, BiasGelu, as ORT advises before
  quantizing), then int8 of every weighted op, the fused Attention included (QAttention).
- `fused+smoothquant-A+dynamic-int8-per-channel` — as above with SmoothQuant (Xiao et al. 2023) in
  between: per input channel j of each MatMul/Attention, s_j = max|X_j|^A / max|W_j|^(1-A) measured on
  the calibration texts; the weights' rows are multiplied by s and a `Mul` by 1/s goes in front of the op.
  The activation's outlier channels, which set the per-tensor int8 scale, shrink; the product is the same
  in float. (On MiniLM it does not help: its per-tensor error comes from outlier tokens, not channels.)
- `fused+smoothquant-A+per-token-int8` — the fusions without Attention (every projection a MatMul), then
  SmoothQuant, then each MatMul rewritten as int8 with a scale **per token** computed at run time
  (row max |x| / 127, activations uint8 around 128, `MatMulInteger` u8 x s8 — the VNNI kernel — then the
  row and weight-column scales), weights int8 per output channel; embeddings int8. Per-tensor activation
  scales are what costs MiniLM its neighbours: one outlier token sets the scale for all. This is
  SmoothQuant's own setting (per-token activations, per-channel weights).
- `fused+smoothquant-A+per-token-int8-qattention` — the same for the attention-output and FFN MatMuls,
  but ORT's fused Attention kept (its QKV projection int8 per tensor, QAttention): faster, a little
  less close (on MiniLM's 300 evaluation sentences: neighbours 0.96 at A=0.6, 0.947 at 0.7, 0.94 at 0.5 —
  at the edge of the gate, so the gate decides per model and text set).
- `fused+weight-int8-blockwise` — the fusions without Attention (so every projection stays a MatMul),
  then `MatMulNBits` 8-bit weights in blocks of 128 along K with `accuracy_level` 4 (activations
  quantized to int8 per block of each row at run time, far finer than per tensor), embeddings int8.
  Closest to fp32; on ONNX Runtime 1.32's CPU kernels not faster than fp32 at sequence 128, so it is
  tried last and shipped only when nothing faster passes.

`score_embeddings` is the gate's measure (cosine to fp32 per text, and whether each text's nearest
neighbour among the evaluation texts stays the same); `score_logits` is top-1 agreement for classifiers.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.errors import EdgeError

log = logging.getLogger(__name__)

Feeds = list[dict[str, np.ndarray]]

# The gate for embeddings (issue 14): what a user cannot tell apart from fp32.
EMBEDDING_GATE = {"cosine_mean": 0.99, "cosine_min": 0.97, "nn_agreement": 0.95}
SMOOTH_MIN_SCALE = 1e-5


class TextQuantizeError(EdgeError):
    """A recipe could not be built (the optimizer or quantizer refused the graph)."""


@dataclass(frozen=True)
class Recipe:
    name: str
    fuse: bool = False
    smooth_alpha: float | None = None
    per_channel: bool = True
    ort_defaults: bool = False  # plain quantize_dynamic, nothing else
    weight_only_bits: int | None = None  # MatMulNBits instead of dynamic int8 MatMuls
    per_token: bool = False  # int8 MatMuls with a run-time scale per row (token) of the activation
    fused_attention: bool = False  # per_token: keep ORT's Attention op (QKV int8 per tensor, QAttention)


RECIPES: tuple[Recipe, ...] = (
    Recipe("dynamic-int8", per_channel=False, ort_defaults=True),
    Recipe("dynamic-int8-per-channel"),
    Recipe("fused+dynamic-int8-per-channel", fuse=True),
    Recipe("fused+smoothquant-0.5+dynamic-int8-per-channel", fuse=True, smooth_alpha=0.5),
    Recipe("fused+smoothquant-0.7+dynamic-int8-per-channel", fuse=True, smooth_alpha=0.7),
    *(
        Recipe(
            f"fused+smoothquant-{alpha}+per-token-int8-qattention",
            fuse=True,
            smooth_alpha=alpha,
            per_token=True,
            fused_attention=True,
        )
        for alpha in (0.6, 0.7)
    ),
    Recipe("fused+smoothquant-0.5+per-token-int8", fuse=True, smooth_alpha=0.5, per_token=True),
    Recipe("fused+smoothquant-0.7+per-token-int8", fuse=True, smooth_alpha=0.7, per_token=True),
    Recipe("fused+weight-int8-blockwise", fuse=True, weight_only_bits=8),
)
WEIGHT_ONLY_BLOCK = 128


@dataclass(frozen=True)
class TransformerShape:
    """What ORT's optimizer needs to match the attention pattern."""

    model_type: str
    num_heads: int
    hidden_size: int


@dataclass
class RecipeResult:
    recipe: Recipe
    path: Path | None
    scores: dict[str, float] = field(default_factory=dict)  # on the evaluation texts: reported, gated
    passed: bool = False
    # on the calibration texts set aside for choosing (text_calibration.selection_texts): what chooses
    selection: dict[str, float] = field(default_factory=dict)
    selected: bool = False
    latency_ms: float | None = None
    bytes: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "recipe": self.recipe.name,
            "passed": self.passed,
            "latency_ms_p50": self.latency_ms,
            "bytes": self.bytes,
            **{k: round(v, 5) for k, v in self.scores.items()},
            "selection": {k: round(v, 5) for k, v in self.selection.items()},
            "selection_passed": self.selected,
            **({"error": self.error} if self.error else {}),
        }


# ---------------------------------------------------------------------------------------------- building


def fuse(fp32: Path, out: Path, shape: TransformerShape, attention: bool = True) -> Path:
    """ORT's transformer fusions (offline, opt_level 1 so the file stays portable across providers);
    `attention=False` leaves attention unfused, so every projection stays a MatMul the int8 rewrites
    can take (MultiHeadAttention after separate Q/K/V MatMuls measured slower than that here)."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    model_type = shape.model_type if shape.model_type in ("bert", "distilbert", "roberta") else "bert"
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    options = FusionOptions(model_type)
    options.enable_attention = attention
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimized = optimizer.optimize_model(
                str(fp32),
                model_type=model_type,
                num_heads=shape.num_heads,
                hidden_size=shape.hidden_size,
                opt_level=1,
                optimization_options=options,
            )
        optimized.save_model_to_file(str(out))
    except Exception as exc:  # the optimizer raises many kinds on graphs it does not know
        raise TextQuantizeError(f"transformer optimizer failed: {type(exc).__name__}: {exc}") from exc
    finally:
        quiet.setLevel(level)
    return out


def _smooth_targets(
    model: object, op_types: tuple[str, ...] = ("MatMul", "Attention")
) -> list[tuple[object, str]]:
    """(node, weight initializer name) of every MatMul/Attention whose weight is a 2-D initializer."""
    import onnx

    assert isinstance(model, onnx.ModelProto)
    inits = {init.name: init for init in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type in op_types and len(node.input) > 1:
            weight = inits.get(node.input[1])
            if weight is not None and len(weight.dims) == 2:
                found.append((node, node.input[1]))
    return found


def activation_absmax(model_path: Path, names: list[str], feeds: Feeds) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of the named tensors over `feeds`."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    wanted = [outputs.index(name) for name in names]
    maxima: dict[str, np.ndarray] = {}
    for feed in feeds:
        values = session.run(None, feed)
        for name, index in zip(names, wanted, strict=True):
            array = np.abs(np.asarray(values[index], dtype=np.float32))
            mask = feed.get("attention_mask")
            if mask is not None and array.ndim == 3 and array.shape[:2] == mask.shape:
                array = array * mask[..., None]  # padding positions are not text
            channel = array.reshape(-1, array.shape[-1]).max(axis=0)
            maxima[name] = np.maximum(maxima[name], channel) if name in maxima else channel
    return maxima


def smooth(
    model_path: Path,
    out: Path,
    feeds: Feeds,
    alpha: float,
    op_types: tuple[str, ...] = ("MatMul", "Attention"),
) -> Path:
    """SmoothQuant: move activation outliers into the weights, one `Mul` per MatMul/Attention input."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    targets = _smooth_targets(model, op_types)
    if not targets:
        raise TextQuantizeError("SmoothQuant: no MatMul/Attention with a 2-D weight in the graph")
    names = sorted({node.input[0] for node, _ in targets})  # type: ignore[attr-defined]
    maxima = activation_absmax(model_path, names, feeds)
    inits = {init.name: init for init in model.graph.initializer}
    new_nodes: dict[str, object] = {}
    for index, (node, weight_name) in enumerate(targets):
        weight = numpy_helper.to_array(inits[weight_name]).astype(np.float32)
        act = maxima[node.input[0]]  # type: ignore[attr-defined]
        if act.shape[0] != weight.shape[0]:
            continue
        w_max = np.abs(weight).max(axis=1)
        scale = np.power(np.maximum(act, SMOOTH_MIN_SCALE), alpha) / np.power(
            np.maximum(w_max, SMOOTH_MIN_SCALE), 1.0 - alpha
        )
        scale = np.clip(scale, SMOOTH_MIN_SCALE, 1.0 / SMOOTH_MIN_SCALE).astype(np.float32)
        # A weight shared by two nodes is scaled once per node: give each node its own copy.
        scaled_name = f"{weight_name}_smooth{index}"
        model.graph.initializer.append(numpy_helper.from_array(weight * scale[:, None], scaled_name))
        inv_name = f"{weight_name}_smooth{index}_inv"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inv_name))
        smoothed = f"{node.input[0]}_smooth{index}"  # type: ignore[attr-defined]
        mul = onnx.helper.make_node(
            "Mul",
            [node.input[0], inv_name],  # type: ignore[attr-defined]
            [smoothed],
            name=f"{node.name}_smooth",  # type: ignore[attr-defined]
        )
        new_nodes[node.name] = mul  # type: ignore[attr-defined]
        node.input[0] = smoothed  # type: ignore[attr-defined]
        node.input[1] = scaled_name  # type: ignore[attr-defined]
    ordered = []
    for node in model.graph.node:
        if node.name in new_nodes:
            ordered.append(new_nodes[node.name])
        ordered.append(node)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    used = {name for node in model.graph.node for name in node.input}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    onnx.save(model, str(out))
    return out


def weight_only(model_path: Path, out: Path, bits: int) -> Path:
    """MatMulNBits weights (symmetric, blocks of WEIGHT_ONLY_BLOCK), int8 compute with per-block
    activation scales (accuracy_level 4); then the embedding tables int8."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(model_path)),
            bits=bits,
            block_size=WEIGHT_ONLY_BLOCK,
            is_symmetric=True,
            accuracy_level=4,
        )
        quantizer.process()
        staged = out.with_suffix(".nbits.onnx")
        quantizer.model.save_model_to_file(str(staged), False)
    except Exception as exc:
        raise TextQuantizeError(f"MatMulNBits failed: {type(exc).__name__}: {exc}") from exc
    finally:
        quiet.setLevel(level)
    return dynamic_int8(staged, out, per_channel=True, op_types=("Gather", "EmbedLayerNormalization"))


def per_token_int8(model_path: Path, out: Path) -> Path:
    """Every MatMul with a 2-D float weight W becomes int8 with one scale per row (token) of its input x,
    computed at run time: s = max|x| over the last axis / 127; q = uint8(round(x / s) + 128);
    y = MatMulIntegerToFloat(q, W8, 1, w_scale, 128) * s (u8 x s8, the VNNI kernel). W8 is int8 symmetric
    per output column. Then the embedding tables int8 (quantize_dynamic on Gather/EmbedLayerNormalization
    only).

    Plain elementwise ops rather than a per-axis QuantizeLinear on a 2-D view: measured faster on ORT
    1.32's CPU kernels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(model_path))
    inits = {init.name: init for init in model.graph.initializer}

    def const(name: str, value: np.ndarray) -> str:
        model.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    inv127 = const("pt_inv127", np.array(1.0 / 127.0, np.float32))
    eps = const("pt_eps", np.array(1e-12, np.float32))
    offset = const("pt_128_5", np.array(128.5, np.float32))
    one = const("pt_one", np.array(1.0, np.float32))
    zero_point = const("pt_zero_point", np.array(128, np.uint8))
    nodes = []
    rewritten = 0
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or len(weight.dims) != 2 or weight.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight).astype(np.float32)
        w_scale = (np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0).astype(np.float32)
        p = f"pt{rewritten}"
        rewritten += 1
        w_int8 = const(f"{p}_w", np.clip(np.round(w / w_scale), -127, 127).astype(np.int8))
        w_scale_name = const(f"{p}_wscale", w_scale)
        x = node.input[0]
        # Ops on the (tokens x channels) tensors are what this path pays for beside the MatMul (ORT
        # profile on MiniLM: 20 % of the run), so: no Round (adding 128.5 then the truncating Cast rounds
        # the non-negative values), a multiply by the row scale's reciprocal (computed per row), and
        # MatMulIntegerToFloat folding the int32 -> float cast and the weight-column scales into the
        # MatMul.
        steps: list[tuple[str, list[str], dict[str, int], str]] = [
            ("Abs", [x], {}, ""),
            ("ReduceMax", [f"{p}_0"], {"axes": -1, "keepdims": 1}, ""),
            ("Mul", [f"{p}_1", inv127], {}, ""),
            ("Add", [f"{p}_2", eps], {}, ""),  # the row scale s: output 3
            ("Reciprocal", [f"{p}_3"], {}, ""),
            ("Mul", [x, f"{p}_4"], {}, ""),
            ("Add", [f"{p}_5", offset], {}, ""),
            ("Cast", [f"{p}_6"], {"to": TensorProto.UINT8}, ""),
            ("MatMulIntegerToFloat", [f"{p}_7", w_int8, one, w_scale_name, zero_point], {}, "com.microsoft"),
        ]
        for index, (kind, inputs, attrs, domain) in enumerate(steps):
            made = helper.make_node(
                kind, inputs, [f"{p}_{index}"], name=f"{p}_{index}", domain=domain or None
            )
            for key, value in attrs.items():
                made.attribute.append(helper.make_attribute(key, [value] if key == "axes" else value))
            nodes.append(made)
        nodes.append(helper.make_node("Mul", [f"{p}_8", f"{p}_3"], [node.output[0]], node.name or f"{p}_y"))
    if not rewritten:
        raise TextQuantizeError("per-token int8: no MatMul with a 2-D float weight in the graph")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = {name for n in model.graph.node for name in n.input}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    staged = out.with_suffix(".matmul.onnx")
    onnx.save(model, str(staged))
    return dynamic_int8(staged, out, per_channel=True, op_types=("Gather", "EmbedLayerNormalization"))


def dynamic_int8(
    model_path: Path,
    out: Path,
    *,
    per_channel: bool,
    ort_defaults: bool = False,
    op_types: tuple[str, ...] | None = None,
) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # ORT's quantizer logs an advice to run its pre-processing on the root logger, once per call
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if ort_defaults:
                quantize_dynamic(str(model_path), str(out))
            else:
                quantize_dynamic(
                    str(model_path),
                    str(out),
                    per_channel=per_channel,
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=list(op_types) if op_types else None,
                    # fused ops (com.microsoft domain) defeat ONNX shape inference: their outputs are float
                    extra_options={"DefaultTensorType": 1},
                )
        except Exception as exc:
            raise TextQuantizeError(f"quantize_dynamic failed: {type(exc).__name__}: {exc}") from exc
        finally:
            logging.disable(logging.NOTSET)
    return out


def build(
    recipe: Recipe,
    fp32: Path,
    work: Path,
    calib: Feeds,
    shape: TransformerShape,
    fused_cache: dict[str, Path],
) -> Path:
    """The int8 model of `recipe` in `work` (the fused fp32 graph is built once and shared)."""
    base = fp32
    stem = recipe.name.replace("+", "_")
    if (recipe.weight_only_bits is not None or recipe.per_token) and "unfused-attention" not in fused_cache:
        fused_cache["unfused-attention"] = fuse(fp32, work / "fused.noattention.fp32.onnx", shape, False)
    if recipe.per_token and recipe.fused_attention:
        if "fused" not in fused_cache:
            fused_cache["fused"] = fuse(fp32, work / "fused.fp32.onnx", shape)
        base = fused_cache["fused"]
        if recipe.smooth_alpha is not None:
            base = smooth(base, work / f"{stem}.smooth.onnx", calib, recipe.smooth_alpha, ("MatMul",))
        tokens = per_token_int8(base, work / f"{stem}.tokens.onnx")
        return dynamic_int8(tokens, work / f"{stem}.int8.onnx", per_channel=True, op_types=("Attention",))
    if recipe.per_token:
        base = fused_cache["unfused-attention"]
        if recipe.smooth_alpha is not None:
            base = smooth(base, work / f"{stem}.smooth.onnx", calib, recipe.smooth_alpha)
        return per_token_int8(base, work / f"{stem}.int8.onnx")
    if recipe.weight_only_bits is not None:
        return weight_only(
            fused_cache["unfused-attention"], work / f"{stem}.int8.onnx", recipe.weight_only_bits
        )
    if recipe.fuse:
        if "fused" not in fused_cache:
            fused_cache["fused"] = fuse(fp32, work / "fused.fp32.onnx", shape)
        base = fused_cache["fused"]
    if recipe.smooth_alpha is not None:
        base = smooth(base, work / f"{stem}.smooth.onnx", calib, recipe.smooth_alpha)
    return dynamic_int8(
        base, work / f"{stem}.int8.onnx", per_channel=recipe.per_channel, ort_defaults=recipe.ort_defaults
    )


# ---------------------------------------------------------------------------------------------- scoring


def run_all(model_path: Path, feeds: Feeds, threads: int = 2) -> np.ndarray:
    from converters.accuracy import session

    sess = session(model_path, threads)
    return np.concatenate([np.asarray(sess.run(None, feed)[0], dtype=np.float64) for feed in feeds])


def _unit(vectors: np.ndarray) -> np.ndarray:
    flat = vectors.reshape(vectors.shape[0], -1)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.where(norms == 0.0, 1.0, norms)


def nearest_neighbours(vectors: np.ndarray) -> np.ndarray:
    unit = _unit(vectors)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.asarray(similarity.argmax(axis=1))


def score_embeddings(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Cosine to the reference per text (mean, min) and nearest-neighbour agreement among the texts."""
    cosine = (_unit(reference) * _unit(candidate)).sum(axis=1)
    agree = nearest_neighbours(reference) == nearest_neighbours(candidate)
    return {
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "nn_agreement": float(agree.mean()),
    }


def embedding_gate(scores: dict[str, float]) -> bool:
    return all(scores[key] >= bound for key, bound in EMBEDDING_GATE.items())


def score_logits(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    ref = reference.reshape(reference.shape[0], -1)
    cand = candidate.reshape(candidate.shape[0], -1)
    return {
        "top1_agreement": float(np.mean(ref.argmax(1) == cand.argmax(1))),
        "cosine_min": float((_unit(ref) * _unit(cand)).sum(axis=1).min()),
    }


def try_recipes(
    fp32: Path,
    work: Path,
    calib: Feeds,
    evaluation: Feeds,
    shape: TransformerShape,
    scorer: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    gate: Callable[[dict[str, float]], bool],
    recipes: tuple[Recipe, ...] = RECIPES,
    note: Callable[[str], None] = lambda text: None,
    selection: Feeds | None = None,
) -> tuple[np.ndarray, list[RecipeResult]]:
    """Build every recipe and score it against fp32 on `selection` (what chooses; default the
    calibration feeds) and on `evaluation` (what is reported and gated): (fp32 outputs on `evaluation`,
    results in order)."""
    reference = run_all(fp32, evaluation)
    choosing = selection if selection is not None else calib
    chooser = run_all(fp32, choosing)
    fused_cache: dict[str, Path] = {}
    results = []
    for recipe in recipes:
        note(recipe.name)
        try:
            path = build(recipe, fp32, work, calib, shape, fused_cache)
        except TextQuantizeError as exc:
            log.warning("recipe %s: %s", recipe.name, exc)
            results.append(RecipeResult(recipe, None, error=str(exc)))
            continue
        scores = scorer(reference, run_all(path, evaluation))
        chosen = scorer(chooser, run_all(path, choosing))
        results.append(
            RecipeResult(recipe, path, scores, gate(scores), chosen, gate(chosen), bytes=path.stat().st_size)
        )
    return reference, results
