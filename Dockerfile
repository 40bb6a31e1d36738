# syntax=docker/dockerfile:1
# thyroid-cad images, one Dockerfile, three targets (docs/deploy.md):
#   serve   inference service: FastAPI + onnxruntime-gpu on CUDA 13 / cuDNN 9, no TensorFlow
#   train   trainer CLI: TensorFlow with its CUDA 12 wheels (tensorflow[and-cuda]), export,
#           registry; separate from serve because the two CUDA majors cannot share an image
#   mlflow  MLflow tracking + registry server (PostgreSQL driver), small
# docker build --target serve -t thyroid-cad/serve .   (or: docker compose build)

# onnxruntime-gpu 1.31 is built against CUDA 13 and cuDNN 9: this base must carry the same
# majors (a CUDA 12 base makes onnxruntime fall back to CPU, with one error line per session).
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
# TensorFlow's GPU libraries come as pip wheels (tensorflow[and-cuda]): a plain base suffices.
ARG TRAIN_BASE_IMAGE=debian:bookworm-slim
ARG BUILDER_IMAGE=python:3.11-slim-bookworm
ARG PYTHON_VERSION=3.11
ARG UV_VERSION=0.13.9
ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG2_VERSION=2.9.13
ARG APP_UID=10001

# ---- builder: uv and a relocatable Python (uv-managed, in /opt/python) ------------------
# The final stages copy /opt/python and /opt/venv to the same paths, so the venv's
# interpreter link stays valid on any glibc base (the CUDA image has no Python 3.11).
FROM ${BUILDER_IMAGE} AS builder
ARG UV_VERSION
ARG PYTHON_VERSION
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_PYTHON=${PYTHON_VERSION} \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
RUN pip install --no-cache-dir "uv==${UV_VERSION}" \
    && uv python install "${PYTHON_VERSION}" \
    && uv venv /opt/venv
WORKDIR /app
# The dependency list alone: editing code (or the README) keeps the dependency layers.
COPY pyproject.toml ./

# The application code, in one place for both build stages below.
FROM scratch AS source
COPY pyproject.toml README.md /app/
COPY cli/ /app/cli/
COPY thyroid_cad/ /app/thyroid_cad/
COPY training/ /app/training/
COPY registry/ /app/registry/
COPY service/ /app/service/
COPY scoring/ /app/scoring/

# ---- serve: dependencies, then code -----------------------------------------------------
FROM builder AS serve-build
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/venv/bin/python -r pyproject.toml --extra serve
COPY --from=source /app/ /app/
# Editable: the package is read from /app, data files included (service/api/static, the
# Alembic migrations); the final stage puts the same tree at the same path.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/venv/bin/python --no-deps -e /app

# ---- train: dependencies (TensorFlow with its CUDA 12 wheels), then code -----------------
FROM builder AS train-build
# The train extra pins the TensorFlow range; the same version is then re-requested with
# its and-cuda extra (the NVIDIA wheels), so pyproject.toml stays the one version list.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/venv/bin/python -r pyproject.toml --extra train --extra serve \
    && TF_VERSION="$(/opt/venv/bin/python -c 'from importlib.metadata import version; print(version("tensorflow"))')" \
    && uv pip install --python /opt/venv/bin/python "tensorflow[and-cuda]==${TF_VERSION}"
COPY --from=source /app/ /app/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/venv/bin/python --no-deps -e /app

# ---- serve: the inference service -------------------------------------------------------
FROM ${CUDA_RUNTIME_IMAGE} AS serve
ARG APP_UID
RUN groupadd --system --gid "${APP_UID}" thyroid \
    && useradd --system --uid "${APP_UID}" --gid thyroid --home-dir /var/lib/thyroid-cad \
        --shell /usr/sbin/nologin thyroid \
    && mkdir -p /var/lib/thyroid-cad \
    && chown thyroid:thyroid /var/lib/thyroid-cad
COPY --from=serve-build /opt/python /opt/python
COPY --from=serve-build /opt/venv /opt/venv
COPY --from=serve-build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    THYROID_CAD_HOME=/var/lib/thyroid-cad
# Model cache (last resolved champion: served when the registry is down), audit spool.
VOLUME ["/var/lib/thyroid-cad"]
WORKDIR /var/lib/thyroid-cad
USER ${APP_UID}:${APP_UID}
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["thyroid-cad", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---- train: the thyroid-cad CLI with TensorFlow -----------------------------------------
FROM ${TRAIN_BASE_IMAGE} AS train
ARG APP_UID
RUN groupadd --system --gid "${APP_UID}" thyroid \
    && useradd --system --uid "${APP_UID}" --gid thyroid --home-dir /var/lib/thyroid-cad \
        --shell /usr/sbin/nologin thyroid \
    && mkdir -p /var/lib/thyroid-cad \
    && chown thyroid:thyroid /var/lib/thyroid-cad
COPY --from=train-build /opt/python /opt/python
COPY --from=train-build /opt/venv /opt/venv
COPY --from=train-build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    THYROID_CAD_HOME=/var/lib/thyroid-cad \
    KERAS_HOME=/var/lib/thyroid-cad/keras \
    TF_CPP_MIN_LOG_LEVEL=2
# Datasets, exports and Keras' weight cache.
VOLUME ["/var/lib/thyroid-cad"]
WORKDIR /var/lib/thyroid-cad
USER ${APP_UID}:${APP_UID}
ENTRYPOINT ["thyroid-cad"]
CMD ["--help"]

# ---- mlflow: tracking + registry server -------------------------------------------------
# Its own small image: the server needs full mlflow and a PostgreSQL driver, not TensorFlow
# (the train image would be 3 GB for this) nor CUDA. Same MLflow 3.x as the clients.
FROM ${BUILDER_IMAGE} AS mlflow
ARG MLFLOW_VERSION
ARG PSYCOPG2_VERSION
ARG APP_UID
RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" "psycopg2-binary==${PSYCOPG2_VERSION}" \
    && groupadd --system --gid "${APP_UID}" mlflow \
    && useradd --system --uid "${APP_UID}" --gid mlflow --home-dir /mlartifacts \
        --shell /usr/sbin/nologin mlflow \
    && mkdir -p /mlartifacts \
    && chown mlflow:mlflow /mlartifacts
ENV PYTHONUNBUFFERED=1
# Artifacts (model files) served over HTTP by --serve-artifacts; metadata is in PostgreSQL.
VOLUME ["/mlartifacts"]
WORKDIR /mlartifacts
USER ${APP_UID}:${APP_UID}
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--workers", "1"]
