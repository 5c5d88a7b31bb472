"""`python -m trainer <command> -c CONFIG ...`: the original train / embed / test / evaluation / cbir scripts, plus export."""

from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import cast

import numpy as np

from cbir.cli import run_main
from cbir.errors import InvalidInput
from cbir.logs import configure_cli_logging
from trainer.config import ConfigError, DataDirs, TrainingConfig, load_config, resolve_data_dir
from trainer.options import TrainOptions
from trainer.recipes import ALTERNATIVES

log = logging.getLogger("trainer")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "-c",
        "--config",
        help="training config: a path, or the name of a shipped config in trainer/trainings/",
    )
    source.add_argument(
        "--dataset",
        help="no config of yours: a folder-per-class dataset (<root>/{train,test}/<class>/*.jpg) or a .csv/.jsonl "
        "manifest, trained with the default recipe for real photos (trainer/recipes.py)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a config field by its dotted path, value as JSON (repeatable): --set model.fit.epochs=20",
    )
    parser.add_argument(
        "--data-dir",
        help="data root with datasets/, checkpoints/, emb/, logs/ (default: $CBIR_DATA_DIR, else data_dir "
        "in $CBIR_SETTINGS or ~/.config/cbir/settings.json)",
    )
    parser.add_argument(
        "--run-name", help="run folder name (default: the original run name built from the config)"
    )
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _inference(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        default="best",
        help="best (the best test Recall@1 so far, else latest), latest, or a checkpoint path (default: best)",
    )
    parser.add_argument(
        "--untrained",
        action="store_true",
        help="use the initial weights (model.weights, e.g. pretrained ImageNet) instead of a checkpoint",
    )
    parser.add_argument(
        "-b", "--batch-size", type=_positive_int, default=32, help="images per inference batch"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Train metric-learning embedding models with the original JSON configs, build the gallery, "
        "evaluate, query, and export SavedModels for TF Serving.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model (P x K batches, checkpoints, periodic Recall@1)")
    _common(train)
    train.add_argument(
        "--resume", action="store_true", help="continue an existing run from its latest checkpoint"
    )
    train.add_argument("--max-minutes", type=_positive_float, help="stop (and save) after this many minutes")
    train.add_argument(
        "--max-steps", type=_positive_int, help="stop (and save) after this many more iterations"
    )
    train.add_argument(
        "--seed",
        type=int,
        default=TrainOptions.seed,
        help="seed of the initial weights, the batch sampler and augmentation",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    train.add_argument(
        "--freeze-batchnorm",
        action="store_true",
        help="keep the backbone's BatchNorm statistics frozen (= --set model.finetune.freeze_batchnorm=true)",
    )
    train.add_argument(
        "--train-from",
        metavar="LAYER",
        help="fine-tune only the backbone layers from LAYER on, e.g. block11_expand_conv "
        "(= --set model.finetune.train_from=LAYER)",
    )

    embed = commands.add_parser("embed", help="embed the gallery (train split) into <data_dir>/emb/<run>.h5")
    _common(embed)
    _inference(embed)

    test = commands.add_parser("test", help="a random test image as query: top-R and a PNG figure")
    _common(test)
    _inference(test)
    test.add_argument("-r", "--n-retrievals", type=_positive_int, default=10, help="images to retrieve")
    test.add_argument("--seed", type=int, default=None, help="seed choosing the query (default: random)")
    test.add_argument(
        "-o", "--output", type=Path, help="figure path (default: <data_dir>/logs/<run>/test/...png)"
    )

    evaluation = commands.add_parser(
        "evaluation", help="the original MAP over T random test queries, plus mAP@R, Recall@K and NMI"
    )
    _common(evaluation)
    _inference(evaluation)
    evaluation.add_argument(
        "-t", "--n-test-samples", type=_positive_int, default=100, help="random test queries"
    )
    evaluation.add_argument("-r", "--n-retrievals", type=_positive_int, default=10, help="R of AP@R")
    evaluation.add_argument("--seed", type=int, default=0, help="seed choosing the test queries")

    cbir = commands.add_parser("cbir", help="any image file as query: top-R and a PNG figure")
    _common(cbir)
    _inference(cbir)
    cbir.add_argument("-r", "--n-retrievals", type=_positive_int, default=10, help="images to retrieve")
    cbir.add_argument(
        "-o", "--output", type=Path, help="figure path (default: <data_dir>/logs/<run>/cbir/...png)"
    )
    cbir.add_argument("image", type=Path, help="the query image file")

    export = commands.add_parser("export", help="publish a SavedModel version for TF Serving")
    _common(export)
    _inference(export)
    export.add_argument(
        "--model-repo", type=Path, required=True, help="model repository (TF Serving's base path)"
    )
    export.add_argument("--model-name", help="model name in the repository (default: the run name)")
    export.add_argument("--version", type=_positive_int, help="version number (default: the next integer)")
    export.add_argument(
        "--frozen-backbone",
        action="store_true",
        help="export the backbone as it is (model.weights, e.g. ImageNet), with no head and no training: "
        "its pooled features, L2-normalised (to compare a fine-tuned model against)",
    )

    quality = commands.add_parser(
        "quality",
        help="quality figures on a folder-per-class dataset: the frozen backbone vs the default recipe and "
        "its alternatives",
    )
    quality.add_argument(
        "--data", type=Path, required=True, help="folder-per-class dataset with train/ and test/"
    )
    quality.add_argument(
        "--queries",
        default="test",
        help="split whose images are the queries (the catalogue is train); validation to choose a recipe",
    )
    quality.add_argument(
        "--candidates",
        default=",".join(ALTERNATIVES),
        help=f"comma-separated runs to make (default: all of {', '.join(ALTERNATIVES)})",
    )
    quality.add_argument(
        "--steps", type=_positive_int, help="training steps of each run (default: the recipe's)"
    )
    quality.add_argument(
        "--max-minutes",
        type=_positive_float,
        help="stop each run after this many minutes (its last checkpoint counts)",
    )
    quality.add_argument("--work-dir", type=Path, help="where runs are written (default: a temporary folder)")
    quality.add_argument("--output", type=Path, help="also write the results as JSON here")
    quality.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


# --- commands ---------------------------------------------------------------------------------------


class _Context:
    """What every command needs: the config, the data folders, the run folder."""

    def __init__(self, args: argparse.Namespace):
        overrides = list(args.overrides)
        if getattr(args, "train_from", None):
            overrides.append(f"model.finetune.train_from={args.train_from}")
        if getattr(args, "freeze_batchnorm", False):
            overrides.append("model.finetune.freeze_batchnorm=true")
        if args.config:
            self.config: TrainingConfig = load_config(args.config, overrides)
            self.dirs: DataDirs = resolve_data_dir(args.data_dir)
        else:
            from trainer.recipes import recipe_config

            self.dirs = resolve_data_dir(args.data_dir)  # a relative --dataset is read below it
            self.config = recipe_config(args.dataset, self.dirs, overrides)
        self.run_name: str = args.run_name or self.config.run_name
        self.args = args

    def load_model(self):
        """The model restored from the run's checkpoint (or the initial weights with --untrained)."""
        from trainer.embedding import build_model
        from trainer.runs import RunDir, checkpoint_path, restore_model

        if self.args.untrained:
            _seed_initial_weights()
            model = build_model(self.config, weights=self.config.model.weights)
            print(f"Using the initial weights ({self.config.model.weights or 'random'}), no checkpoint")
            return model, 0
        path = checkpoint_path(RunDir(self.dirs.run_dir(self.run_name)), self.args.checkpoint)
        model = build_model(self.config, weights=None)
        step = restore_model(model, path)
        print(f"Restored {path} (step {step})")
        return model, step

    def figure_path(self, kind: str, explicit: Path | None) -> Path:
        if explicit:
            return explicit
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return self.dirs.logs / self.run_name / kind / f"{stamp}.png"


def cmd_train(args) -> int:
    from trainer.training import train

    ctx = _Context(args)
    result = train(
        ctx.config,
        ctx.dirs,
        TrainOptions(
            resume=args.resume,
            max_minutes=args.max_minutes,
            max_steps=args.max_steps,
            seed=args.seed,
            run_name=args.run_name,
            progress=not args.no_progress,
        ),
    )
    if result.best:
        print(f"Best test Recall@1 {result.best['recall@1']:.4f} at step {result.best['step']}")
    print(f"Run folder: {result.run_dir}")
    return 0


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


def cmd_embed(args) -> int:
    from trainer.data import load_splits
    from trainer.embedding import Gallery, embed_paths, write_gallery

    ctx = _Context(args)
    split = load_splits(ctx.config.dataset, ctx.dirs, ("train",))["train"]
    model, step = ctx.load_model()
    with _progress(len(split), "embed") as bar:
        vectors = embed_paths(model, split.paths, ctx.config, batch_size=args.batch_size, progress=bar)
    path = ctx.dirs.embeddings_file(ctx.run_name)
    write_gallery(
        path,
        Gallery(
            ids=split.ids,
            labels=split.labels,
            label_names=split.class_names,
            paths=split.paths,
            vectors=vectors,
            run_name=ctx.run_name,
            step=step,
        ),
    )
    print(f"Embedded {len(split)} gallery images (train split) of dimension {vectors.shape[1]} into {path}")
    return 0


def _query_labels_in_gallery(split, gallery) -> np.ndarray:
    """Test labels re-indexed into the gallery's class names (-1 for a class the gallery lacks)."""
    index = {name: i for i, name in enumerate(gallery.label_names)}
    return np.array([index.get(split.class_names[label], -1) for label in split.labels], dtype=np.int64)


def _print_hits(hits, gallery, query_label: int | None) -> list[bool]:
    relevant = []
    print(f"{'rank':>4}  {'distance':>9}  {'class':<20} path")
    for hit in hits:
        label = int(gallery.labels[hit.index])
        relevant.append(query_label is not None and label == query_label)
        mark = " *" if relevant[-1] else ""
        print(
            f"{hit.rank:>4}  {hit.distance:9.4f}  {gallery.label_names[label]:<20} {gallery.paths[hit.index]}{mark}"
        )
    return relevant


def cmd_test(args) -> int:
    from trainer.data import load_splits
    from trainer.embedding import embed_paths, read_gallery
    from trainer.retrieval import ap_curve, draw_results, search

    ctx = _Context(args)
    gallery = read_gallery(ctx.dirs.embeddings_file(ctx.run_name))
    split = load_splits(ctx.config.dataset, ctx.dirs, ("test",))["test"]
    seed = args.seed if args.seed is not None else int(cast(int, np.random.SeedSequence().entropy) % (2**31))
    pick = int(np.random.default_rng(seed).integers(len(split)))
    model, _ = ctx.load_model()
    query = embed_paths(model, [split.paths[pick]], ctx.config)[0]
    query_label = int(_query_labels_in_gallery(split, gallery)[pick])
    hits = search(query, gallery.vectors, args.n_retrievals, ctx.config.model.fit.metric)
    print(f"Query (seed {seed}): {split.paths[pick]}  class {split.class_names[split.labels[pick]]}")
    relevant = _print_hits(hits, gallery, query_label)
    ap, aps = ap_curve(relevant)
    print(f"AP@{args.n_retrievals}: {ap * 100:.2f}%")
    figure = draw_results(
        ctx.figure_path("test", args.output),
        split.paths[pick],
        split.class_names[split.labels[pick]],
        [gallery.paths[h.index] for h in hits],
        [gallery.label_names[gallery.labels[h.index]] for h in hits],
        ap=ap,
        aps=aps,
    )
    print(f"Figure: {figure}")
    return 0


def cmd_evaluation(args) -> int:
    from trainer import metrics
    from trainer.data import load_splits
    from trainer.embedding import embed_paths, read_gallery
    from trainer.runs import RunDir

    ctx = _Context(args)
    gallery = read_gallery(ctx.dirs.embeddings_file(ctx.run_name))
    split = load_splits(ctx.config.dataset, ctx.dirs, ("test",))["test"]
    model, step = ctx.load_model()
    with _progress(len(split), "embed test split") as bar:
        queries = embed_paths(model, split.paths, ctx.config, batch_size=args.batch_size, progress=bar)
    labels = _query_labels_in_gallery(split, gallery)
    metric = ctx.config.model.fit.metric
    score = metrics.original_map(
        queries,
        labels,
        gallery.vectors,
        gallery.labels,
        trials=args.n_test_samples,
        r=args.n_retrievals,
        seed=args.seed,
        metric=metric,
    )
    print(f"MAP: {score * 100:.2f}%")
    loo = metrics.evaluate(queries, split.labels, metric=metric, nmi=True)
    vs_gallery = metrics.evaluate(
        queries,
        labels,
        gallery_embeddings=gallery.vectors,
        gallery_labels=gallery.labels,
        metric=metric,
        nmi=False,
    )
    print(f"Test split ({len(split)} images, leave-one-out, {metric}):")
    _print_metrics(loo)
    print(f"Test queries against the gallery ({len(gallery)} train images):")
    _print_metrics(vs_gallery)
    spread = metrics.score_spread(
        queries, labels, gallery_embeddings=gallery.vectors, gallery_labels=gallery.labels
    )
    top, pairs = spread["top_hits"], spread["random_pairs"]
    print(
        f"Score spread (cosine): top-{spread['top_k']} hits of the query's class {top['same']['mean']:.3f} "
        f"± {top['same']['std']:.3f}, of another class {top['different']['mean']:.3f} ± {top['different']['std']:.3f}; "
        f"random pairs: same class {pairs['same']['mean']:.3f}, different classes {pairs['different']['mean']:.3f}"
    )
    warning = metrics.collapse_warning(spread)
    if warning:
        print(f"warning: {warning}")
    result = {
        "step": step,
        "original_map": {
            "value": score,
            "trials": args.n_test_samples,
            "r": args.n_retrievals,
            "seed": args.seed,
        },
        "test_leave_one_out": loo,
        "test_vs_gallery": vs_gallery,
        "score_spread": spread,
    }
    run = RunDir(ctx.dirs.run_dir(ctx.run_name))
    if run.path.is_dir() and not args.untrained:
        (run.path / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _print_metrics(result: dict) -> None:
    recalls = "  ".join(
        f"R@{k.split('@')[1]} {v * 100:.2f}%" for k, v in result.items() if k.startswith("recall@")
    )
    print(
        f"  mAP@R: {result['map@r'] * 100:.2f}%   {recalls}"
        + (f"   NMI: {result['nmi']:.4f}" if "nmi" in result else "")
    )


def cmd_cbir(args) -> int:
    from trainer.data import looks_like_image
    from trainer.embedding import embed_paths, read_gallery
    from trainer.retrieval import draw_results, search

    ctx = _Context(args)
    image = args.image
    try:
        with open(image, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise InvalidInput(f"cannot read image {image}: {exc.strerror or exc}") from exc
    if not looks_like_image(head):
        raise InvalidInput(f"{image} is not a JPEG, PNG, GIF, BMP or WebP image")
    gallery = read_gallery(ctx.dirs.embeddings_file(ctx.run_name))
    model, _ = ctx.load_model()
    query = embed_paths(model, [str(image)], ctx.config)[0]
    hits = search(query, gallery.vectors, args.n_retrievals, ctx.config.model.fit.metric)
    print(f"Query: {image}")
    _print_hits(hits, gallery, None)
    figure = draw_results(
        ctx.figure_path("cbir", args.output),
        str(image),
        None,
        [gallery.paths[h.index] for h in hits],
        [gallery.label_names[gallery.labels[h.index]] for h in hits],
    )
    print(f"Figure: {figure}")
    return 0


def _seed_initial_weights() -> None:
    """Random initial weights (and a backbone's random layers) are those a training run with the
    default seed starts from, so an untrained export can be repeated."""
    import keras

    keras.utils.set_random_seed(TrainOptions.seed)


def cmd_export(args) -> int:
    from trainer.export import export_model
    from trainer.runs import RunDir

    ctx = _Context(args)
    if args.frozen_backbone:
        from trainer.models import frozen_backbone_model

        m = ctx.config.model
        _seed_initial_weights()
        model = frozen_backbone_model(m.name, (m.input.height, m.input.width), m.weights)
        path = export_model(
            model,
            ctx.config,
            args.model_repo,
            model_name=args.model_name or ctx.run_name,
            version=args.version,
            extra_metadata={
                "head": "none",
                "frozen_backbone": True,
                "run_name": ctx.run_name,
                "checkpoint_step": 0,
            },
        )
        print(f"Exported {path} (the {m.name} backbone with weights {m.weights or 'random'}, untrained)")
        return 0
    model, step = ctx.load_model()
    run = RunDir(ctx.dirs.run_dir(ctx.run_name))
    evaluation = {}
    if run.best_metrics():
        evaluation["best_checkpoint_test"] = run.best_metrics()
    if (run.path / "evaluation.json").is_file():
        evaluation["evaluation_command"] = json.loads((run.path / "evaluation.json").read_text())
    path = export_model(
        model,
        ctx.config,
        args.model_repo,
        model_name=args.model_name or ctx.run_name,
        version=args.version,
        evaluation=evaluation,
        extra_metadata={"run_name": ctx.run_name, "checkpoint_step": step},
    )
    print(f"Exported {path}")
    return 0


def cmd_quality(args) -> int:
    from trainer.quality import run_quality

    run_quality(
        args.data,
        work_dir=args.work_dir,
        candidates=[x.strip() for x in args.candidates.split(",") if x.strip()],
        output=args.output,
        queries=args.queries,
        steps=args.steps,
        max_minutes=args.max_minutes,
    )
    return 0


COMMANDS = {
    "train": cmd_train,
    "embed": cmd_embed,
    "test": cmd_test,
    "evaluation": cmd_evaluation,
    "cbir": cmd_cbir,
    "export": cmd_export,
    "quality": cmd_quality,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_cli_logging(args.log_level)
    return run_main(lambda: COMMANDS[args.command](args), also=(ConfigError,))
