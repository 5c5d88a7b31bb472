"""The training loop: P x K tf.data pipeline, custom train step, checkpoints, evaluation, TensorBoard.

Mirrors the original train.py (iterations counted in ``model.fit.epochs``, a checkpoint every
``checkpoint_frequency`` iterations with tf.train.CheckpointManager, Ctrl-C saves and stops) and adds
what it lacked: a refusal to overwrite a run without ``--resume``, the resolved config saved with the
run, periodic Recall@1 on the test split with the best checkpoint kept, a time budget, partial
fine-tuning of a pretrained backbone (``model.finetune``), optionally on cached activations of its
frozen part (trainer/cached.py), and the proxy losses, whose proxies are trained beside the model.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2
from tqdm import tqdm

from cbir.errors import AlreadyExists, FailedPrecondition, InvalidInput
from trainer import losses, metrics
from trainer.cached import CACHE_FOLDER, build_activation_cache, cached_batches, split_embedding_model
from trainer.config import DataDirs, Finetune, TrainingConfig
from trainer.data import Split, load_splits
from trainer.embedding import build_model, embed_paths, make_embed_fn
from trainer.options import TrainOptions
from trainer.preprocessing import augment_image_bytes
from trainer.runs import RunDir, config_differences, run_dir_for
from trainer.sampler import PKSampler

log = logging.getLogger(__name__)

# The original decayed to this learning rate (PolynomialDecay end_learning_rate).
END_LEARNING_RATE = 1e-7
# Proxies start as random directions and must move much faster than a pretrained network; Kim et al.
# (Proxy-Anchor) train them at 100 times the network's learning rate.
PROXY_LR_MULTIPLIER = 100.0


@keras.saving.register_keras_serializable(package="trainer")
class DelayedLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Constant ``lr`` until ``decay_start``, then linear decay to END_LEARNING_RATE at ``total_steps``.

    The original built ``PolynomialDecay(lr, epochs)`` whenever 0 <= decay_start_iteration < epochs,
    which decays from iteration 0 and ignores the start it was given; here the decay really starts at
    ``decay_start_iteration`` (a negative value, as in every shipped config, means no decay).
    """

    def __init__(self, lr: float, decay_start: int, total_steps: int, end_lr: float = END_LEARNING_RATE):
        self.lr, self.decay_start, self.total_steps, self.end_lr = lr, decay_start, total_steps, end_lr

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        span = float(max(self.total_steps - self.decay_start, 1))
        progress = tf.clip_by_value((step - self.decay_start) / span, 0.0, 1.0)
        return self.lr + (self.end_lr - self.lr) * progress

    def get_config(self):
        return {
            "lr": self.lr,
            "decay_start": self.decay_start,
            "total_steps": self.total_steps,
            "end_lr": self.end_lr,
        }


# TensorBoard's scalar plugin metadata, written with the core tf.summary.write so that logging scalars
# does not need the tensorboard package (not a dependency: only needed to *view* the logs).
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR,
).SerializeToString()


def log_scalar(name: str, value, step) -> None:
    """A TensorBoard scalar in the default summary writer (eagerly or inside a tf.function)."""
    tf.summary.write(name, tf.cast(value, tf.float32), step=step, metadata=_SCALAR_METADATA)


def learning_rate(config: TrainingConfig):
    fit = config.model.fit
    if 0 <= fit.decay_start_iteration < fit.epochs:
        return DelayedLinearDecay(fit.lr, fit.decay_start_iteration, fit.epochs)
    return fit.lr


def make_optimizer(config: TrainingConfig, lr_multiplier: float = 1.0) -> keras.optimizers.Optimizer:
    fit = config.model.fit
    rate = learning_rate(config)
    if lr_multiplier != 1.0:
        if isinstance(rate, DelayedLinearDecay):
            rate = DelayedLinearDecay(
                rate.lr * lr_multiplier, rate.decay_start, rate.total_steps, rate.end_lr
            )
        else:
            rate = rate * lr_multiplier
    if fit.optimizer == "adam":
        return keras.optimizers.Adam(rate)
    return keras.optimizers.SGD(rate, momentum=0.9)


def make_loss(config: TrainingConfig, num_classes: int | None = None) -> keras.losses.Loss:
    """The config's loss; the proxy losses also need the number of classes (their proxies)."""
    fit = config.model.fit
    if fit.is_angular:
        return losses.get_loss(fit.loss, alpha=fit.alpha)
    if losses.canonical_loss_name(fit.loss) in losses.PROXY_LOSSES:
        if num_classes is None:
            raise InvalidInput(f"{fit.loss} needs the number of classes")
        extra: dict[str, Any] = {"scale": fit.scale} if fit.scale is not None else {}
        return losses.get_loss(
            fit.loss,
            margin=fit.margin,
            num_classes=num_classes,
            embedding_dim=config.model.embedding_dim,
            **extra,
        )
    return losses.get_loss(fit.loss, margin=fit.margin)


