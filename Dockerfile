# segpipe images for Ray clusters (docs/cluster.md). Two targets, one per torch build:
#   docker build --target cpu  -t segpipe:cpu  .   # torch from PyTorch's CPU index (about 200 MB)
#   docker build --target cuda -t segpipe:cuda .   # torch from PyPI: the CUDA build; needs the NVIDIA container toolkit
# Both install exactly as the README's "Install" section says (tests/test_packaging.py checks it).
FROM python:3.11-slim AS base
ENV PIP_NO_CACHE_DIR=1 PREFECT_SERVER_ANALYTICS_ENABLED=false RAY_USAGE_STATS_ENABLED=0
WORKDIR /opt/segpipe
COPY pyproject.toml README.md LICENSE ./
COPY segpipe segpipe
COPY pipeline pipeline
COPY flows flows
COPY models models
RUN python3 -m venv .venv
ENV PATH=/opt/segpipe/.venv/bin:$PATH

FROM base AS cpu
RUN .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
RUN .venv/bin/pip install -e ".[xarray]"

FROM base AS cuda
RUN .venv/bin/pip install torch==2.13.0
RUN .venv/bin/pip install -e ".[xarray]"
