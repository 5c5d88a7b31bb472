"""Quality figures on a real folder-per-class dataset: pretrained efficientnet_lite0 vs fine-tuned.

`python -m trainer quality --data ../shared/datasets/clothing-small --minutes 15` measures, on the test
split (leave-one-out, cosine): (a) the pretrained EfficientNet-Lite0 backbone with no training (its
1280-d pooled features, L2-normalised), then (b) the same backbone with a 128-d direct_normalize head
fine-tuned for a bounded time with each loss, the backbone's BatchNorm statistics frozen. The test split is never used to pick a checkpoint
(eval_frequency = -1): each fine-tuned model is the last one of its time budget.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from cbir.errors import InvalidInput
from trainer import metrics
from trainer.backbones import build_backbone
from trainer.config import DataDirs, config_from_dict
from trainer.data import load_splits
from trainer.embedding import build_model, embed_paths
from trainer.runs import RunDir, checkpoint_path, restore_model
from trainer.training import TrainOptions, train


def quality_config(data: Path, loss: str) -> dict:
    """The fine-tuning config (the original schema) for one loss."""
    angular = loss == "angular_loss"
    fit = {
        "loss": loss,
        "metric": "euclidean",
        "optimizer": "adam",
        "epochs": 1_000_000,  # the time budget ends the run
        "lr": 3e-4,  # the original configs' rate
        "decay_start_iteration": -1,
        **({"alpha": 45} if angular else {"margin": 0.2}),
    }
    return {
        "dataset": str(data),
        "loading_threads": 2,
        "checkpoint_frequency": 50,
        "eval_frequency": -1,
        "model": {
            "name": "efficientnet_lite0",
            "head": "direct_normalize",
            "embedding_dim": 128,
            "weights": "imagenet",
            "input": {"height": 224, "width": 224},
            "crop": {"height": 256, "width": 256},
            "batch": {"P": 10, "K": 2 if angular else 4},
            "fit": fit,
        },
    }


def _evaluate(model, config, paths, labels) -> dict:
    vectors = embed_paths(model, paths, config, batch_size=32)
    result = metrics.evaluate(vectors, labels, metric="cosine", nmi=True)
    return {k: round(float(v), 4) for k, v in result.items()}


def run_quality(
    data: Path,
    *,
    minutes: float,
    work_dir: Path | None,
    losses: list[str],
    output: Path | None,
    train_from: str | None = None,
) -> dict:
    data = Path(data).expanduser().resolve()
    if not (data / "train").is_dir() or not (data / "test").is_dir():
        raise InvalidInput(f"{data} must be a folder-per-class dataset with train/ and test/ split folders")
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="cbir-quality-"))
    dirs = DataDirs(work.resolve())
    base = config_from_dict(quality_config(data, losses[0] if losses else "semi_hard_triplet"))
    test = load_splits(str(data), dirs, ("test",))["test"]
    rows: dict[str, dict] = {}

    started = time.monotonic()
    backbone = build_backbone("efficientnet_lite0", (224, 224), "imagenet")
    rows["(a) pretrained efficientnet_lite0, no training (1280-d)"] = _evaluate(
        backbone, base, test.paths, test.labels
    )
    print(f"(a) done in {time.monotonic() - started:.0f}s: {rows[next(iter(rows))]}")

    for loss in losses:
        config = config_from_dict(quality_config(data, loss))
        run_name = f"quality_{loss}" + (f"_from_{train_from}" if train_from else "")
        result = train(
            config,
            dirs,
            TrainOptions(
                max_minutes=minutes,
                run_name=run_name,
                resume=RunDir(dirs.run_dir(run_name)).exists(),  # a re-run continues, never overwrites
                freeze_batchnorm=True,
                train_from=train_from,
            ),
        )
        model = build_model(config, weights=None)
        step = restore_model(model, checkpoint_path(RunDir(dirs.run_dir(run_name)), "latest"))
        row = _evaluate(model, config, test.paths, test.labels)
        row.update(steps=step, images_per_second=round(result.images_per_second, 2), minutes=minutes)
        if train_from:
            row["train_from"] = train_from
        rows[f"(b) fine-tuned, {loss} ({config.run_name})"] = row
        print(f"{loss}: {row}")

    print()
    print(f"Test split of {data.name}: {len(test)} images, leave-one-out, cosine")
    print("| model | Recall@1 | mAP@R | NMI | steps |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['recall@1']:.4f} | {row['map@r']:.4f} | {row['nmi']:.4f} | {row.get('steps', '-')} |"
        )
    report = {"data": str(data), "test_images": len(test), "minutes_per_loss": minutes, "results": rows}
    if output:
        Path(output).write_text(json.dumps(report, indent=2) + "\n")
    return report