def training_dataset(
    split: Split, config: TrainingConfig, *, seed: int, start_step: int = 0
) -> tf.data.Dataset:
    """Endless P*K batches of (augmented images, labels), classes consecutive, reproducible per seed."""
    m = config.model
    sampler = PKSampler(split.labels, m.batch.P, m.batch.K, seed=seed + start_step)
    paths = np.array(split.paths)
    labels = split.labels

    def indices():
        for batch in sampler:
            yield from batch

    dataset = tf.data.Dataset.from_generator(indices, output_signature=tf.TensorSpec([], tf.int64))
    paths_t, labels_t = tf.constant(paths), tf.constant(labels)
    input_size, resize = m.input, m.resize

    def load(position, index):
        image = augment_image_bytes(
            tf.io.read_file(paths_t[index]),
            input_size,
            resize,
            seed=tf.stack([tf.cast(seed, tf.int64), position]),
        )
        return image, labels_t[index]

    dataset = dataset.enumerate(start=start_step * m.batch.size)
    dataset = dataset.map(load, num_parallel_calls=config.loading_threads, deterministic=True)
    # P*K consecutive indices are one sampler batch, so batching keeps each class's K images together.
    return dataset.batch(m.batch.size, drop_remainder=True).prefetch(2)


def freeze_batchnorm(model: keras.Model) -> int:
    """Puts every BatchNormalization layer of the backbone in inference mode; returns how many."""

    def walk(layer):
        yield layer
        for child in getattr(layer, "layers", ()):
            yield from walk(child)

    count = 0
    for layer in walk(model.get_layer("backbone")):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            count += 1
    return count


def freeze_backbone_before(model: keras.Model, layer_name: str) -> int:
    """Freezes the backbone's layers that come before ``layer_name``; returns how many were frozen."""
    layers = model.get_layer("backbone").layers
    names = [layer.name for layer in layers]
    if layer_name not in names:
        trainable = [n for n in names if "conv" in n][-6:]
        raise InvalidInput(
            f"--train-from {layer_name!r}: the backbone has no such layer (its last conv layers: {', '.join(trainable)})"
        )
    cut = names.index(layer_name)
    for layer in layers[:cut]:
        layer.trainable = False
    return cut


def make_train_step(
    model: keras.Model,
    loss_fn: keras.losses.Loss,
    optimizer: keras.optimizers.Optimizer,
    step: tf.Variable | None = None,
    proxy_optimizer: keras.optimizers.Optimizer | None = None,
):
    """One optimisation step as a graph; with ``step``, it also counts and logs loss and learning rate.

    Counting and logging inside the graph keeps per-step Python work (eager ops) out of the loop.
    A proxy loss's proxies are trained too, by ``proxy_optimizer`` (required then).
    """
    proxies = [loss_fn.proxies] if isinstance(loss_fn, losses.ProxyLoss) else []
    if proxies and proxy_optimizer is None:
        raise ValueError("a proxy loss needs a proxy_optimizer for its proxies")

    @tf.function(reduce_retracing=True)
    def train_step(images, labels):
        variables = model.trainable_variables
        with tf.GradientTape() as tape:
            embeddings = model(images, training=True)
            loss = loss_fn(labels, embeddings)
            if model.losses:
                loss += tf.add_n(model.losses)
        gradients = tape.gradient(loss, variables + proxies)
        optimizer.apply_gradients(zip(gradients[: len(variables)], variables, strict=True))
        if proxies:
            proxy_optimizer.apply_gradients(zip(gradients[len(variables) :], proxies, strict=True))
        if step is not None:
            step.assign_add(1)
            log_scalar("loss", loss, step=step)
            log_scalar("learning_rate", optimizer.learning_rate, step=step)
        return loss

    return train_step


class _StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks after each step (the step finishes, then we save)."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped: str  # "finished", "interrupted", "time budget", "step budget"
    images_per_second: float
    best: dict | None = None
    history: list[dict] = field(default_factory=list)
    cache_seconds: float = 0.0  # building the activation cache (cached fine-tuning), not in the rate


