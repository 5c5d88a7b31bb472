"""A scriptable in-process TF Serving (the real PredictionService/ModelService protos) for client tests."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)


def _shape(*dims: int) -> tensor_shape_pb2.TensorShapeProto:
    return tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims]
    )


class FakeServing(
    prediction_service_pb2_grpc.PredictionServiceServicer, model_service_pb2_grpc.ModelServiceServicer
):
    """Answers like TF Serving: the embedding of an image is [len, first byte, version, 1].

    ``versions`` maps version -> (input alias, output alias). ``failures`` is a list of
    (code, details) returned by the next Predict calls, one per call. An image equal to b"bad"
    is rejected like TF Serving rejects an undecodable image: INVALID_ARGUMENT without an index.
    """

    def __init__(self, versions: dict[int, tuple[str, str]] | None = None, dim: int = 4, delay: float = 0.0):
        self.versions = versions or {1: ("image_bytes", "embedding")}
        self.dim = dim
        self.delay = delay
        self.failures: list[tuple[grpc.StatusCode, str]] = []
        self.calls: list[tuple[str, object]] = []
        self._lock = threading.Lock()

    def count(self, method: str) -> int:
        return sum(1 for name, _ in self.calls if name == method)

    def _version(self, spec, context) -> int:
        if spec.name != "m":
            context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({spec.name})")
        if spec.HasField("version"):
            if spec.version.value not in self.versions:
                context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"Servable not found for request: Specific(m, {spec.version.value})",
                )
            return spec.version.value
        if spec.version_label:
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"Unrecognized servable version label: {spec.version_label}"
            )
        return max(self.versions)

    def GetModelMetadata(self, request, context):
        with self._lock:
            self.calls.append(("GetModelMetadata", request))
        version = self._version(request.model_spec, context)
        input_name, output_name = self.versions[version]
        signature = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
        signature.inputs[input_name].CopyFrom(
            meta_graph_pb2.TensorInfo(dtype=types_pb2.DT_STRING, tensor_shape=_shape(-1))
        )
        signature.outputs[output_name].CopyFrom(
            meta_graph_pb2.TensorInfo(dtype=types_pb2.DT_FLOAT, tensor_shape=_shape(-1, self.dim))
        )
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        signature_map.signature_def["serving_default"].CopyFrom(signature)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = "m"
        response.model_spec.version.value = version
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def Predict(self, request, context):
        with self._lock:
            self.calls.append(("Predict", request))
            failure = self.failures.pop(0) if self.failures else None
        if self.delay:
            time.sleep(self.delay)
        if failure is not None:
            context.abort(*failure)
        version = self._version(request.model_spec, context)
        input_name, output_name = self.versions[version]
        if set(request.inputs) != {input_name}:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"input size does not match signature: missing {input_name}"
            )
        images = list(request.inputs[input_name].string_val)
        if b"bad" in images:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "Unknown image file format. One of JPEG, PNG required."
            )
        values = []
        for image in images:
            values.extend([float(len(image)), float(image[0]), float(version), 1.0])
        response = predict_pb2.PredictResponse()
        response.model_spec.name = "m"
        response.model_spec.version.value = version
        response.model_spec.signature_name = "serving_default"
        response.outputs[output_name].CopyFrom(
            tensor_pb2.TensorProto(
                dtype=types_pb2.DT_FLOAT, tensor_shape=_shape(len(images), self.dim), float_val=values
            )
        )
        return response

    def GetModelStatus(self, request, context):
        response = get_model_status_pb2.GetModelStatusResponse()
        for version in sorted(self.versions):
            response.model_version_status.add(
                version=version, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE
            )
        return response


def start_fake(fake: FakeServing, max_message_bytes: int = 64 * 1024 * 1024) -> tuple[grpc.Server, int]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(fake, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port
