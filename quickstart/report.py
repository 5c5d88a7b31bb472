"""The demo's report: report.json, PNG figures (query/result grids, Recall@k, score spread, the
hot-swap timeline) and an index.html that shows them with the figures' tables, beginning with the
answer to "did training help?" (version 1, the untrained backbone, beside version 2, the trained one)."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: figures are files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


@dataclass(frozen=True)
class GridRow:
    """One query and what the system returned for it."""

    query_path: str
    query_label: str
    hit_paths: Sequence[str]
    hit_labels: Sequence[str]
    hit_scores: Sequence[float]


def _thumbnail(path: str, size: int = 96) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.NEAREST))


def result_grid(rows: Sequence[GridRow], out: Path, title: str) -> Path:
    """Queries down the left, their top hits to the right; green frame = same class as the query."""
    n_hits = max(len(r.hit_paths) for r in rows)
    fig, axes = plt.subplots(
        len(rows), n_hits + 1, figsize=(1.5 * (n_hits + 1), 1.7 * len(rows)), squeeze=False
    )
    for i, row in enumerate(rows):
        ax = axes[i][0]
        ax.imshow(_thumbnail(row.query_path))
        ax.set_title(f"query\n{row.query_label}", fontsize=8, fontweight="bold")
        for j in range(n_hits):
            ax = axes[i][j + 1]
            if j >= len(row.hit_paths):
                ax.axis("off")
                continue
            ax.imshow(_thumbnail(row.hit_paths[j]))
            good = row.hit_labels[j] == row.query_label
            ax.set_title(
                f"{j + 1}. {row.hit_labels[j]}\n{row.hit_scores[j]:.3f}",
                fontsize=7,
                color="darkgreen" if good else "firebrick",
            )
            for spine in ax.spines.values():
                spine.set_edgecolor("limegreen" if good else "red")
                spine.set_linewidth(3)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][0].axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def recall_figure(curves: dict[str, dict[str, float]], out: Path) -> Path:
    """Recall@k of each named evaluation (system v1, offline v1, system v2, ...)."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, figures in curves.items():
        ks = sorted(int(k.split("@")[1]) for k in figures if k.startswith("recall@"))
        ax.plot(
            ks,
            [figures[f"recall@{k}"] for k in ks],
            marker="o",
            label=name,
            linestyle="--" if "offline" in name else "-",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("Recall@k")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def spread_figure(spreads: dict[str, dict], out: Path) -> Path:
    """Cosine scores of each version: same-class vs different-class top hits and random pairs (mean, p05-p95)."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    groups = [
        ("top hits,\nsame class", "top_hits", "same"),
        ("top hits,\nother class", "top_hits", "different"),
        ("random pairs,\nsame class", "random_pairs", "same"),
        ("random pairs,\nother class", "random_pairs", "different"),
    ]
    width = 0.8 / max(len(spreads), 1)
    for i, (name, spread) in enumerate(spreads.items()):
        stats = [spread[kind][which] for _, kind, which in groups]
        xs = np.arange(len(groups)) + (i - (len(spreads) - 1) / 2) * width
        means = np.array([s["mean"] for s in stats])
        low = means - np.array([s["p05"] for s in stats])
        high = np.array([s["p95"] for s in stats]) - means
        ax.bar(xs, means, width, yerr=[low, high], capsize=3, label=name)
    ax.set_xticks(np.arange(len(groups)), [g[0] for g in groups], fontsize=7)
    ax.set_ylabel("cosine (mean, 5th-95th percentile)")
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.05)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def swap_figure(samples: Sequence[dict], events: dict[str, float], out: Path) -> Path:
    """Every search during the hot-swap: its time, latency and the model version that answered."""
    fig, ax = plt.subplots(figsize=(7, 3))
    versions = sorted({s["model_version"] for s in samples if s["ok"]})
    for version in versions:
        xs = [s["t"] for s in samples if s["ok"] and s["model_version"] == version]
        ys = [s["latency_ms"] for s in samples if s["ok"] and s["model_version"] == version]
        ax.scatter(xs, ys, s=6, label=f"answered by model version {version}")
    failed = [s for s in samples if not s["ok"]]
    if failed:
        ax.scatter(
            [s["t"] for s in failed],
            [s["latency_ms"] for s in failed],
            s=20,
            marker="x",
            color="red",
            label=f"failed ({len(failed)})",
        )
    for name, t in events.items():
        ax.axvline(t, color="grey", linestyle=":")
        ax.text(t, ax.get_ylim()[1] * 0.95, f" {name}", fontsize=7, va="top", rotation=90)
    ax.set_xlabel("seconds since the swap began")
    ax.set_ylabel("Search latency (ms)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "✓" if value else "<b style='color:firebrick'>✗</b>"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.ok{color:darkgreen}.bad{color:firebrick}code{background:#f5f5f5;padding:0 .2em}"""


def _spread_rows(name: str, spread: dict) -> list[list[object]]:
    rows = []
    for kind, label in (("top_hits", f"top-{spread['top_k']} hits"), ("random_pairs", "random pairs")):
        for which in ("same", "different"):
            s = spread[kind][which]
            rows.append(
                [
                    name,
                    label,
                    "same class" if which == "same" else "other class",
                    s["mean"],
                    s["std"],
                    s["p05"],
                    s["p95"],
                ]
            )
    return rows


def _did_training_help(report: dict, figures: dict[str, str]) -> list[str]:
    comparison = report.get("comparison")
    if not comparison:
        return []
    v1, v2 = report["evaluation_v1"]["figures"], report["evaluation"]["figures"]
    parts = [
        "<h2>Did training help?</h2>",
        "<p>Version 1 is the backbone as it was before any training on this catalogue; version 2 the trained "
        "model. Same catalogue (train split, indexed), same queries (test split), both through the Search RPC.</p>",
        _table(
            ["metric", "version 1 (untrained)", "version 2 (trained)", "gain"],
            [[r["metric"], r["v1"], r["v2"], f"{r['gain']:+.4f}"] for r in comparison["metrics"]],
        ),
        "<h3>Recall@1 per class</h3>",
        _table(
            ["query class", "version 1", "version 2"],
            [[r["class"], r["v1"], r["v2"]] for r in comparison["per_class_recall@1"]],
        ),
        "<h3>Most confused class pairs (rank 1 of another class)</h3>",
    ]
    for name, fig in (("version 1", v1), ("version 2", v2)):
        parts += [
            f"<p>{name}:</p>",
            _table(
                ["query class", "answered with", "queries", "share of the class's queries"],
                [
                    [p["query_class"], p["answered_class"], p["count"], p["share_of_class"]]
                    for p in fig["confused_pairs"]
                ]
                or [["none", "", "", ""]],
            ),
        ]
    parts += [
        "<h3>Score spread (cosine)</h3>",
        "<p>The scores of the top hits of each query, split by whether the hit is of the query's class, "
        "and of random pairs of the system's vectors. A trained model should score right answers high and "
        "different classes low, with room between them for a <code>min_score</code>.</p>",
        _table(
            ["version", "pairs", "classes", "mean", "std", "5th pct", "95th pct"],
            _spread_rows("version 1", v1["spread"]) + _spread_rows("version 2", v2["spread"]),
        ),
    ]
    for name, fig in (("version 1", v1), ("version 2", v2)):
        if fig.get("collapse_warning"):
            parts.append(f"<p><b class='bad'>Warning, {name}: {html.escape(fig['collapse_warning'])}</b></p>")
    if "spread" in figures:
        parts.append(f"<img src='{figures['spread']}' alt='score spread'>")
    return parts


def _agreement(ev: dict, title: str) -> list[str]:
    return [
        f"<h2>Quality of {html.escape(title)}: through the system vs offline on the same embeddings</h2>",
        f"<p>{ev['queries']} queries (test split) against {ev['gallery']} catalogue items; "
        f"original mAP@10 over {ev['trials']} seeded query draws. Tolerance per metric: the share of queries "
        f"whose first <i>depth</i> hit labels differ from an exact search over the exported vectors (the most "
        f"an approximate index can change the mean). HNSW neighbour recall vs exact: "
        f"{ev['neighbour_recall']:.4f} (required: {ev['min_neighbour_recall']}); largest hit-score difference "
        f"from the offline cosine: {ev['max_score_error']:.2e}; hits whose label differs from the stored "
        f"one: {ev['hits_with_wrong_label']}. "
        + ("<b class='ok'>They agree.</b>" if ev["agree"] else "<b class='bad'>They DISAGREE.</b>")
        + "</p>",
        _table(
            [
                "metric",
                "system (Search RPC)",
                "offline (trainer.metrics)",
                "|difference|",
                "tolerance",
                "agree",
            ],
            [
                [r["metric"], r["system"], r["offline"], r["difference"], r["tolerance"], r["agree"]]
                for r in ev["rows"]
            ],
        ),
    ]


def write_report(out_dir: Path, report: dict, figures: dict[str, str]) -> Path:
    """Writes report.json and index.html into ``out_dir`` (figures are PNG names in that folder)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    swap = report.get("hot_swap", {})
    parts = [
        "<!doctype html><meta charset='utf-8'><title>CBIR demo report</title>",
        f"<style>{STYLE}</style>",
        "<h1>CBIR demo report</h1>",
        f"<p>{html.escape(report.get('started', ''))} · {report.get('wall_seconds', 0):.0f} s wall time · "
        f"{html.escape(report.get('machine', ''))} · mode: {'quick' if report.get('quick') else 'full'}</p>",
        "<p>" + html.escape(report.get("summary", "")) + "</p>",
        "<h2>Data</h2>",
        _table(
            ["source", "classes", "catalogue (indexed, train split)", "queries (test split)"],
            [
                [
                    report["data"]["source"],
                    len(report["data"]["classes"]),
                    report["data"]["train_count"],
                    report["data"]["test_count"],
                ]
            ],
        )
        if "data" in report
        else "",
        "<h2>Models</h2>",
        _table(
            ["version", "what", "backbone", "embedding dim", "training steps", "training seconds"],
            [
                [
                    m["version"],
                    m.get("what", ""),
                    m.get("backbone", ""),
                    m.get("embedding_dim", ""),
                    m.get("steps", ""),
                    m.get("train_seconds", 0.0),
                ]
                for m in report.get("models", [])
            ],
        ),
    ]
    parts += _did_training_help(report, figures)
    for title, key in (
        ("version 2, trained", "evaluation"),
        ("version 1, untrained", "evaluation_v1"),
    ):
        if report.get(key):
            parts += _agreement(report[key], title)
    if "recall" in figures:
        parts.append(f"<img src='{figures['recall']}' alt='Recall@k'>")
    if swap:
        parts += [
            "<h2>Hot-swap</h2>",
            f"<p>Version {swap['from_version']} → {swap['to_version']}: generation "
            f"<code>{html.escape(swap['from_generation'])}</code> → <code>{html.escape(swap['to_generation'])}</code>, "
            f"reindexed and activated while a background client kept searching.</p>",
            _table(
                [
                    "searches",
                    "failed",
                    "answered by v_old",
                    "answered by v_new",
                    "version ≠ generation's",
                    "zero failures",
                    "versions consistent",
                ],
                [
                    [
                        swap["searches"],
                        swap["failed"],
                        swap["answered_by_old"],
                        swap["answered_by_new"],
                        swap["inconsistent"],
                        swap["failed"] == 0,
                        swap["inconsistent"] == 0,
                    ]
                ],
            ),
        ]
        if swap.get("errors"):
            parts.append("<pre>" + html.escape("\n".join(swap["errors"][:10])) + "</pre>")
        if "swap" in figures:
            parts.append(f"<img src='{figures['swap']}' alt='hot-swap timeline'>")
    for key in sorted(k for k in figures if k.startswith("grid")):
        parts += [
            f"<h2>Queries and their results ({html.escape(key.split('_', 1)[-1])})</h2>",
            "<p>Green: same class as the query; red: another class. Number under the label: cosine score.</p>",
            f"<img src='{figures[key]}' alt='{key}'>",
        ]
    if report.get("timings"):
        parts += [
            "<h2>Where the time went</h2>",
            _table(["step", "seconds"], [[k, v] for k, v in report["timings"].items()]),
        ]
    if report.get("services"):
        parts += [
            "<h2>Services</h2>",
            _table(
                ["service", "address", "pid", "log"],
                [[s["name"], s["target"], s["pid"], s["log"]] for s in report["services"]],
            ),
        ]
    (out_dir / "index.html").write_text("\n".join(parts))
    return out_dir / "index.html"