def prepare_run(config: TrainingConfig, dirs: DataDirs, options: TrainOptions) -> RunDir:
    """Creates the run folder, or checks it may be resumed; saves the resolved config."""
    run = run_dir_for(config, dirs, options.run_name)
    resolved = config.to_json()
    if run.exists():
        if not options.resume:
            raise AlreadyExists(
                f"run {run.path} already exists: pass --resume to continue it, or change the config "
                "(or --run-name) to start a new one"
            )
        if run.config_file.is_file():
            differences = config_differences(json.loads(run.config_file.read_text()), resolved)
            if differences:
                raise FailedPrecondition(
                    f"cannot resume {run.path}: its config differs in {', '.join(differences)} "
                    "(only epochs, frequencies, loading_threads and weights may change)"
                )
    elif options.resume:
        log.warning("--resume: run %s does not exist yet, starting it", run.path)
    run.path.mkdir(parents=True, exist_ok=True)
    run.config_file.write_text(json.dumps(resolved, indent=2) + "\n")
    return run


def evaluate_split(
    model: keras.Model, split: Split, config: TrainingConfig, *, batch_size: int, embed_fn=None
) -> dict:
    """Leave-one-out retrieval metrics on one split (Recall@K, mAP@R, NMI)."""
    vectors = embed_paths(model, split.paths, config, batch_size=batch_size, embed_fn=embed_fn)
    return metrics.evaluate(vectors, split.labels, metric=config.model.fit.metric, nmi=True)


