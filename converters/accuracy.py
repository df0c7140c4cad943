"""The accuracy gate: how much worse is the compressed model than fp32, and which nodes to keep in float.

Scores are in 0..1 where 1.0 means "as good as the reference"; the drop is in points (x100):
- classification with ground-truth labels: top-1 accuracy of fp32 minus that of the candidate;
- classification without labels: the expected top-1 accuracy drop if fp32's softmax is calibrated, i.e.
  the mean over samples of p_fp32(fp32's top-1) - p_fp32(candidate's top-1). A flip between two classes
  fp32 itself rates 0.35/0.33 costs 0.02 of a sample, a flip of a 0.95-confident answer costs 0.95 -
  so a few dozen unlabelled photos resolve well below one point, where plain agreement moves in steps of
  1/n. Agreement overall and where fp32 is confident (max softmax >= CONFIDENT) are reported beside it;
- raw outputs: 1 - mean cosine similarity of the outputs (SNR in dB reported too);
- detection: 1 - box mAP@0.5 of the candidate's detections against fp32's, both decoded by the runtime's
  own decoder for the package's `postprocess` (edge.tasks), with a borderline band (`DetectionGate`):
  a box fp32 itself scores within BORDERLINE of the score threshold is too close to call (VOC's
  "difficult": neither found nor missed), and a candidate finds a box when it scores it at least the
  threshold - BORDERLINE. Cut hard at the threshold, a box fp32 scores 0.31 and int8 0.29 counts as a
  miss: measured on the ddddocr detector, such flips were nearly all of int8's loss (0.952 cut hard,
  0.990 with the band, 0.995 ranked without a threshold as COCO's evaluation does - which a model whose
  scores all sank below the threshold would also pass). Both other figures are reported beside it
  (`map50_at_threshold`, `map50_ranked`);
- text recognition: the character error rate of the candidate's decoded texts against fp32's (edit
  distance over fp32's characters, CTC-decoded by the runtime's decoder), i.e. 1 - CER in points;
- `--metric FILE.py:fn`: 1 - fn(reference, candidate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import ConfigError, EdgeError
from edge.tasks.base import Decoder, DecoderContext, Result, TaskConfig
from edge.tasks.detection import DetectionConfig, iou_one_to_many

CONFIDENT = 0.3
BORDERLINE = 0.05  # score band around a detector's threshold where fp32's own boxes are too close to call
RANKED = 0.001  # the lowest score kept for the threshold-free mAP, as COCO and Ultralytics' val (conf 0.001)
Outputs = list[list[np.ndarray]]  # per sample, per model output
MetricFn = Callable[[Outputs, Outputs], float]


class GateError(EdgeError):
    """No candidate model is within the gate's limits (`--max-drop`, the agreement floors) of fp32."""


