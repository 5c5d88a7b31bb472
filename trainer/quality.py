"""Quality figures on a folder-per-class dataset: the frozen backbone vs the default recipe and its alternatives.

`python -m trainer quality --data ../shared/datasets/clothing-small` measures, with the catalogue = the
train split and the queries = the test split (``--queries validation`` to choose a recipe without
looking at the test split), cosine, exact search: (a) the pretrained EfficientNet-Lite0 as it is (its
1280-d pooled features, L2-normalised); (b) the default recipe (trainer/recipes.py) and each
alternative of recipes.ALTERNATIVES: other losses, another cut, fewer views, and the plain partial fine-tune of
the same layers without the activation cache. Each row: Recall@1/5/10, mAP@R, the score spread,
training minutes (the cache included) and images/s. The last checkpoint of each run is measured.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from cbir.errors import InvalidInput
from trainer import metrics, recipes
from trainer.config import DataDirs, TrainingConfig
from trainer.data import load_splits
from trainer.embedding import build_model, embed_paths
from trainer.models import frozen_backbone_model
from trainer.runs import RunDir, checkpoint_path, restore_model
from trainer.training import TrainOptions, train

KS = (1, 5, 10)


def _measure(vectors_of, config: TrainingConfig, catalogue, queries) -> dict:
    gallery, asked = vectors_of(catalogue.paths), vectors_of(queries.paths)
    result = metrics.evaluate(
        asked,
        queries.labels,
        gallery_embeddings=gallery,
        gallery_labels=catalogue.labels,
        ks=KS,
        metric="cosine",
        nmi=False,
    )
    spread = metrics.score_spread(
        asked, queries.labels, gallery_embeddings=gallery, gallery_labels=catalogue.labels
    )
    row: dict[str, float | list[float]] = {k: round(float(v), 4) for k, v in result.items()}
    row["different_class_cosine"] = round(spread["random_pairs"]["different"]["mean"], 3)
    row["top_hits_same_vs_other"] = [
        round(spread["top_hits"]["same"]["mean"], 3),
        round(spread["top_hits"]["different"]["mean"], 3),
    ]
    return row


def run_quality(
    data: Path,
    *,
    work_dir: Path | None,
    candidates: Sequence[str],
    output: Path | None,
    queries: str = "test",
    steps: int | None = None,
    max_minutes: float | None = None,
) -> dict:
    data = Path(data).expanduser().resolve()
    if not (data / "train").is_dir() or not (data / queries).is_dir():
        raise InvalidInput(
            f"{data} must be a folder-per-class dataset with train/ and {queries}/ split folders"
        )
    unknown = [c for c in candidates if c not in recipes.ALTERNATIVES]
    if unknown:
        raise InvalidInput(f"unknown candidates {unknown}; choose from {', '.join(recipes.ALTERNATIVES)}")
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="cbir-quality-"))
    dirs = DataDirs(work.resolve())
    splits = load_splits(str(data), dirs, ("train", queries))
    catalogue, asked = splits["train"], splits[queries]
    rows: dict[str, dict] = {}

    base = recipes.recipe_config(str(data), dirs)
    started = time.monotonic()
    frozen = frozen_backbone_model(
        base.model.name, (base.model.input.height, base.model.input.width), "imagenet"
    )
    rows["(a) pretrained efficientnet_lite0, no training (1280-d)"] = _measure(
        lambda paths: embed_paths(frozen, paths, base), base, catalogue, asked
    )
    print(f"(a) done in {time.monotonic() - started:.0f}s: {next(iter(rows.values()))}", flush=True)

    for name in candidates:
        overrides = [*recipes.ALTERNATIVES[name], *([f"model.fit.epochs={steps}"] if steps else [])]
        config = recipes.recipe_config(str(data), dirs, overrides)
        run_name = "quality_" + "".join(ch if ch.isalnum() else "_" for ch in name)
        started = time.monotonic()
        result = train(
            config,
            dirs,
            TrainOptions(
                max_minutes=max_minutes,
                run_name=run_name,
                resume=RunDir(dirs.run_dir(run_name)).exists(),  # a re-run continues, never overwrites
            ),
        )
        minutes = (time.monotonic() - started) / 60
        model = build_model(config, weights=None)
        step = restore_model(model, checkpoint_path(RunDir(dirs.run_dir(run_name)), "latest"))
        row = _measure(
            lambda paths, model=model, config=config: embed_paths(model, paths, config),
            config,
            catalogue,
            asked,
        )
        row.update(
            steps=step,
            minutes=round(minutes, 1),
            cache_minutes=round(result.cache_seconds / 60, 1),
            images_per_second=round(result.images_per_second, 1),
            overrides=overrides,
        )
        rows[f"(b) {name}"] = row
        print(f"{name}: {row}", flush=True)

    print()
    print(
        f"{data.name}: catalogue = train ({len(catalogue)} images), queries = {queries} ({len(asked)}), cosine"
    )
    print(
        "| model | Recall@1 | Recall@5 | Recall@10 | mAP@R | different-class cosine | steps | minutes | images/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['recall@1']:.4f} | {row['recall@5']:.4f} | {row['recall@10']:.4f} | "
            f"{row['map@r']:.4f} | {row['different_class_cosine']:.3f} | {row.get('steps', '-')} | "
            f"{row.get('minutes', '-')} | {row.get('images_per_second', '-')} |"
        )
    report = {"data": str(data), "queries": queries, "catalogue_images": len(catalogue), "results": rows}
    if output:
        Path(output).write_text(json.dumps(report, indent=2) + "\n")
    return report