def train(config: TrainingConfig, dirs: DataDirs, options: TrainOptions | None = None) -> TrainResult:
    options = options or TrainOptions()
    m = config.model
    splits = load_splits(config.dataset, dirs, ("train", "test"))
    train_split, test_split = splits["train"], splits["test"]
    classes = len(np.unique(train_split.labels))
    if m.batch.P > classes:
        raise InvalidInput(
            f"model.batch.P={m.batch.P} but the train split of {config.dataset!r} has {classes} classes; "
            f"use --set model.batch.P={classes} or fewer"
        )
    finetune = m.finetune or Finetune()
    # Python's, NumPy's and TensorFlow's generators from the seed: the same seed starts from the same
    # initial weights (the sampler and augmentation are seeded on their own), so a run can be repeated.
    keras.utils.set_random_seed(options.seed)
    # The model (and where it is cut) is checked before anything is written.
    model = build_model(config, weights=m.weights)
    # The config checked that cached_views comes with train_from.
    parts = split_embedding_model(model, cast(str, finetune.train_from)) if finetune.cached_views else None
    if finetune.train_from:
        freeze_backbone_before(model, finetune.train_from)
    if finetune.freeze_batchnorm:
        freeze_batchnorm(model)
    loss_fn = make_loss(config, num_classes=len(train_split.class_names))
    run = prepare_run(config, dirs, options)

    optimizer = make_optimizer(config)
    optimizer.build(model.trainable_variables)
    step_var = tf.Variable(0, dtype=tf.int64)
    tracked = {"model": model, "optimizer": optimizer, "step": step_var}
    proxy_optimizer = None
    if isinstance(loss_fn, losses.ProxyLoss):
        proxy_optimizer = make_optimizer(config, lr_multiplier=PROXY_LR_MULTIPLIER)
        proxy_optimizer.build([loss_fn.proxies])
        tracked.update(proxies=loss_fn.proxies, proxy_optimizer=proxy_optimizer)
    checkpoint = tf.train.Checkpoint(**tracked)
    latest = tf.train.CheckpointManager(checkpoint, str(run.latest_dir), max_to_keep=3)
    best = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, step=step_var), str(run.best_dir), max_to_keep=1
    )
    if options.resume and latest.latest_checkpoint:
        checkpoint.restore(latest.latest_checkpoint).assert_existing_objects_matched()
        print(f"Resumed from {latest.latest_checkpoint} (step {int(step_var.numpy())})")
    else:
        print(f"Starting run {run.path.name} from the initial weights ({m.weights or 'random'})")
    start = int(step_var.numpy())
    best_metrics = run.best_metrics()
    best_recall = best_metrics["recall@1"] if best_metrics else -math.inf

    cache_seconds = 0.0
    if parts is not None:
        # After the restore: the cache must come from this run's frozen weights.
        frozen, tail = parts
        cache = _activation_cache(frozen, train_split, config, run.path / CACHE_FOLDER, options)
        cache_seconds = cache.seconds
        batches = cached_batches(cache, m.batch.P, m.batch.K, seed=options.seed + start)
        step_model = tail
    else:
        batches = iter(training_dataset(train_split, config, seed=options.seed, start_step=start))
        step_model = model
    train_step = make_train_step(step_model, loss_fn, optimizer, step_var, proxy_optimizer)
    embed_fn = make_embed_fn(model)
    log_dir = dirs.logs / run.path.name / "train" / datetime.now().strftime("%Y%m%d-%H%M%S")
    writer = tf.summary.create_file_writer(str(log_dir))
    eval_every = 0 if config.eval_frequency < 0 else config.eval_frequency or config.checkpoint_frequency
    last_step = m.fit.epochs
    if options.max_steps is not None:
        last_step = min(last_step, start + options.max_steps)
    deadline = time.monotonic() + options.max_minutes * 60 if options.max_minutes else None
    history: list[dict] = []
    stopped = "finished"

    def evaluate_now(step: int) -> None:
        nonlocal best_recall
        result = evaluate_split(
            model, test_split, config, batch_size=options.eval_batch_size, embed_fn=embed_fn
        )
        result = {"step": step, **result}
        history.append(result)
        with writer.as_default():
            for key, value in result.items():
                if key != "step":
                    log_scalar(f"test/{key}", value, step=step)
        improved = result["recall@1"] > best_recall
        if improved:
            best_recall = result["recall@1"]
            best.save(checkpoint_number=step)
            run.best_metrics_file.write_text(json.dumps(result, indent=2) + "\n")
        tqdm.write(
            f"step {step}: test Recall@1 {result['recall@1']:.4f}  mAP@R {result['map@r']:.4f}"
            + ("  (best so far, saved)" if improved else "")
        )
        if options.on_eval:
            options.on_eval(step, result)

    images_seen, busy_seconds = 0, 0.0
    bar = tqdm(
        total=last_step,
        initial=start,
        desc=run.path.name,
        unit="it",
        disable=not options.progress,
        dynamic_ncols=True,
    )
    step = start
    with _StopRequest() as stop, writer.as_default():
        while step < last_step:
            t0 = time.perf_counter()
            images, labels = next(batches)
            loss = float(train_step(images, labels))
            if not math.isfinite(loss):
                raise FailedPrecondition(f"the loss became {loss} at step {step}; lower model.fit.lr")
            step += 1
            rate = images_seen / busy_seconds if busy_seconds else 0.0
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}", refresh=False)
            bar.update(1)  # redraws at most every 0.1 s
            if rate and step % 20 == 0:
                log_scalar("images_per_second", rate, step=step)
            # The rate covers everything a step costs (data, step, read-back, logging) except checkpoints
            # and evaluations; the first step, which traces the graph, is left out.
            if step > start + 1:
                images_seen += int(images.shape[0])
                busy_seconds += time.perf_counter() - t0
            if config.checkpoint_frequency and step % config.checkpoint_frequency == 0:
                latest.save(checkpoint_number=step)
            if eval_every and step % eval_every == 0:
                evaluate_now(step)
            if stop.requested:
                stopped = "interrupted"
                break
            if deadline is not None and time.monotonic() > deadline:
                stopped = "time budget"
                break
        else:
            if options.max_steps is not None and step < m.fit.epochs:
                stopped = "step budget"
    bar.close()
    if not latest.latest_checkpoint or not latest.latest_checkpoint.endswith(f"-{step}"):
        latest.save(checkpoint_number=step)
    if (
        stopped != "interrupted"
        and step > start
        and eval_every
        and (not history or history[-1]["step"] != step)
    ):
        evaluate_now(step)
    writer.flush()
    rate = images_seen / busy_seconds if busy_seconds else 0.0
    print(f"Stopped ({stopped}) at step {step}; checkpoint {latest.latest_checkpoint}; {rate:.1f} images/s")
    return TrainResult(run.path, step, stopped, rate, run.best_metrics(), history, cache_seconds)


def _activation_cache(
    frozen: keras.Model, split: Split, config: TrainingConfig, folder: Path, options: TrainOptions
):
    m = config.model
    finetune = cast(Finetune, m.finetune)  # only called for a run that fine-tunes from a cache
    views = finetune.cached_views
    bar = tqdm(
        total=len(split) * views,
        desc=f"caching {views} views per image up to {finetune.train_from}",
        unit="view",
        disable=not options.progress,
        dynamic_ncols=True,
    )
    with bar:
        cache = build_activation_cache(
            frozen,
            split.paths,
            split.labels,
            views=views,
            input_size=m.input,
            resize=m.resize,
            train_from=cast(str, finetune.train_from),
            seed=options.seed,
            folder=folder,
            batch_size=options.eval_batch_size,
            threads=config.loading_threads,
            progress=bar.update,
        )
    if cache.seconds:
        print(
            f"Cached {len(split)} x {views} views in {cache.seconds:.0f}s ({len(split) * views / cache.seconds:.1f} views/s)"
        )
    return cache