@dataclass
class Evaluation:
    metric: str
    drop_points: float
    details: dict[str, float] = field(default_factory=dict)
    # Per sample (classification): fp32 top-1, candidate top-1, fp32 confidence; used by the report.
    reference_top1: list[int] = field(default_factory=list)
    candidate_top1: list[int] = field(default_factory=list)
    reference_confidence: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class GateLimits:
    """What a candidate must reach to ship: at most `max_drop` points of the gate's metric and, for
    classifiers when asked, top-1 agreement with fp32 overall and where fp32 is confident. The expected
    drop forgives flips of answers fp32 itself was unsure of, which is right for accuracy but lets a
    pruned model that changes a quarter of its answers through; the agreement floors are for users who
    want a model that decides like the original."""

    max_drop: float
    min_agreement: float | None = None
    min_confident_agreement: float | None = None

    def miss(self, evaluation: Evaluation) -> str | None:
        """Why `evaluation` fails (one clause), or None when it passes."""
        if evaluation.drop_points > self.max_drop:
            return f"drops {evaluation.drop_points:.2f} points of {evaluation.metric} (--max-drop {self.max_drop:g})"
        floors = (
            ("agreement_top1", self.min_agreement, "--min-agreement", ""),
            (
                "agreement_top1_confident",
                self.min_confident_agreement,
                "--min-confident-agreement",
                " confident",
            ),
        )
        for key, floor, option, which in floors:
            if floor is None:
                continue
            value = evaluation.details.get(key)
            if value is None:
                raise ConfigError(
                    f"{option}: the {evaluation.metric} gate has no top-1 agreement (classifiers only)"
                )
            if value < floor:  # NaN (no confident sample) is not below: nothing to disagree on
                return f"agrees with fp32 on {value:.3f} of its{which} top-1 answers ({option} {floor:g})"
        return None

    def passes(self, evaluation: Evaluation) -> bool:
        return self.miss(evaluation) is None

    @property
    def has_floors(self) -> bool:
        return self.min_agreement is not None or self.min_confident_agreement is not None

    def to_json(self) -> dict[str, float]:
        """The limits as the manifest's `metrics.gate` records them (floors only when asked for)."""
        floors = {
            "min_agreement": self.min_agreement,
            "min_confident_agreement": self.min_confident_agreement,
        }
        return {"max_drop": self.max_drop, **{k: v for k, v in floors.items() if v is not None}}

    def __str__(self) -> str:
        parts = [f"--max-drop {self.max_drop:g}"]
        if self.min_agreement is not None:
            parts.append(f"--min-agreement {self.min_agreement:g}")
        if self.min_confident_agreement is not None:
            parts.append(f"--min-confident-agreement {self.min_confident_agreement:g}")
        return ", ".join(parts)


def session(path: Path, threads: int = 2) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, feeds: list[dict[str, np.ndarray]], threads: int = 2) -> Outputs:
    sess = session(path, threads)
    return [[np.asarray(o) for o in sess.run(None, feed)] for feed in feeds]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=-1, keepdims=True))


def _probabilities(logits: np.ndarray) -> np.ndarray:
    flat = logits.reshape(-1).astype(np.float64)
    if np.all(flat >= 0) and abs(flat.sum() - 1.0) < 1e-3:
        return flat
    return softmax(flat)


def classification(reference: Outputs, candidate: Outputs, labels: list[int] | None = None) -> Evaluation:
    ref_probs = [_probabilities(s[0]) for s in reference]
    ref_top = [int(np.argmax(p)) for p in ref_probs]
    cand_top = [int(np.argmax(s[0].reshape(-1))) for s in candidate]
    confidence = [float(p.max()) for p in ref_probs]
    agree = np.array([r == c for r, c in zip(ref_top, cand_top, strict=True)], dtype=bool)
    confident = np.array(confidence) >= CONFIDENT
    details = {
        "agreement_top1": float(agree.mean()),
        "agreement_top1_confident": float(agree[confident].mean()) if confident.any() else float("nan"),
        "confident_samples": int(confident.sum()),
        "samples": len(agree),
    }
    if labels is not None and len(labels) == len(ref_top):
        truth = np.array(labels)
        details["accuracy_fp32"] = float((np.array(ref_top) == truth).mean())
        details["accuracy_candidate"] = float((np.array(cand_top) == truth).mean())
        metric, drop = "top1_accuracy", 100 * (details["accuracy_fp32"] - details["accuracy_candidate"])
    else:
        expected = [float(p[r] - p[c]) for p, r, c in zip(ref_probs, ref_top, cand_top, strict=True)]
        details["expected_top1_drop"] = float(np.mean(expected))
        metric, drop = "expected_top1_drop", 100 * details["expected_top1_drop"]
    return Evaluation(metric, drop, details, ref_top, cand_top, confidence)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    norm = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    if norm == 0:
        return 1.0 if np.allclose(a64, b64) else 0.0
    return float(np.dot(a64, b64) / norm)


def snr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    noise = float(np.sum((reference.astype(np.float64) - candidate) ** 2))
    if noise == 0:
        return 100.0
    return float(10 * np.log10(max(signal, 1e-30) / noise))


