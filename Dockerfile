# The embedstream image: one image, three roles (serve, worker, mcp) chosen by the command.
FROM python:3.11-slim

# PyPI's torch wheel for Linux is the CUDA build. For a smaller CPU-only image,
# pass the index of PyTorch's CPU wheels: --build-arg TORCH_INDEX_URL=<url>
ARG TORCH_INDEX_URL=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    EMBEDSTREAM_HOST=0.0.0.0

WORKDIR /app
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install torch==2.13.0; \
    fi
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY workers ./workers
COPY mcp_server ./mcp_server
COPY embedstream ./embedstream
RUN pip install .

EXPOSE 8000
CMD ["embedstream", "serve"]
