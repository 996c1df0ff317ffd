#!/usr/bin/env bash
# HTTP path on the GPU: the offline engine at batch 64 as the baseline, then `tnl serve` under
# 64 streaming clients with uvicorn's asyncio+h11 and with uvloop+httptools (carried in .whl2).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl2/*.whl
export PYTHONPATH=src:/tmp/site
python3 -m tnl.cli bench --model random-7b --batch-sizes 64 --prompt-len 128 --output-len 128 --prefill-len \
  --context-lens --json "$OUT/bench64.json" 2>&1 | grep -v INFO | tail -3
run_server() {
  local name=$1 port=$2 path=$3
  PYTHONPATH=$path python3 -m tnl.cli serve --model random-7b --port "$port" --max-num-seqs 64 > "/tmp/$name.log" 2>&1 &
  local sp=$!
  until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 0.2; kill -0 $sp 2>/dev/null || break; done
  echo "== $name"
  python3 benchmarks/serve_load.py --url "http://127.0.0.1:$port" --concurrency 64 --requests 256 --logprobs \
    --prompt-len 128 --output-len 128 --json "$OUT/$name.json" 2>&1 | grep -E "tok_s|ttft|itl_p|Error"
  kill -TERM $sp; wait $sp
  grep -E "uvloop|httptools|Error|error" "/tmp/$name.log" | head -3
}
run_server asyncio_h11 8201 src:/tmp/site
run_server uvloop_httptools 8202 src:/tmp/site:/tmp/site2