def raw(reference: Outputs, candidate: Outputs) -> Evaluation:
    cosines = [
        cosine(r, c) for rs, cs in zip(reference, candidate, strict=True) for r, c in zip(rs, cs, strict=True)
    ]
    snrs = [
        snr_db(r, c) for rs, cs in zip(reference, candidate, strict=True) for r, c in zip(rs, cs, strict=True)
    ]
    mean_cos = float(np.mean(cosines))
    details = {
        "cosine_mean": mean_cos,
        "cosine_min": float(np.min(cosines)),
        "snr_db_mean": float(np.mean(snrs)),
    }
    return Evaluation("output_cosine", 100 * (1 - mean_cos), details)


Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (N,4), scores (N,), classes (N,)


def detections(result: Result) -> Detections:
    """The boxes, scores and class indexes of a runtime detection result (edge.tasks.detection)."""
    rows = result.get("detections")
    if not isinstance(rows, list):
        raise EdgeError(f"detection gate: the decoder gave a '{result.get('type')}' result, no detections")
    boxes, scores, classes = [], [], []
    for row in rows:
        assert isinstance(row, dict)
        box, score, index = row["box"], row["score"], row["index"]
        assert isinstance(box, list) and isinstance(score, float) and isinstance(index, int)
        boxes.append(box)
        scores.append(score)
        classes.append(index)
    return (
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(scores, dtype=np.float64),
        np.asarray(classes, dtype=np.int64),
    )


def boxes_without_area(outputs: Outputs, decoder: Decoder) -> tuple[int, int]:
    """(decoded boxes with zero or negative area, all decoded boxes) over the samples: such a box overlaps
    nothing, not even itself, so box mAP cannot match it."""
    boxes = [detections(decoder(sample, None))[0] for sample in outputs]
    flat = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    area = (flat[:, 2] - flat[:, 0]) * (flat[:, 3] - flat[:, 1])
    return int((area <= 0).sum()), len(flat)


def average_precision(
    truth: list[Detections],
    predicted: list[Detections],
    iou: float = 0.5,
    band: tuple[float, float] | None = None,
) -> float:
    """VOC-style all-point AP over all classes pooled per class, averaged over classes present in `truth`.

    `band` (low, high): a truth box scored below `high` is borderline (VOC's "difficult": a prediction
    on it is neither a hit nor a false positive, and missing it costs nothing); a prediction finds a box
    only when scored at least `low`, and one below `high` that finds nothing is no false positive."""
    classes = sorted({int(c) for _, _, cls in truth for c in cls})
    if not classes:
        return 1.0 if all(len(p[0]) == 0 for p in predicted) else 0.0
    low, high = band if band is not None else (-np.inf, -np.inf)
    aps = []
    for cls in classes:
        n_truth = 0
        hits: list[tuple[float, bool]] = []
        for (t_boxes, t_scores, t_cls), (p_boxes, p_scores, p_cls) in zip(truth, predicted, strict=True):
            gt = t_boxes[t_cls == cls]
            borderline = t_scores[t_cls == cls] < high
            n_truth += int((~borderline).sum())
            preds = p_boxes[p_cls == cls]
            scores = p_scores[p_cls == cls]
            used = np.zeros(len(gt), dtype=bool)
            for order in np.argsort(-scores):
                score = float(scores[order])
                if len(gt):
                    overlaps = iou_one_to_many(preds[order], gt)
                    overlaps[used] = -1
                    best = int(np.argmax(overlaps))
                    if overlaps[best] >= iou:
                        used[best] = True
                        if not borderline[best] and score >= low:
                            hits.append((score, True))
                        continue
                if score >= high:
                    hits.append((score, False))
        hits.sort(key=lambda h: -h[0])
        tp = np.cumsum([h[1] for h in hits]) if hits else np.zeros(0)
        precision = tp / np.arange(1, len(hits) + 1) if hits else np.zeros(0)
        recall = tp / max(n_truth, 1) if hits else np.zeros(0)
        envelope = np.maximum.accumulate(precision[::-1])[::-1] if hits else np.zeros(0)
        previous = np.concatenate([[0.0], recall[:-1]]) if hits else np.zeros(0)
        aps.append(float(np.sum((recall - previous) * envelope)) if n_truth else 1.0)
    return float(np.mean(aps))


