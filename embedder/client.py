"""Client of TF Serving's PredictionService/ModelService: embeds encoded images with a served model.

Works unchanged against ``tensorflow_model_server`` and the local server of this package (both speak
the same protocol, through the official ``tensorflow_serving.apis`` stubs). Signature and tensor
names are discovered with GetModelMetadata and cached per model version, never hard-coded.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from cbir import errors
from cbir.channels import open_channel
from cbir.defaults import MAX_MESSAGE_BYTES
from cbir.tls import ClientTLS

T = TypeVar("T")

# Bytes reserved in every Predict for the model spec, tensor headers and per-string framing, so that
# a chunk of images never crosses the channel's message limit.
_REQUEST_OVERHEAD = 16 * 1024
_PER_IMAGE_OVERHEAD = 8
_BACKOFF_INITIAL = 0.1
_BACKOFF_MAX = 2.0
# How the local model server names the culprit of a rejected batch (TF Serving itself does not).
_BAD_ITEM = re.compile(r"^(?:image|item) index (\d+) of the batch is invalid: (.*)$", re.DOTALL)


class ModelVersionUnavailable(errors.NotReady):
    """The pinned model version (or label, or the model itself) is not being served right now."""


class InvalidImage(errors.InvalidInput):
    """Serving rejected one image of an embed() call; ``index`` is its position in that call."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


@dataclass(frozen=True)
class EmbedResult:
    """Embeddings of a batch, in request order, and the model version that computed them."""

    vectors: np.ndarray  # float32 [n, D]
    model_name: str
    model_version: int


@dataclass(frozen=True)
class SignatureInfo:
    """What GetModelMetadata says about the signature used for embedding."""

    input_name: str
    output_name: str
    dim: int  # -1 when the signature leaves the embedding size unknown
    model_version: int


def _signature_from_metadata(
    response: get_model_metadata_pb2.GetModelMetadataResponse, signature_name: str
) -> SignatureInfo:
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    if not response.metadata["signature_def"].Unpack(signature_map):
        raise errors.FailedPrecondition("model metadata has no signature_def map")
    version = int(response.model_spec.version.value)
    signatures = signature_map.signature_def
    if signature_name not in signatures:
        raise errors.FailedPrecondition(
            f"model {response.model_spec.name!r} version {version} has no signature {signature_name!r}; "
            f"it has {sorted(signatures)}"
        )
    signature = signatures[signature_name]
    string_inputs = [name for name, info in signature.inputs.items() if info.dtype == types_pb2.DT_STRING]
    if len(string_inputs) != 1 or len(signature.inputs) != 1:
        raise errors.FailedPrecondition(
            f"signature {signature_name!r} of model {response.model_spec.name!r} version {version} must "
            f"take exactly one string input (encoded images); it takes "
            f"{ {n: types_pb2.DataType.Name(i.dtype) for n, i in signature.inputs.items()} }"
        )
    outputs = dict(signature.outputs)
    if len(outputs) == 1:
        output_name = next(iter(outputs))
    elif "embedding" in outputs:
        output_name = "embedding"
    else:
        raise errors.FailedPrecondition(
            f"signature {signature_name!r} has outputs {sorted(outputs)}; expected one, or one named 'embedding'"
        )
    dims = outputs[output_name].tensor_shape.dim
    dim = int(dims[-1].size) if len(dims) == 2 else -1
    return SignatureInfo(string_inputs[0], output_name, dim, version)


def _tensor_to_array(tensor: tensor_pb2.TensorProto) -> np.ndarray:
    shape = [int(d.size) for d in tensor.tensor_shape.dim]
    if tensor.dtype != types_pb2.DT_FLOAT:
        raise errors.FailedPrecondition(
            f"embedding output has dtype {types_pb2.DataType.Name(tensor.dtype)}, expected DT_FLOAT"
        )
    if tensor.tensor_content:
        values = np.frombuffer(tensor.tensor_content, dtype="<f4")
    else:
        values = np.asarray(tensor.float_val, dtype=np.float32)
    if len(shape) != 2:
        raise errors.FailedPrecondition(f"embedding output has shape {shape}, expected [batch, dim]")
    return values.astype(np.float32, copy=False).reshape(shape)


