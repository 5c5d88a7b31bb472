"""Typed, validated training configs read from the original JSON schema, with dotted overrides.

The original code (tanakafer/tfr, ``trainings/*.json``) loaded its configs into ``argparse.Namespace``
objects, so a typo surfaced as an AttributeError deep inside training. Here the same JSON becomes small
frozen dataclasses, checked once, with errors that name the dotted field (``model.batch.P``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbir.catalogue import ORIGINAL_DATASETS
from trainer.loss_names import LOSS_NAMES, PAIR_LOSSES, PROXY_LOSSES, canonical_loss_name
from trainer.metrics import METRICS


class ConfigError(ValueError):
    """A config file, override or settings file is invalid; the message names the field."""


BACKBONES = ("resnet_v1_50", "efficientnet_lite0", "mobilenet_v2", "small_cnn")
HEADS = ("direct", "direct_normalize", "fc1024", "fc1024_normalize")
LOSSES = LOSS_NAMES  # the original spellings (angular_loss, semi_hard_triplet, ...) and the added losses
OPTIMIZERS = ("adam", "SGD", "sgd")
SETTINGS_ENV = "CBIR_SETTINGS"
DATA_DIR_ENV = "CBIR_DATA_DIR"
DEFAULT_SETTINGS = Path("~/.config/cbir/settings.json")
TRAININGS_DIR = Path(__file__).resolve().parent / "trainings"
# Views per image in an activation cache; more is memory for little gain (each view is a random crop).
MAX_CACHED_VIEWS = 64


@dataclass(frozen=True)
class Size:
    height: int
    width: int


@dataclass(frozen=True)
class Batch:
    P: int
    K: int

    @property
    def size(self) -> int:
        return self.P * self.K


@dataclass(frozen=True)
class Fit:
    loss: str
    metric: str = "euclidean"
    optimizer: str = "adam"
    epochs: int = 2000  # the original counts iterations (batches), not passes over the data
    lr: float = 3e-4
    decay_start_iteration: int = -1
    alpha: float | None = None
    margin: float | str | None = None  # a number, or "soft" for the soft-margin (softplus) variant
    # Not in the original files: the logit scale of the proxy losses (proxy_anchor, normalized_softmax).
    scale: float | None = None

    @property
    def is_angular(self) -> bool:
        """Angular losses take an angle (run name ``alpha_A``); every other loss a margin (``m_M``)."""
        return canonical_loss_name(self.loss) == "angular_loss"


@dataclass(frozen=True)
class Finetune:
    """How a pretrained backbone is fine-tuned (not in the original files, which trained everything).

    ``train_from`` names the first backbone layer that is trained; the layers before it stay frozen.
    ``cached_views`` > 0 computes the frozen part's activations once for that many views of each
    training image and trains the rest on them (trainer/cached.py), which needs ``train_from``.
    """

    train_from: str | None = None
    freeze_batchnorm: bool = False
    cached_views: int = 0


@dataclass(frozen=True)
class ModelConfig:
    name: str
    head: str
    embedding_dim: int
    input: Size
    crop: Size | None
    batch: Batch
    fit: Fit
    # Not in the original files (its ResNet always started from ImageNet): null | "imagenet" | a path.
    weights: str | None = "imagenet"
    finetune: Finetune | None = None

    @property
    def resize(self) -> Size:
        """The size images are resized to before the (random or center) crop to ``input``."""
        return self.crop or self.input


@dataclass(frozen=True)
class TrainingConfig:
    dataset: str
    model: ModelConfig
    loading_threads: int = 8
    checkpoint_frequency: int = 100
    # Not in the original files: how often (in iterations) Recall@1 on the test split is measured;
    # 0 = at every checkpoint, -1 = never (e.g. to keep the test split out of checkpoint selection).
    eval_frequency: int = 0

    @property
    def run_name(self) -> str:
        """The original run name: ``<dataset>_<model>_<head>_<optimizer>_<loss>_(alpha_A|m_M)``."""
        fit = self.model.fit
        dataset = self.dataset if self.dataset in ORIGINAL_DATASETS else _dataset_label(self.dataset)
        suffix = f"alpha_{fit.alpha}" if fit.is_angular else f"m_{fit.margin}"
        return "_".join([dataset, self.model.name, self.model.head, fit.optimizer, fit.loss, suffix])

    def to_json(self) -> dict[str, Any]:
        """The resolved config in the original schema (what is saved with each run)."""
        return _drop_none(dataclasses.asdict(self))


def _dataset_label(dataset: str) -> str:
    path = Path(dataset)
    return (path.stem if path.suffix else path.name) or "dataset"


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None or k in ("crop", "weights")}
    return value


# --- parsing -----------------------------------------------------------------------------------------

_SCHEMA: dict[str, Any] = {
    "dataset": str,
    "loading_threads": int,
    "checkpoint_frequency": int,
    "eval_frequency": int,
    "model": {
        "name": str,
        "head": str,
        "embedding_dim": int,
        "weights": (str, type(None)),
        "input": {"height": int, "width": int},
        "crop": {"height": int, "width": int},
        "batch": {"P": int, "K": int},
        "finetune": {"train_from": (str, type(None)), "freeze_batchnorm": bool, "cached_views": int},
        "fit": {
            "loss": str,
            "metric": str,
            "alpha": (int, float),
            "margin": (int, float, str),
            "scale": (int, float),
            "optimizer": str,
            "epochs": int,
            "lr": (int, float),
            "decay_start_iteration": int,
        },
    },
}
_REQUIRED = {
    "": ("dataset", "model"),
    "model": ("name", "head", "embedding_dim", "input", "batch", "fit"),
    "model.input": ("height", "width"),
    "model.crop": ("height", "width"),
    "model.batch": ("P", "K"),
    "model.fit": ("loss",),
}


def _check_shape(data: Any, schema: Mapping[str, Any], where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a JSON object, got {type(data).__name__}")
    for key in data:
        if key not in schema:
            dotted = f"{where}.{key}" if where else key
            raise ConfigError(f"{dotted}: unknown field (known here: {', '.join(schema)})")
    for key in _REQUIRED.get(where, ()):
        if key not in data:
            dotted = f"{where}.{key}" if where else key
            raise ConfigError(f"{dotted}: missing required field")
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        expected = schema[key]
        if isinstance(expected, dict):
            if key == "crop" and value is None:
                continue
            _check_shape(value, expected, dotted)
            continue
        types = expected if isinstance(expected, tuple) else (expected,)
        # JSON true/false are ints in Python; never accept them for numbers.
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ConfigError(f"{dotted}: expected {names}, got {json.dumps(value)}")


def _positive(value: float, dotted: str) -> None:
    if value <= 0:
        raise ConfigError(f"{dotted}: must be > 0, got {value}")


def _choice(value: str, choices: Sequence[str], dotted: str) -> None:
    if value not in choices:
        raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(choices)}")


def config_from_dict(data: Mapping[str, Any]) -> TrainingConfig:
    """Validates ``data`` (the original JSON schema) and builds the typed config."""
    _check_shape(dict(data), _SCHEMA, "")
    m = data["model"]
    f = m["fit"]
    _choice(m["name"], BACKBONES, "model.name")
    _choice(m["head"], HEADS, "model.head")
    _choice(f["loss"], LOSSES, "model.fit.loss")
    _choice(f.get("metric", "euclidean"), METRICS, "model.fit.metric")
    _choice(f.get("optimizer", "adam"), OPTIMIZERS, "model.fit.optimizer")
    for dotted, value in [
        ("model.embedding_dim", m["embedding_dim"]),
        ("model.input.height", m["input"]["height"]),
        ("model.input.width", m["input"]["width"]),
        ("model.batch.P", m["batch"]["P"]),
        ("model.batch.K", m["batch"]["K"]),
        ("model.fit.epochs", f.get("epochs", 1)),
        ("model.fit.lr", f.get("lr", 1)),
        ("loading_threads", data.get("loading_threads", 1)),
    ]:
        _positive(value, dotted)
    if data.get("checkpoint_frequency", 0) < 0:
        raise ConfigError(f"checkpoint_frequency: must be >= 0, got {data['checkpoint_frequency']}")
    if data.get("eval_frequency", 0) < -1:
        raise ConfigError(f"eval_frequency: must be >= -1 (-1 = never), got {data['eval_frequency']}")
    if m["batch"]["P"] < 2:
        raise ConfigError(f"model.batch.P: needs at least 2 classes per batch, got {m['batch']['P']}")
    if m["batch"]["K"] < 2:
        raise ConfigError(f"model.batch.K: needs at least 2 images per class, got {m['batch']['K']}")
    crop = m.get("crop")
    if crop is not None:
        for axis in ("height", "width"):
            if crop[axis] < m["input"][axis]:
                raise ConfigError(
                    f"model.crop.{axis}: the crop size ({crop[axis]}) must be >= model.input.{axis} "
                    f"({m['input'][axis]}): images are resized to the crop size, then cropped to the input"
                )
    loss = f["loss"]
    canonical = canonical_loss_name(loss)
    if canonical == "angular_loss":
        if "alpha" not in f:
            raise ConfigError("model.fit.alpha: required by angular_loss (degrees)")
        if not 0 < f["alpha"] < 90:
            raise ConfigError(f"model.fit.alpha: must be between 0 and 90 degrees, got {f['alpha']}")
        if "margin" in f:
            raise ConfigError("model.fit.margin: angular_loss takes alpha, not a margin")
    elif "alpha" in f:
        raise ConfigError(f"model.fit.alpha: only angular_loss takes alpha, not {loss}")
    margin = f.get("margin")
    if isinstance(margin, str) and margin != "soft":
        raise ConfigError(f'model.fit.margin: a number or "soft", got {json.dumps(margin)}')
    if isinstance(margin, int | float) and margin < 0:
        raise ConfigError(f"model.fit.margin: must be >= 0, got {margin}")
    if "scale" in f:
        if canonical not in PROXY_LOSSES:
            raise ConfigError(
                f"model.fit.scale: only the proxy losses ({', '.join(sorted(PROXY_LOSSES))}) take a scale, not {loss}"
            )
        _positive(f["scale"], "model.fit.scale")
    if canonical in PROXY_LOSSES and margin == "soft":
        raise ConfigError(f'model.fit.margin: {loss} takes a number, not "soft"')
    finetune = m.get("finetune")
    if finetune is not None:
        views = finetune.get("cached_views", 0)
        if views < 0:
            raise ConfigError(f"model.finetune.cached_views: must be >= 0 (0 = no cache), got {views}")
        if views > MAX_CACHED_VIEWS:
            raise ConfigError(f"model.finetune.cached_views: at most {MAX_CACHED_VIEWS}, got {views}")
        if views and not finetune.get("train_from"):
            raise ConfigError(
                "model.finetune.cached_views: caching needs a frozen part, so model.finetune.train_from must "
                "name the first trained backbone layer (e.g. block11_expand_conv)"
            )
    if canonical in PAIR_LOSSES and m["batch"]["K"] != 2:
        raise ConfigError(
            f"model.batch.K: {loss} reads the batch as (anchor, positive) pairs, so K must be 2"
        )
    if not data["dataset"].strip():
        raise ConfigError("dataset: must not be empty")
    return TrainingConfig(
        dataset=data["dataset"],
        loading_threads=data.get("loading_threads", 8),
        checkpoint_frequency=data.get("checkpoint_frequency", 100),
        eval_frequency=data.get("eval_frequency", 0),
        model=ModelConfig(
            name=m["name"],
            head=m["head"],
            embedding_dim=m["embedding_dim"],
            weights=m.get("weights", "imagenet"),
            input=Size(**m["input"]),
            crop=Size(**crop) if crop is not None else None,
            batch=Batch(**m["batch"]),
            finetune=Finetune(**finetune) if finetune is not None else None,
            fit=Fit(
                loss=loss,
                metric=f.get("metric", "euclidean"),
                optimizer=f.get("optimizer", "adam"),
                epochs=f.get("epochs", 2000),
                lr=float(f.get("lr", 3e-4)),
                decay_start_iteration=f.get("decay_start_iteration", -1),
                alpha=f.get("alpha"),
                margin=f.get("margin"),
                scale=float(f["scale"]) if "scale" in f else None,
            ),
        ),
    )


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies ``dotted.path=value`` overrides (value parsed as JSON, else taken as a string)."""
    data = json.loads(json.dumps(data))  # deep copy; never mutate the caller's dict
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.path=value, e.g. model.fit.epochs=20")
        path, raw = item.split("=", 1)
        keys = [k for k in path.strip().split(".")]
        if not all(keys):
            raise ConfigError(f"--set {item!r}: empty name in the dotted path")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # bare words such as `dataset=bags_40` or `model.name=small_cnn`
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {path}: {'.'.join(keys[: depth + 1])} is not an object")
            node = child
        node[keys[-1]] = value
    return data


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainingConfig:
    """Reads a config file (a path, or the name of a shipped config) and applies ``overrides``."""
    resolved = resolve_config_path(path)
    try:
        data = json.loads(resolved.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{resolved}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config {resolved}: {exc.strerror or exc}") from exc
    try:
        return config_from_dict(apply_overrides(data, overrides))
    except ConfigError as exc:
        raise ConfigError(f"{resolved}: {exc}") from exc


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, else ``trainer/trainings/<name>`` (with or without ``.json``)."""
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate
    for name in (candidate.name, candidate.name + ".json"):
        shipped = TRAININGS_DIR / name
        if shipped.is_file():
            return shipped
    raise ConfigError(f"config file {path} does not exist (shipped configs are in {TRAININGS_DIR})")


def shipped_configs() -> list[Path]:
    return sorted(TRAININGS_DIR.glob("*.json"))


# --- the data root (the original configuration.py) ----------------------------------------------------


@dataclass(frozen=True)
class DataDirs:
    """The folders below the data root, as the original configuration.py laid them out."""

    root: Path
    datasets: Path = field(init=False)
    checkpoints: Path = field(init=False)
    embeddings: Path = field(init=False)
    logs: Path = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", self.root / "datasets")
        object.__setattr__(self, "checkpoints", self.root / "checkpoints")
        object.__setattr__(self, "embeddings", self.root / "emb")
        object.__setattr__(self, "logs", self.root / "logs")

    def run_dir(self, run_name: str) -> Path:
        return self.checkpoints / run_name

    def embeddings_file(self, run_name: str) -> Path:
        return self.embeddings / f"{run_name}.h5"


def resolve_data_dir(flag: str | None, env: Mapping[str, str] | None = None) -> DataDirs:
    """``--data-dir``, else ``$CBIR_DATA_DIR``, else ``data_dir`` in the settings file."""
    env = os.environ if env is None else env
    if flag:
        return DataDirs(Path(flag).expanduser().resolve())
    if env.get(DATA_DIR_ENV):
        return DataDirs(Path(env[DATA_DIR_ENV]).expanduser().resolve())
    settings = Path(env.get(SETTINGS_ENV) or DEFAULT_SETTINGS).expanduser()
    if settings.is_file():
        try:
            data = json.loads(settings.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"settings file {settings}: not valid JSON ({exc.msg})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("data_dir"), str):
            raise ConfigError(f'settings file {settings}: expected {{"data_dir": "/path"}}')
        root = Path(data["data_dir"]).expanduser()
        if not root.is_absolute():
            root = settings.parent / root
        return DataDirs(root.resolve())
    raise ConfigError(
        f"no data directory: pass --data-dir, set {DATA_DIR_ENV}, or write {settings} "
        '(e.g. {"data_dir": "/data/cbir"}); datasets/, checkpoints/, emb/ and logs/ live below it'
    )