@dataclass(frozen=True)
class DetectionGate:
    """How the gate reads detections (the module docstring says why): the package's decoder, the same
    decoder keeping scores down to the band's floor, and one keeping nearly all (threshold-free mAP)."""

    published: Decoder
    wide: Decoder
    ranked: Decoder
    threshold: float

    @classmethod
    def of(cls, postprocess: TaskConfig, context: DecoderContext) -> DetectionGate | None:
        if not isinstance(postprocess, DetectionConfig):
            return None
        threshold = postprocess.score_threshold

        def at(score: float) -> Decoder:
            return postprocess.model_copy(update={"score_threshold": score}).decoder(context)

        return cls(
            postprocess.decoder(context), at(max(threshold - BORDERLINE, RANKED)), at(RANKED), threshold
        )

    def evaluate(self, reference: Outputs, candidate: Outputs) -> Evaluation:
        def read(decoder: Decoder, outputs: Outputs) -> list[Detections]:
            return [detections(decoder(sample, None)) for sample in outputs]

        truth, wide = read(self.wide, reference), read(self.wide, candidate)
        published = read(self.published, reference)
        band = (self.threshold - BORDERLINE, self.threshold + BORDERLINE)
        box_map = average_precision(truth, wide, band=band)
        evaluation = raw(reference, candidate)
        evaluation.details["map50_vs_fp32"] = box_map
        evaluation.details["map50_at_threshold"] = average_precision(
            published, read(self.published, candidate)
        )
        evaluation.details["map50_ranked"] = average_precision(published, read(self.ranked, candidate))
        return Evaluation("box_map50_vs_fp32", 100 * (1 - box_map), evaluation.details)


def detection(reference: Outputs, candidate: Outputs, decoder: Decoder) -> Evaluation:
    """Box mAP@0.5 of the candidate against fp32, both decoded by `decoder` and cut at its threshold
    (the gate itself uses `DetectionGate`, which knows the threshold)."""
    truth = [detections(decoder(sample, None)) for sample in reference]
    predicted = [detections(decoder(sample, None)) for sample in candidate]
    box_map = average_precision(truth, predicted)
    evaluation = raw(reference, candidate)
    evaluation.details["map50_vs_fp32"] = box_map
    return Evaluation("box_map50_vs_fp32", 100 * (1 - box_map), evaluation.details)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions that turn `a` into `b`."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def decoded_text(result: Result) -> str:
    text = result.get("text")
    if not isinstance(text, str):
        raise EdgeError(f"text-recognition gate: the decoder gave a '{result.get('type')}' result, no text")
    return text


def text_recognition(reference: Outputs, candidate: Outputs, decoder: Decoder) -> Evaluation:
    """1 - character error rate of the candidate's texts against fp32's, both decoded by the package's
    own decoder (CTC greedy with the charset): what a device would publish."""
    truth = [decoded_text(decoder(sample, None)) for sample in reference]
    read = [decoded_text(decoder(sample, None)) for sample in candidate]
    errors = sum(edit_distance(t, r) for t, r in zip(truth, read, strict=True))
    characters = sum(len(t) for t in truth)
    accuracy = 1.0 - errors / characters if characters else float(all(not r for r in read))
    details = {
        "char_accuracy_vs_fp32": accuracy,
        "exact_match_vs_fp32": float(np.mean([t == r for t, r in zip(truth, read, strict=True)])),
        "characters": characters,
        "samples": len(truth),
    }
    return Evaluation("char_accuracy_vs_fp32", 100 * (1 - accuracy), details)