def _fill_string_tensor(tensor: tensor_pb2.TensorProto, images: Sequence[bytes]) -> None:
    """A [n] DT_STRING tensor of the images, written in place (no message built and then copied)."""
    tensor.dtype = types_pb2.DT_STRING
    tensor.tensor_shape.dim.add(size=len(images))
    tensor.string_val.extend(images)


class EmbedderClient:
    """Embeds encoded images through TF Serving's Predict; safe to share between threads.

    ``target`` is "host:port" or "dns:///name:port" (several replicas, balanced round-robin).
    Calls without a version use whatever version the server considers latest; the version that
    answered is in every result. UNAVAILABLE is retried with exponential backoff, nothing else is.
    """

    def __init__(
        self,
        target: str,
        model_name: str,
        *,
        signature_name: str = "serving_default",
        tls: ClientTLS | None = None,
        timeout: float = 10.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_retries: int = 3,
        max_batch_images: int = 64,
        channel: grpc.Channel | None = None,
    ):
        if not model_name:
            raise errors.InvalidInput("model_name must not be empty")
        if max_message_bytes <= 2 * _REQUEST_OVERHEAD:
            raise errors.InvalidInput(f"max_message_bytes={max_message_bytes} is too small")
        self.target = target
        self.model_name = model_name
        self.signature_name = signature_name
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.max_retries = max_retries
        # TF Serving rejects a Predict larger than the batcher's max_batch_size unless large-batch
        # splitting is on, so big batches are sent as several Predicts of at most this many images.
        self.max_batch_images = max_batch_images
        self._channel = channel or open_channel(target, tls=tls, max_message_bytes=max_message_bytes)
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._lock = threading.Lock()
        self._signatures: dict[int, SignatureInfo] = {}
        # Last version seen answering for "latest" (None) or a label: a hint for picking tensor names
        # before the call; the answer's own version is always checked against it.
        self._alias_versions: dict[str | None, int] = {}

    # ------------------------------------------------------------------ public API

    def embed(
        self,
        images: Sequence[bytes],
        *,
        version: int | None = None,
        version_label: str | None = None,
        timeout: float | None = None,
    ) -> EmbedResult:
        """Embeddings of ``images`` (encoded JPEG/PNG/...), float32 [n, D], in order.

        All chunks of a split batch are pinned to the version that answered the first one, so the
        vectors of one call always come from one embedding space.
        """
        if version is not None and version_label:
            raise errors.InvalidInput("give a model version or a version label, not both")
        images = list(images)
        for index, image in enumerate(images):
            if not isinstance(image, (bytes, bytearray, memoryview)):
                raise errors.InvalidInput(f"image {index} is {type(image).__name__}, expected encoded bytes")
            if len(image) == 0:
                raise errors.InvalidInput(f"image {index} is empty")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        chunks = self._chunks(images)
        if not chunks:
            info = self._signature(version, version_label, deadline)
            dim = max(info.dim, 0)
            return EmbedResult(np.zeros((0, dim), np.float32), self.model_name, info.model_version)
        parts: list[np.ndarray] = []
        answered: int | None = None
        for start, chunk in chunks:
            vectors, answered = self._embed_chunk(
                chunk,
                start,
                version if answered is None else answered,
                version_label if answered is None else None,
                deadline,
            )
            parts.append(vectors)
        # There was at least one chunk, so the first one's answer set ``answered``.
        return EmbedResult(np.concatenate(parts, axis=0), self.model_name, int(cast(int, answered)))

    def signature(
        self, version: int | None = None, *, version_label: str | None = None, timeout: float | None = None
    ) -> SignatureInfo:
        """Input/output tensor names and embedding size of ``version`` (latest when None)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return self._signature(version, version_label, deadline, refresh=version is None)

    def model_versions(self, timeout: float | None = None) -> dict[int, str]:
        """Every version the server knows of this model and its state name (e.g. "AVAILABLE")."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        request = get_model_status_pb2.GetModelStatusRequest(
            model_spec=model_pb2.ModelSpec(name=self.model_name)
        )
        response = self._call(self._models.GetModelStatus, request, deadline, what="GetModelStatus")
        return {
            int(status.version): get_model_status_pb2.ModelVersionStatus.State.Name(status.state)
            for status in response.model_version_status
        }

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EmbedderClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _chunks(self, images: list[bytes]) -> list[tuple[int, list[bytes]]]:
        budget = self.max_message_bytes - _REQUEST_OVERHEAD
        chunks: list[tuple[int, list[bytes]]] = []
        current: list[bytes] = []
        size = 0
        start = 0
        for index, image in enumerate(images):
            cost = len(image) + _PER_IMAGE_OVERHEAD
            if cost > budget:
                raise errors.ResourceExhausted(
                    f"image {index} is {len(image)} bytes, more than fits in one request "
                    f"(max_message_bytes={self.max_message_bytes})"
                )
            if current and (size + cost > budget or len(current) >= self.max_batch_images):
                chunks.append((start, current))
                current, size, start = [], 0, index
            current.append(image if type(image) is bytes else bytes(image))
            size += cost
        if current:
            chunks.append((start, current))
        return chunks

    def _predict_request(
        self, images: Sequence[bytes], info: SignatureInfo, version: int | None, label: str | None
    ) -> predict_pb2.PredictRequest:
        request = predict_pb2.PredictRequest()
        self._fill_model_spec(request.model_spec, version, label, signature=True)
        _fill_string_tensor(request.inputs[info.input_name], images)
        request.output_filter.append(info.output_name)
        return request

    def _model_spec(self, version: int | None, label: str | None, signature: bool) -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec()
        self._fill_model_spec(spec, version, label, signature)
        return spec

    def _fill_model_spec(
        self, spec: model_pb2.ModelSpec, version: int | None, label: str | None, signature: bool
    ) -> None:
        spec.name = self.model_name
        if signature:
            spec.signature_name = self.signature_name
        if version is not None:
            spec.version.value = int(version)
        elif label:
            spec.version_label = label

    def _signature(
        self, version: int | None, label: str | None, deadline: float, refresh: bool = False
    ) -> SignatureInfo:
        if version is not None:
            with self._lock:
                cached = self._signatures.get(int(version))
            if cached is not None:
                return cached
        elif not refresh:
            with self._lock:
                hint = self._alias_versions.get(label)
                cached = self._signatures.get(hint) if hint is not None else None
            if cached is not None:
                return cached
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=self._model_spec(version, label, signature=False), metadata_field=["signature_def"]
        )
        response = self._call(
            self._predict.GetModelMetadata,
            request,
            deadline,
            what="GetModelMetadata",
            version=version,
            label=label,
        )
        info = _signature_from_metadata(response, self.signature_name)
        with self._lock:
            self._signatures[info.model_version] = info
            if version is None:
                self._alias_versions[label] = info.model_version
        return info

    def _embed_chunk(
        self,
        images: list[bytes],
        offset: int,
        version: int | None,
        label: str | None,
        deadline: float,
        repinned: bool = False,
    ) -> tuple[np.ndarray, int]:
        info = self._signature(version, label, deadline)
        request = self._predict_request(images, info, version, label)
        try:
            response = self._call(
                self._predict.Predict, request, deadline, what="Predict", version=version, label=label
            )
        except errors.InvalidInput as exc:
            if version is None and not repinned:
                # Perhaps a newer version with other tensor names became latest since the names
                # were cached: look again and, if so, ask that version with its own names.
                latest = self._signature(None, label, deadline, refresh=True)
                if latest != info:
                    return self._embed_chunk(
                        images, offset, latest.model_version, None, deadline, repinned=True
                    )
            named = _BAD_ITEM.match(exc.message)
            if named:
                # The server already said which image (the local model server does).
                index = offset + int(named[1])
                raise InvalidImage(f"image {index} is invalid: {named[2]}", index) from exc
            if len(images) > 1:
                self._raise_for_bad_image(images, offset, info, version, label, deadline, exc)
            raise InvalidImage(f"image {offset} was rejected: {exc.message}", offset) from exc
        answered = int(response.model_spec.version.value)
        answered_info = self._signature(answered, None, deadline)
        if (answered_info.input_name, answered_info.output_name) != (info.input_name, info.output_name):
            # A new version with other tensor names took over between metadata and Predict: ask it
            # again, pinned, with its own names.
            return self._embed_chunk(images, offset, answered, None, deadline, repinned=True)
        if version is None:
            with self._lock:
                self._alias_versions[label] = answered
        if info.output_name not in response.outputs:
            raise errors.FailedPrecondition(f"Predict answer has no output {info.output_name!r}")
        vectors = _tensor_to_array(response.outputs[info.output_name])
        if vectors.shape[0] != len(images):
            raise errors.FailedPrecondition(
                f"Predict answered {vectors.shape[0]} embeddings for {len(images)} images"
            )
        return vectors, answered

    def _raise_for_bad_image(
        self,
        images: list[bytes],
        offset: int,
        info: SignatureInfo,
        version: int | None,
        label: str | None,
        deadline: float,
        batch_error: errors.InvalidInput,
    ) -> None:
        """The batch was rejected: find which image(s) are at fault by sending each alone."""
        for index, image in enumerate(images):
            request = self._predict_request([image], info, version, label)
            try:
                self._call(
                    self._predict.Predict, request, deadline, what="Predict", version=version, label=label
                )
            except errors.InvalidInput as exc:
                named = _BAD_ITEM.match(exc.message)
                reason = named[2] if named else exc.message
                raise InvalidImage(
                    f"image {offset + index} is invalid: {reason}", offset + index
                ) from batch_error
        # Every image passes alone: the problem is the request itself, not one image.
        raise batch_error

    def _call(
        self,
        method: Callable[..., T],
        request: Any,
        deadline: float,
        *,
        what: str,
        version: int | None = None,
        label: str | None = None,
    ) -> T:
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.DeadlineExceeded(f"{what} to {self.target} did not finish before the deadline")
            try:
                return method(request, timeout=remaining)
            except grpc.RpcError as exc:
                code = exc.code()
                details = exc.details() or code.name
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self.max_retries:
                    pause = min(_BACKOFF_MAX, _BACKOFF_INITIAL * 2**attempt) * (0.5 + random.random() / 2)
                    attempt += 1
                    if time.monotonic() + pause < deadline:
                        time.sleep(pause)
                        continue
                raise self._domain_error(code, details, what, attempt, version, label) from exc

    def _domain_error(
        self,
        code: grpc.StatusCode,
        details: str,
        what: str,
        attempts: int,
        version: int | None,
        label: str | None,
    ) -> errors.CbirError:
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return errors.InvalidInput(details)
        if code == grpc.StatusCode.NOT_FOUND:
            wanted = (
                f"version {version}"
                if version is not None
                else f"version label {label!r}"
                if label
                else "(latest version)"
            )
            return ModelVersionUnavailable(
                f"model {self.model_name!r} {wanted} is not served by {self.target} "
                f"({self._available_text()}): {details}"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return errors.DeadlineExceeded(f"{what} to {self.target} exceeded its deadline: {details}")
        if code == grpc.StatusCode.UNAVAILABLE:
            return errors.NotReady(
                f"model server {self.target} unavailable after {attempts + 1} attempt(s): {details}"
            )
        if errors.has_domain_error(code):
            return errors.error_for(code, f"{what} to {self.target}: {details}")
        return errors.CbirError(f"{what} to {self.target} failed with {code.name}: {details}")

    def _available_text(self) -> str:
        """Best effort "available versions: [...]" for error messages; never raises."""
        try:
            request = get_model_status_pb2.GetModelStatusRequest(
                model_spec=model_pb2.ModelSpec(name=self.model_name)
            )
            response = self._models.GetModelStatus(request, timeout=1.0)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "the model is not served at all"
            return "available versions unknown"
        available = sorted(
            int(s.version)
            for s in response.model_version_status
            if s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
        )
        return f"available versions: {available}"
