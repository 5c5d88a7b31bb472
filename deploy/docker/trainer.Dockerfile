# syntax=docker/dockerfile:1
# The trainer image: `python -m trainer train|export|...` on TensorFlow's own GPU image (CUDA and
# cuDNN matching TF 2.21). For clusters without GPUs:
#   --build-arg TF_IMAGE=tensorflow/tensorflow:2.21.0   (tagged ...-cpu by `make images`)
ARG TF_IMAGE=tensorflow/tensorflow:2.21.0-gpu

FROM ${TF_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential python3-venv \
 && rm -rf /var/lib/apt/lists/*
# --system-site-packages reuses the image's TensorFlow build (pinned by the tag) instead of a second copy.
RUN python3 -m venv --system-site-packages /opt/cbir
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
COPY cbir cbir
COPY embedder embedder
COPY indexer indexer
COPY gateway gateway
COPY trainer trainer
RUN /opt/cbir/bin/pip install . \
 && mkdir -p cbir/v1 \
 && /opt/cbir/bin/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/cbir/v1/*.proto \
 && echo '"""Generated from protos/cbir/v1 at image build; do not edit."""' > cbir/v1/__init__.py \
 && /opt/cbir/bin/pip install --no-deps --force-reinstall . \
 && /opt/cbir/bin/python -c "import tensorflow as tf, trainer; assert tf.__version__.startswith('2.21')"

FROM ${TF_IMAGE}
LABEL org.opencontainers.image.title="cbir-trainer" \
      org.opencontainers.image.description="CBIR metric-learning training and SavedModel export"
RUN groupadd --system --gid 10001 cbir \
 && useradd --system --uid 10001 --gid cbir --home-dir /var/lib/cbir --create-home --shell /usr/sbin/nologin cbir
COPY --from=build /opt/cbir /opt/cbir
ENV PATH=/opt/cbir/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=1 \
    HOME=/var/lib/cbir \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /var/lib/cbir
ENTRYPOINT ["/opt/cbir/bin/python"]
CMD ["-m", "trainer", "--help"]