def evaluate(
    task: str,
    reference: Outputs,
    candidate: Outputs,
    labels: list[int] | None = None,
    metric_fn: MetricFn | None = None,
    *,
    decoder: Decoder | None = None,
    detection_gate: DetectionGate | None = None,
) -> Evaluation:
    """`decoder` is the package's post-processing (edge.tasks); the detection gate needs it, or
    `detection_gate` (with its borderline band)."""
    if metric_fn is not None:
        score = float(metric_fn(reference, candidate))
        return Evaluation("user_metric", 100 * (1 - score), {"user_metric": score})
    if task == "classification":
        return classification(reference, candidate, labels)
    if task == "detection":
        if detection_gate is not None:
            return detection_gate.evaluate(reference, candidate)
        if decoder is None:
            raise ValueError("the detection gate decodes with the package's decoder: pass decoder=")
        return detection(reference, candidate, decoder)
    if task == "text-recognition":
        if decoder is None:
            raise ValueError("the text-recognition gate decodes with the package's decoder: pass decoder=")
        return text_recognition(reference, candidate, decoder)
    return raw(reference, candidate)


# Per-layer sensitivity ---------------------------------------------------------------------------------


def layer_sensitivity(
    fp32_path: Path, int8_path: Path, feeds: list[dict[str, np.ndarray]], nodes: list[str], work_dir: Path
) -> dict[str, float]:
    """How much quantization error each weighted node *adds*: SQNR (dB, int8 vs fp32 on the same samples)
    at the output of its nearest weighted producer minus SQNR at its own output. Larger = more sensitive.

    Nodes are matched by name; the quantizer folds a trailing Relu into the node, so a node's output is
    compared with the fp32 tensor of the same name (after the Relu)."""
    import onnx

    fp32 = onnx.load(str(fp32_path))
    int8 = onnx.load(str(int8_path))
    int8_out = {n.name: n.output[0] for n in int8.graph.node}
    pairs: dict[str, tuple[str, str]] = {}  # node -> (fp32 tensor, int8 tensor)
    for name in nodes:
        if name in int8_out:
            tensor = int8_out[name]
            pairs[name] = (tensor.removesuffix("_QuantizeLinear_Input"), tensor)
    fp32_acts = _activations(
        fp32_path, sorted({a for a, _ in pairs.values()}), feeds, work_dir / "sens.fp32.onnx"
    )
    int8_acts = _activations(
        int8_path, sorted({b for _, b in pairs.values()}), feeds, work_dir / "sens.int8.onnx"
    )

    def sqnr(node: str | None) -> float:
        if node is None or node not in pairs:
            return 60.0
        a, b = pairs[node]
        if a not in fp32_acts or b not in int8_acts:
            return 60.0
        values = [snr_db(r, c) for r, c in zip(fp32_acts[a], int8_acts[b], strict=True)]
        return min(float(np.mean(values)), 60.0)

    weighted = set(nodes)
    return {name: sqnr(weighted_producer(fp32, name, weighted)[0]) - sqnr(name) for name in pairs}


def weighted_producer(model: Any, node_name: str, weighted: set[str]) -> tuple[str | None, list[str]]:
    """Walk back from a node's data input through unweighted nodes to the nearest weighted node:
    (that node or None at a graph input, every node on the way including it)."""
    producers = {out: n for n in model.graph.node for out in n.output}
    by_name = {n.name: n for n in model.graph.node}
    path: list[str] = []
    node = by_name.get(node_name)
    while node is not None and node.input:
        producer = producers.get(node.input[0])
        if producer is None:
            return None, path
        path.append(producer.name)
        if producer.name in weighted:
            return producer.name, path
        node = producer
    return None, path


def exclusion_units(model_path: Path, ranked: list[str], weighted: list[str]) -> list[list[str]]:
    """For each ranked node: the node plus the nodes back to its weighted producer. Keeping only the node
    in float would still quantize its input (the producer's output), so both sides stay float."""
    import onnx

    model = onnx.load(str(model_path))
    weighted_set = set(weighted)
    return [[name, *weighted_producer(model, name, weighted_set)[1]] for name in ranked]


