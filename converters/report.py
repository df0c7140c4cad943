"""`--report`: a markdown page with PNG plots (matplotlib, Agg backend) next to it.

Plots: latency and size per model stage, time per conversion stage, per-layer quantization sensitivity
(with the nodes kept in float marked), and for classifiers the shipped model's agreement with fp32 against
fp32 confidence. Columns and axes name the precision that was measured (int8, fp16 or fp32).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from converters.accuracy import Evaluation
    from converters.pipeline import StageRecord


def _save(fig: Any, path: Path, title: str, images: list[tuple[str, str]]) -> None:
    """Write one figure as a PNG beside the page and list it under `title`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    images.append((title, path.name))


def write_report(
    out_dir: Path,
    name: str,
    stages: list[StageRecord],
    latency: dict[str, dict[str, float]],
    sizes: dict[str, int],
    precision: str,
    shipped_eval: Evaluation,
    fp32_eval: Evaluation,
    sensitivity: dict[str, float],
    excluded: list[str],
    metrics: dict[str, Any],
    pruning: dict[str, Any] | None = None,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    images: list[tuple[str, str]] = []

    models = list(latency)
    fig, (ax_lat, ax_size) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_lat.bar(models, [latency[m]["p50"] for m in models], color="#4477aa")
    ax_lat.set_ylabel("latency p50 (ms, 2 threads)")
    ax_lat.set_title("Latency per model stage")
    size_models = list(sizes)
    ax_size.bar(size_models, [sizes[m] / 1e6 for m in size_models], color="#ee7733")
    ax_size.set_ylabel("file size (MB)")
    ax_size.set_title("Size per model stage")
    _save(fig, out_dir / "latency_size.png", "Latency and size", images)

    fig, ax = plt.subplots(figsize=(7, 0.4 * len(stages) + 1.2))
    ax.barh([s.name for s in stages][::-1], [s.seconds for s in stages][::-1], color="#228833")
    ax.set_xlabel("seconds")
    ax.set_title("Conversion time per stage")
    _save(fig, out_dir / "stages.png", "Conversion stages", images)

    if sensitivity:
        ranked = sorted(sensitivity.items(), key=lambda kv: -kv[1])[:30]
        fig, ax = plt.subplots(figsize=(8, 0.28 * len(ranked) + 1.2))
        colors = ["#cc3311" if n in excluded else "#7799bb" for n, _ in ranked]
        ax.barh([n for n, _ in ranked][::-1], [v for _, v in ranked][::-1], color=colors[::-1])
        ax.set_xlabel("SQNR lost in this node (dB); red: kept in float")
        ax.set_title("Per-layer quantization sensitivity")
        _save(fig, out_dir / "sensitivity.png", "Per-layer sensitivity", images)

    if shipped_eval.reference_confidence:
        confidence = np.array(shipped_eval.reference_confidence)
        agree = np.array(shipped_eval.reference_top1) == np.array(shipped_eval.candidate_top1)
        edges = np.linspace(0, 1, 6)
        which = np.clip(np.digitize(confidence, edges) - 1, 0, len(edges) - 2)
        rates = [
            float(agree[which == b].mean()) if (which == b).any() else np.nan for b in range(len(edges) - 1)
        ]
        counts = [int((which == b).sum()) for b in range(len(edges) - 1)]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [f"{edges[b]:.1f}-{edges[b + 1]:.1f}\n(n={counts[b]})" for b in range(len(edges) - 1)]
        ax.bar(labels, rates, color="#009988")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("fp32 confidence (max softmax)")
        ax.set_ylabel(f"{precision} top-1 agrees with fp32")
        ax.set_title("Agreement by fp32 confidence")
        _save(fig, out_dir / "agreement.png", "Agreement with fp32", images)

    gate = metrics.get("gate", {})
    lines = [
        f"# Conversion report: {name}",
        "",
        f"Gate: **{'passed' if gate.get('passed') else 'failed'}**: {gate.get('metric')} drops "
        f"{gate.get('drop_points')} points (limit {gate.get('max_drop')}).",
        "",
        "| model | latency p50 ms | latency p90 ms | size MB |",
        "|---|---|---|---|",
    ]
    for model in models:
        size = sizes.get(model)
        lines.append(
            f"| {model} | {latency[model]['p50']:.2f} | {latency[model]['p90']:.2f} | {size / 1e6:.2f} |"
            if size
            else f"| {model} | {latency[model]['p50']:.2f} | {latency[model]['p90']:.2f} | - |"
        )
    lines += ["", f"| measure | float model | {precision} |", "|---|---|---|"]
    for key in sorted(set(shipped_eval.details) | set(fp32_eval.details)):
        lines.append(
            f"| {key} | {_fmt(fp32_eval.details.get(key))} | {_fmt(shipped_eval.details.get(key))} |"
        )
    tried = metrics.get("recipes") or []
    if tried:  # the recipe search: every recipe tried, in order, the last one shipped if it passed
        lines += [
            "",
            "| recipe tried | passed | drop points | latency p50 ms | size MB |",
            "|---|---|---|---|---|",
        ]
        for trial in tried:
            size = trial.get("bytes") or 0
            lines.append(
                f"| {trial['recipe']} | {'yes' if trial.get('passed') else 'no'} | "
                f"{_fmt(trial.get('drop_points', trial.get('error')))} | {_fmt(trial.get('latency_ms_p50'))} | "
                f"{size / 1e6:.2f} |"
            )
    lines += ["", "| conversion stage | seconds |", "|---|---|"]
    lines += [f"| {stage.name} | {stage.seconds:.1f} |" for stage in stages]
    if pruning:
        groups = pruning.get("group_ratios") or {}
        ratio = f"ratio {pruning['ratio']}" + (
            f" of the prunable channels (per group: {', '.join(f'{n} {r:g}' for n, r in groups.items())})"
            if groups
            else ""
        )
        lines += [
            "",
            "## Pruning",
            "",
            f"{pruning['mode']} pruning, {ratio}: MACs {pruning['macs_before']:,} -> "
            f"{pruning['macs_after']:,} (x{pruning['macs_after'] / max(pruning['macs_before'], 1):.2f}), "
            f"parameters {pruning['params_before']:,} -> {pruning['params_after']:,}.",
        ]
        if pruning["mode"] == "unstructured" and "gzip_ratio" in pruning:
            lines.append(
                f"Zeroed weights: {100 * pruning.get('sparsity', 0):.1f} %; gzip-compressed weights "
                f"x{pruning['gzip_ratio']:.2f}. Unstructured zeros shrink the compressed file but dense "
                "kernels still multiply them: no speed-up from them, see the latency table."
            )
        if "sparsity_after_distillation" in pruning:
            lines.append(
                f"Zeroed weights after distillation: {100 * pruning['sparsity_after_distillation']:.1f} %."
            )
        lines += [f"- {note}" for note in pruning.get("notes", [])]
        distillation = pruning.get("distillation") or {}
        if distillation.get("steps"):
            budget = distillation.get("budget_s")
            lines.append(
                f"Distillation: {distillation['steps']} steps on {distillation.get('samples')} samples in "
                f"{distillation.get('seconds')} s"
                + (f" (budget {budget:g} s, stopped by {distillation.get('stopped')})" if budget else "")
                + f", loss {distillation.get('loss_first')} -> {distillation.get('loss_last')}; kept the "
                f"checkpoint of step {distillation.get('best_step')} (best on held-out samples)."
            )
        search = pruning.get("search")
        if search:
            lines += _search_section(search, out_dir, images)
    qat = metrics.get("qat")
    if qat:
        lines += _qat_section(qat)
    if excluded:
        lines += ["", f"Kept in float ({len(excluded)}): " + ", ".join(f"`{n}`" for n in excluded)]
    for title, image in images:
        lines += ["", f"## {title}", "", f"![{title}]({image})"]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def _qat_section(qat: dict[str, Any]) -> list[str]:
    """`--qat`: what fine-tuning under the int8 rounding did, like the distillation line above."""
    scheme = qat.get("scheme") or {}
    grid = "per channel" if scheme.get("per_channel") else "per tensor"
    lines = [
        "",
        "## Quantization-aware fine-tuning",
        "",
        f"{qat.get('steps')} steps on {qat.get('samples')} calibration samples in {qat.get('seconds')} s "
        f"(budget {qat.get('budget_s'):g} s, stopped by {qat.get('stopped')}), {qat.get('layers')} Conv/Linear "
        f"layers with {scheme.get('weights')} weights ({grid}) and {scheme.get('activations')} activations "
        f"simulated; held-out loss of the simulated int8 model {_fmt(qat.get('held_out_loss_before'))} -> "
        f"{_fmt(qat.get('held_out_loss_after'))}, kept the checkpoint of step {qat.get('best_step')} (best on "
        "held-out samples). The int8 recipes above quantized this fine-tuned model.",
    ]
    tuned = qat.get("float_model")
    if tuned:
        lines.append(
            f"The fine-tuned model run in float drops {tuned.get('drop_points')} points of {tuned.get('metric')}: "
            "it is not shipped (model.fp32.onnx is the float model before fine-tuning)."
        )
    return lines


def _search_section(search: dict[str, Any], out_dir: Path, images: list[tuple[str, str]]) -> list[str]:
    """The pruning search: every candidate tried, its int8 speed measured here and its agreement, as a
    table and as the curve of speed against agreement (per group: the greedy path through the proposals)."""
    import matplotlib.pyplot as plt

    target = search.get("target_speedup")
    per_group = bool(search.get("per_group"))
    chosen = search.get("chosen")
    if isinstance(chosen, dict):
        chosen = ", ".join(f"{name} {ratio:g}" for name, ratio in chosen.items() if ratio) or "unpruned"
    lines = [
        "",
        "## Pruning search",
        "",
        f"Target: {f'{target:g}x faster than fp32' if target else 'the fastest model'} within --max-drop; "
        f"chosen {'ratios' if per_group else 'ratio'} **{chosen}**."
        + (f" {search['note']}." if search.get("note") else ""),
    ]
    if per_group:
        lines += [
            "",
            f"Per-group greedy search (NetAdapt): {len(search.get('groups', []))} groups "
            f"({', '.join(search.get('group_names', []))}), step {search.get('step')}; stopped: "
            f"{search.get('stopped')} after {search.get('seconds')} s (budget {search.get('budget_s')} s). "
            "Ratio: the share of prunable channels removed; path: the proposal was taken.",
        ]
    head = "| step | group ratios | path | ratio " if per_group else "| ratio "
    lines += [
        "",
        head + "| MACs | int8 latency x fp32 | speed-up | int8 agreement, not distilled | distilled: "
        "agreement (confident) | drop points | gate |",
        "|---" * (head.count("|") + 7) + "|",
    ]
    points = search.get("points", [])
    for p in points:
        distilled = (
            f"{p['agreement']:.3f} ({_fmt(p.get('agreement_confident'))})"
            if p.get("agreement") is not None
            else "-"
        )
        gate = "-" if p.get("passed") is None else ("pass" if p["passed"] else "miss")
        where = ""
        if per_group:
            vector = ", ".join(f"{n} {r:g}" for n, r in (p.get("ratios") or {}).items() if r) or "unpruned"
            where = f"| {p.get('step')} | {vector} | {'yes' if p.get('accepted') else '-'} "
        lines.append(
            f"{where}| {p['ratio']} | x{p['macs_ratio']:.2f} | {p['latency_ratio']:.2f} | {p['speedup']:.2f}x | "
            f"{p['agreement_raw']:.3f} | {distilled} | {_fmt(p.get('drop_points'))} | {gate} |"
        )
    if points:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        path = [p for p in points if p.get("accepted")] if per_group else points
        if per_group:
            proposals = [p for p in points if not p.get("accepted")]
            ax.plot([p["speedup"] for p in proposals], [p["agreement_raw"] for p in proposals], "x",
                    color="#bbbbbb", label="proposals not taken")  # fmt: skip
        ax.plot([p["speedup"] for p in path], [p["agreement_raw"] for p in path], "x:", color="grey",
                label="greedy path, int8, not distilled" if per_group else "int8, not distilled")  # fmt: skip
        tried = [p for p in points if p.get("agreement") is not None]
        ax.plot([p["speedup"] for p in tried], [p["agreement"] for p in tried], "o", label="distilled + int8")
        for p in path:
            label = f"s{p.get('step')}" if per_group else f"p{p['ratio']:g}"
            ax.annotate(label, (p["speedup"], p["agreement_raw"]), fontsize=8,
                        textcoords="offset points", xytext=(3, -10))  # fmt: skip
        if target:
            ax.axvline(target, color="#cc3311", linestyle="--", label=f"target {target:g}x")
        ax.set_xlabel("speed-up vs fp32 (int8, measured here)")
        ax.set_ylabel("top-1 agreement with fp32")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("Pruning search: speed against agreement")
        _save(fig, out_dir / "search.png", "Pruning search curve", images)
    return lines


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
