"""One loaded SavedModel version: its signatures, input checks with TF Serving's messages, and runs.

Knows nothing about gRPC: inputs and outputs are NumPy arrays keyed by the signature's tensor
aliases; mistakes raise the domain errors of :mod:`cbir.errors`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from cbir.errors import FailedPrecondition, InvalidInput, NotFound, ResourceExhausted

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
# TF Serving replays at most this many warmup records.
MAX_WARMUP_RECORDS = 1000

Arrays = dict[str, np.ndarray]

_TF_NOISE = re.compile(
    r"^(Graph execution error:|Detected at node|<stack traces unavailable>|\s*\[\[|\s+File )"
)


def tf_error_message(exc: tf.errors.OpError) -> str:
    """The human part of a TensorFlow op error, without graph locations and op names."""
    lines = [line for line in exc.message.splitlines() if line.strip() and not _TF_NOISE.match(line)]
    text = " ".join(lines) or exc.message
    return re.sub(r"\s*\[Op:[^\]]*\]\s*$", "", text).strip()


def has_saved_model(version_dir: Path) -> bool:
    return (version_dir / "saved_model.pb").is_file() or (version_dir / "saved_model.pbtxt").is_file()


@dataclass(frozen=True)
class TensorSpec:
    alias: str
    dtype: tf.DType
    shape: tf.TensorShape

    @property
    def batched(self) -> bool:
        """True when the first dimension is the (unknown) batch dimension."""
        return self.shape.rank is not None and self.shape.rank >= 1 and self.shape[0] is None


@dataclass(frozen=True)
class Signature:
    name: str
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]
    function: Callable[..., Mapping[str, tf.Tensor]]

    @property
    def batchable(self) -> bool:
        return all(spec.batched for spec in (*self.inputs.values(), *self.outputs.values()))

    @cached_property
    def input_checks(self) -> dict[str, tuple[bool, np.dtype | None, tuple[int | None, ...] | None, bool]]:
        """Per input alias, worked out once: (takes strings, NumPy dtype, dims or None for any rank,
        batched), so that checking a request is a few comparisons."""
        checks = {}
        for alias, spec in self.inputs.items():
            want_string = spec.dtype == tf.string
            dims = None if spec.shape.rank is None else tuple(spec.shape.as_list())
            checks[alias] = (
                want_string,
                None if want_string else np.dtype(spec.dtype.as_numpy_dtype),
                dims,
                spec.batched,
            )
        return checks

    def describe_inputs(self) -> str:
        return ", ".join(
            f"{alias} ({spec.dtype.name} {spec.shape.as_list() if spec.shape.rank is not None else '?'})"
            for alias, spec in sorted(self.inputs.items())
        )


def _read_meta_graph(path: Path) -> meta_graph_pb2.MetaGraphDef:
    saved_model = saved_model_pb2.SavedModel()
    pb = path / "saved_model.pb"
    if pb.is_file():
        saved_model.ParseFromString(pb.read_bytes())
    else:
        from google.protobuf import text_format

        text_format.Parse((path / "saved_model.pbtxt").read_text(), saved_model)
    for meta_graph in saved_model.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return meta_graph
    raise NotFound(f"SavedModel at {path} has no meta graph tagged 'serve'")


class Servable:
    """A model version loaded with ``tf.saved_model.load``; thread-safe to run concurrently."""

    def __init__(self, name: str, version: int, path: Path):
        self.name = name
        self.version = version
        self.path = Path(path)
        if not has_saved_model(self.path):
            raise NotFound(
                f"Could not find SavedModel .pb or .pbtxt at supplied export directory path: {path}"
            )
        self.meta_graph = _read_meta_graph(self.path)
        self._loaded = tf.saved_model.load(str(self.path), tags=["serve"])
        self.signatures: dict[str, Signature] = {}
        for key, function in self._loaded.signatures.items():
            _, kwargs = function.structured_input_signature
            inputs = {alias: TensorSpec(alias, spec.dtype, spec.shape) for alias, spec in kwargs.items()}
            outputs = {
                alias: TensorSpec(alias, spec.dtype, spec.shape)
                for alias, spec in function.structured_outputs.items()
            }
            self.signatures[key] = Signature(key, inputs, outputs, function)

    @property
    def signature_defs(self) -> Mapping[str, meta_graph_pb2.SignatureDef]:
        """The SignatureDefs as stored in saved_model.pb, as GetModelMetadata reports them."""
        signature_defs: Mapping[str, meta_graph_pb2.SignatureDef] = self.meta_graph.signature_def
        return signature_defs

    def signature(self, name: str) -> Signature:
        key = name or DEFAULT_SIGNATURE
        if key not in self.signatures:
            # TF Serving answers this with FAILED_PRECONDITION and exactly this wording.
            raise FailedPrecondition(f'Serving signature key "{key}" not found.')
        return self.signatures[key]

    # ------------------------------------------------------------------ checks

    def check_inputs(
        self, signature: Signature, inputs: Mapping[str, np.ndarray], output_filter: Sequence[str] = ()
    ) -> Arrays:
        """The inputs converted to the signature's dtypes; InvalidInput naming what is expected."""
        sent, expected = inputs.keys(), signature.inputs.keys()
        if sent != expected:
            raise InvalidInput(
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
                f"Missing but required: {{{','.join(sorted(expected - sent))}}}. "
                f"Signature {signature.name!r} expects inputs: {signature.describe_inputs()}"
            )
        for alias in output_filter:
            if alias not in signature.outputs:
                raise InvalidInput(
                    f"output tensor alias not found in signature: {alias} Outputs expected to be in the "
                    f"set {{{','.join(sorted(signature.outputs))}}}."
                )
        checked: Arrays = {}
        batch_sizes = set()
        checks = signature.input_checks
        for alias, array in inputs.items():
            want_string, dtype, dims, batched = checks[alias]
            is_string = array.dtype.kind in ("O", "S", "U")
            if want_string != is_string or (not want_string and not _castable(array.dtype, dtype)):
                spec = signature.inputs[alias]
                raise InvalidInput(
                    f"Expects arg[{sorted(signature.inputs).index(alias)}] ({alias!r} of signature "
                    f"{signature.name!r}) to be {_tf_type_name(spec.dtype)} but {_dtype_name(array)} is provided"
                )
            if dims is not None and (
                len(dims) != array.ndim
                or any(d is not None and d != n for d, n in zip(dims, array.shape, strict=True))
            ):
                raise InvalidInput(
                    f"input {alias!r} of signature {signature.name!r} has shape {list(array.shape)}, "
                    f"expected {list(dims)} (-1/None = any)"
                )
            if batched:
                batch_sizes.add(array.shape[0])
            checked[alias] = array if want_string else array.astype(dtype, copy=False)
        if len(batch_sizes) > 1:
            raise InvalidInput(
                f"inputs of signature {signature.name!r} have different batch sizes {sorted(batch_sizes)}"
            )
        return checked

    # ------------------------------------------------------------------ runs

    def run(self, signature: Signature, inputs: Arrays) -> Arrays:
        """Runs the signature on checked inputs; a bad item of a batch is named by its index."""
        try:
            return self._call(signature, inputs)
        except tf.errors.InvalidArgumentError as exc:
            size = _batch_size(signature, inputs)
            if size > 1:
                # The batch failed as a whole; run items alone to say which one is at fault.
                for index in range(size):
                    item = {
                        k: v[index : index + 1] if signature.inputs[k].batched else v
                        for k, v in inputs.items()
                    }
                    try:
                        self._call(signature, item)
                    except tf.errors.InvalidArgumentError as item_exc:
                        raise InvalidInput(
                            f"{_item_word(signature)} index {index} of the batch is invalid: "
                            f"{tf_error_message(item_exc)}"
                        ) from None
            prefix = f"{_item_word(signature)} index 0 of the batch is invalid: " if size == 1 else ""
            raise InvalidInput(prefix + tf_error_message(exc)) from None
        except tf.errors.ResourceExhaustedError as exc:
            raise ResourceExhausted(
                f"model {self.name} version {self.version}: {tf_error_message(exc)}"
            ) from None

    def _call(self, signature: Signature, inputs: Arrays) -> Arrays:
        tensors = {alias: tf.constant(array) for alias, array in inputs.items()}
        outputs = signature.function(**tensors)
        return {alias: tensor.numpy() for alias, tensor in outputs.items()}

    # ------------------------------------------------------------------ warmup

    def warm_up(self, predict: Callable[[Signature, Arrays], Arrays] | None = None) -> int:
        """Replays ``assets.extra/tf_serving_warmup_requests`` (as TF Serving does); without it, runs
        the default signature once on a generated image when it takes encoded images. Returns the
        number of requests replayed. Raises if a warmup request fails (the load then fails)."""
        predict = predict or self.run
        warmup = self.path / WARMUP_FILE
        if warmup.is_file():
            from tensorflow_serving.apis import prediction_log_pb2

            count = 0
            for record in tf.data.TFRecordDataset(str(warmup)).take(MAX_WARMUP_RECORDS):
                entry = prediction_log_pb2.PredictionLog()
                entry.ParseFromString(record.numpy())
                if entry.WhichOneof("log_type") != "predict_log":
                    raise InvalidInput(
                        f"{warmup}: record {count} is not a predict_log (only Predict is served)"
                    )
                request = entry.predict_log.request
                signature = self.signature(request.model_spec.signature_name)
                inputs = {alias: tf.make_ndarray(proto) for alias, proto in request.inputs.items()}
                predict(signature, self.check_inputs(signature, inputs))
                count += 1
            return count
        default_signature = self.signatures.get(DEFAULT_SIGNATURE)
        if default_signature is not None and [s.dtype for s in default_signature.inputs.values()] == [
            tf.string
        ]:
            # Not TF Serving behaviour but cheap: the first real request does not pay for the
            # first run. Best effort, since a model may accept only some image formats.
            image = tf.io.encode_jpeg(tf.fill((64, 64, 3), tf.constant(128, tf.uint8))).numpy()
            try:
                predict(
                    default_signature,
                    {next(iter(default_signature.inputs)): np.array([image], dtype=object)},
                )
            except (InvalidInput, tf.errors.OpError) as exc:
                log.warning(
                    "default warmup skipped",
                    extra={"model": self.name, "version": self.version, "error": str(exc)[:300]},
                )
                return 0
            return 1
        return 0


def _castable(have: np.dtype, want: np.dtype | None) -> bool:
    """Whether ``have`` is the very dtype the signature takes (TF Serving casts nothing either)."""
    return have == want


def _tf_type_name(dtype: tf.DType) -> str:
    """TensorFlow's own spelling in error messages: DT_FLOAT -> "float", DT_STRING -> "string"."""
    name: str = types_pb2.DataType.Name(dtype.as_datatype_enum)
    return name[3:].lower()


def _dtype_name(array: np.ndarray) -> str:
    if array.dtype.kind in ("O", "S", "U"):
        return "string"
    try:
        return _tf_type_name(tf.as_dtype(array.dtype))
    except TypeError:
        return str(array.dtype)


def _batch_size(signature: Signature, inputs: Arrays) -> int:
    for alias, array in inputs.items():
        if signature.inputs[alias].batched:
            return int(array.shape[0])
    return 1


def _item_word(signature: Signature) -> str:
    return "image" if [s.dtype for s in signature.inputs.values()] == [tf.string] else "item"