def _activations(
    path: Path, names: list[str], feeds: list[dict[str, np.ndarray]], augmented: Path
) -> dict[str, list[np.ndarray]]:
    import onnx

    model = onnx.load(str(path))
    present = {o for n in model.graph.node for o in n.output}
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name in present and name not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    onnx.save(model, str(augmented))
    sess = session(augmented)
    out_names = [o.name for o in sess.get_outputs()]
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names if n in out_names}
    for feed in feeds:
        values = dict(zip(out_names, sess.run(None, feed), strict=True))
        for name in collected:
            collected[name].append(np.asarray(values[name]))
    return collected


# Exclusion search --------------------------------------------------------------------------------------

SENSITIVITY_SAMPLES = 8  # evaluation samples that rank the nodes: enough to order them, cheap to run


@dataclass(frozen=True)
class Candidate:
    """A quantized model and how it scored against the reference."""

    path: Path
    evaluation: Evaluation


@dataclass(frozen=True)
class ExclusionResult:
    chosen: Candidate  # the passing model that keeps the fewest nodes in float
    excluded: list[str]  # the nodes it keeps in float
    sensitivity: dict[str, float]  # weighted node -> quantization error it adds (dB, `layer_sensitivity`)


# (nodes to keep in float, tag for the file name) -> the re-quantized model, scored
Requantize = Callable[[list[str], str], Candidate]


def search_exclusions(
    float_path: Path,
    weighted: list[str],
    failed: Candidate,
    requantize: Requantize,
    *,
    limits: GateLimits,
    feeds: list[dict[str, np.ndarray]],
    work_dir: Path,
    note: Callable[[str], None],
) -> ExclusionResult:
    """The fewest of the most sensitive weighted nodes that, kept in float, bring int8 within `limits`.

    `failed` is `float_path` fully quantized, over the limit. Nodes are ranked by `layer_sensitivity` on
    the first SENSITIVITY_SAMPLES `feeds`; the count kept in float doubles up to half the weighted nodes
    until one passes, then bisection between the last failure and that pass finds the fewest. GateError
    when half of them in float still fails."""
    sensitivity = layer_sensitivity(float_path, failed.path, feeds[:SENSITIVITY_SAMPLES], weighted, work_dir)
    ranked = sorted(sensitivity, key=lambda n: -sensitivity[n])
    units = exclusion_units(float_path, ranked, weighted)

    def first(count: int) -> list[str]:
        names: list[str] = []
        for unit in units[:count]:
            names.extend(n for n in unit if n not in names)
        return names

    def passes(candidate: Candidate) -> bool:
        return limits.passes(candidate.evaluation)

    limit = max(1, len(ranked) // 2)
    best: tuple[int, Candidate] | None = None
    trial = failed
    failed_below = 0
    count = 1
    while best is None and count <= limit:
        note(f"keeping {count} of {len(ranked)} weighted nodes in float")
        trial = requantize(first(count), f"x{count}")
        if passes(trial):
            best = (count, trial)
        else:
            failed_below = count
            count = limit if count < limit < count * 2 else count * 2
    if best is None:
        raise GateError(
            f"accuracy gate: int8 {limits.miss(failed.evaluation)}; keeping the {limit} most sensitive of "
            f"{len(ranked)} weighted nodes in float still {limits.miss(trial.evaluation)}"
        )
    low, high = failed_below + 1, best[0] - 1
    while low <= high:  # the fewest exclusions that pass, between the last failure and first pass
        middle = (low + high) // 2
        trial = requantize(first(middle), f"x{middle}")
        if passes(trial):
            best, high = (middle, trial), middle - 1
        else:
            low = middle + 1
    count, chosen = best
    excluded = first(count)
    note(f"kept {len(excluded)} node(s) in float; drop {chosen.evaluation.drop_points:.2f} points")
    return ExclusionResult(chosen, excluded, sensitivity)
