#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has torch, triton, transformers, sentencepiece, safetensors,
# numpy, but no fla-core or web stack). Downloads them into .whl/ (git-ignored: add `/.whl/` to
# .git/info/exclude) for `run(..., carry=[".whl"])`; benchmarks/gpu_session.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
for p in fla-core==0.6.0 einops==0.8.2 fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic_core==2.46.4 \
         annotated-doc==0.0.7 annotated-types==0.7.0 anyio==4.16.0 sniffio==1.3.1 click==8.5.1 h11==0.16.0 \
         httpcore==1.0.9 httpx==0.28.1 prometheus_client==0.26.0 typing_extensions==4.16.0 \
         typing-inspection==0.4.2 uvicorn==0.54.0 opentelemetry-api==1.45.2 fastapi-offline==1.7.7 \
         xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$p"
done
