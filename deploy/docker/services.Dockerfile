# syntax=docker/dockerfile:1
# The services image: gateway, indexer (serve and reindex), and the local model server
# (`python -m embedder serve`), all from one Python environment. CPU only.
#   make images            (or: docker build -f deploy/docker/services.Dockerfile -t cbir/services .)
# Pin the base by digest in production: --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# hnswlib is compiled from source.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/cbir
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
COPY cbir cbir
COPY embedder embedder
COPY indexer indexer
COPY gateway gateway
COPY trainer trainer
# Exactly the versions pinned in pyproject.toml; then the gRPC stubs (never committed) are generated
# and the package is reinstalled with them.
RUN /opt/cbir/bin/pip install . \
 && mkdir -p cbir/v1 \
 && /opt/cbir/bin/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/cbir/v1/*.proto \
 && /opt/cbir/bin/python -m grpc_tools.protoc -Iprotos --include_source_info --descriptor_set_out=cbir/v1/descriptors.binpb protos/cbir/v1/*.proto \
 && echo '"""Generated from protos/cbir/v1 at image build; do not edit."""' > cbir/v1/__init__.py \
 && mkdir -p cbir/tfserving \
 && /opt/cbir/bin/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. protos/cbir/tfserving/*.proto \
 && echo '"""Generated from protos/cbir/tfserving at image build; do not edit."""' > cbir/tfserving/__init__.py \
 && /opt/cbir/bin/pip install --no-deps --force-reinstall . \
 && /opt/cbir/bin/python -c "from cbir.v1 import search_pb2, indexer_pb2; import gateway, indexer, embedder.model_config; from gateway.openapi import proto_comments; assert proto_comments()"
COPY deploy/docker/health_check.py /opt/cbir/bin/cbir-health-check

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="cbir-services" \
      org.opencontainers.image.description="CBIR gateway, indexer and local model server"
# A fixed numeric user: the manifests' runAsUser/fsGroup match it and runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 cbir \
 && useradd --system --uid 10001 --gid cbir --home-dir /var/lib/cbir --create-home --shell /usr/sbin/nologin cbir
COPY --from=build /opt/cbir /opt/cbir
RUN chmod 0755 /opt/cbir/bin/cbir-health-check \
 && sed -i '1i #!/opt/cbir/bin/python' /opt/cbir/bin/cbir-health-check
ENV PATH=/opt/cbir/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    HOME=/var/lib/cbir
USER 10001:10001
WORKDIR /var/lib/cbir
# Every manifest passes `-m <package> <command> ...`.
ENTRYPOINT ["/opt/cbir/bin/python"]
CMD ["-m", "gateway", "--help"]
