#!/usr/bin/env bash
# One device session: GPU tests, the anchor ceilings, `tnl bench`, and (phase "serve") load
# time, server start-up and HTTP load. Results go to $OUT (default ./out).
#   bash benchmarks/gpu_session.sh tests bench sync profile http gemm   # or: serve, demo
# Phases: tests (tests/kernels/: test_cuda.py, test_triton_gemm.py), bench (anchor_bench + tnl bench),
# sync (tnl bench with --no-async-scheduling, the A/B), cublas (tnl bench with --skinny-gemm off,
# the A/B of the Triton decode matmuls), ab (fused decode layers and PDL on/off: AB_COMBOS, each
# combo a set of tnl bench kernel flags; AB_REPEAT, AB_BATCH), profile, http (offline batch 64 then `tnl serve` under 64 (HTTP_MODES, HTTP_REPEAT, HTTP_PROCS)
# streaming clients, same call), httpab (HTTP A/B of server variants with the engine's counters),
# serve (load from disk + start-up + HTTP), gemm (kernel sweep), multiturn (the prompt-state
# cache's chat workload, cache on and off: MT_ARGS, MT_TIMEOUT),
# demo (train the demo model).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
for phase in "$@"; do
  case $phase in
  tests)
    python3 -m pytest tests/kernels/test_cuda.py tests/kernels/test_triton_gemm.py -q -p no:cacheprovider 2>&1 \
      | tee "$OUT/gpu_tests.txt" | tail -25 ;;
  bench)
    python3 benchmarks/anchor_bench.py > "$OUT/anchor_stdout.txt" 2>&1; tail -3 "$OUT/anchor_stdout.txt"
    python3 -m tnl.cli bench --model random-7b --batch-sizes 1 64 256 --prompt-len 128 --output-len 64 \
      --prefill-len 16384 --context-lens 1024 65536 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" | grep -v INFO ;;
  serve)
    python3 - <<'PY' 2>&1 | tee "$OUT/load.txt"
import os, time, torch
from tnl.model.weights import RANDOM_7B
from tnl.model.weights import make_random_checkpoint, load_model
d = "/tmp/r7b"
t = time.perf_counter(); make_random_checkpoint(d, RANDOM_7B, dtype=torch.bfloat16); print("write_s", time.perf_counter() - t)
files = [os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors")]
t = time.perf_counter(); n = 0
for f in files:
    with open(f, "rb") as fh:
        while b := fh.read(1 << 26): n += len(b)
read_s = time.perf_counter() - t; print("read_files_s", read_s, "GB", n / 1e9)
t = time.perf_counter(); m = load_model(d, device="cuda", dtype="bfloat16", progress=False); torch.cuda.synchronize()
load_s = time.perf_counter() - t; print("load_model_s", load_s, "ratio_to_read", load_s / read_s)
print("peak_gpu_GB", torch.cuda.max_memory_allocated() / 1e9)
PY
    t0=$(date +%s.%N)
    # shellcheck disable=SC2016
    python3 -m tnl.cli serve --model /tmp/r7b --port 8123 --max-num-seqs 64 --max-num-batched-tokens 8192 \
      > "$OUT/serve_log.txt" 2>&1 &
    SP=$!
    until curl -sf http://127.0.0.1:8123/health >/dev/null; do sleep 0.2; kill -0 $SP || break; done
    python3 -c "import sys,time; print('server_ready_s', time.time() - float(sys.argv[1]))" "$t0" | tee -a "$OUT/load.txt"
    python3 benchmarks/serve_load.py --url http://127.0.0.1:8123 --concurrency 64 --requests 256 --logprobs \
      --prompt-len 128 --output-len 128 --json "$OUT/serve_load.json" 2>&1 | tee -a "$OUT/load.txt"
    kill -TERM $SP; wait $SP; echo "server exit $?" | tee -a "$OUT/load.txt"
    grep -v "tnl.access" "$OUT/serve_log.txt" | tail -20 ;;
  sync)
    python3 -m tnl.cli bench --model random-7b --batch-sizes 1 64 256 --prompt-len 128 --output-len 64 \
      --prefill-len --context-lens --no-async-scheduling --json "$OUT/bench_sync.json" 2>&1 \
      | tee "$OUT/bench_sync.txt" | grep -v INFO ;;
  cublas)
    python3 -m tnl.cli bench --model random-7b --skinny-gemm off --batch-sizes 1 64 256 --prompt-len 128 \
      --output-len 64 --prefill-len --context-lens --json "$OUT/bench_cublas.json" 2>&1 \
      | tee "$OUT/bench_cublas.txt" | grep -v INFO ;;
  multiturn)
    # the prompt-state cache's workload (benchmarks/multiturn.py), with the cache on, then off
    for variant in on off; do
      flag=; [ "$variant" = off ] && flag=--no-enable-prefix-caching
      python3 -m tnl.cli serve --model random-7b --port 8125 --max-num-seqs 64 $flag > "$OUT/serve_mt_$variant.log" 2>&1 &
      SP=$!
      until curl -sf http://127.0.0.1:8125/health >/dev/null; do sleep 0.2; kill -0 $SP 2>/dev/null || break; done
      timeout "${MT_TIMEOUT:-240}" python3 benchmarks/multiturn.py --url http://127.0.0.1:8125 --vocab 64000 \
        ${MT_ARGS:---conversations 32 --turns 8 --system-len 4096 --turn-len 200 --output-len 200} \
        --json "$OUT/multiturn_$variant.json" 2>&1 | tee "$OUT/multiturn_$variant.txt" | tail -20
      kill -TERM $SP; wait $SP
    done ;;
  http)
    python3 -m tnl.cli bench --model random-7b --batch-sizes 64 --prompt-len 128 --output-len 128 --prefill-len \
      --context-lens --json "$OUT/bench64.json" 2>&1 | grep -v INFO | tail -3 | tee "$OUT/http.txt"
    echo "== offline engine, the same 256 requests queued at once (prefill included)" | tee -a "$OUT/http.txt"
    python3 benchmarks/offline_workload.py --requests 256 --max-num-seqs 64 --prompt-len 128 --output-len 128 \
      --json "$OUT/offline_workload.json" 2>&1 | grep -v INFO | tee -a "$OUT/http.txt"
    for mode in ${HTTP_MODES:-async}; do
      flag=--async-scheduling; [ "$mode" = sync ] && flag=--no-async-scheduling
      python3 -m tnl.cli serve --model random-7b --port 8124 --max-num-seqs 64 $flag > "$OUT/serve_$mode.log" 2>&1 &
      SP=$!
      until curl -sf http://127.0.0.1:8124/health >/dev/null; do sleep 0.2; kill -0 $SP 2>/dev/null || break; done
      for rep in $(seq "${HTTP_REPEAT:-1}"); do
        for procs in ${HTTP_PROCS:-1}; do
          echo "== tnl serve ($mode scheduling), 64 streaming clients in $procs process(es), run $rep" | tee -a "$OUT/http.txt"
          python3 benchmarks/serve_load.py --url http://127.0.0.1:8124 --concurrency 64 --requests 256 --logprobs \
            --prompt-len 128 --output-len 128 --processes "$procs" --json "$OUT/serve_load_$mode${rep}_p$procs.json" \
            2>&1 | tee -a "$OUT/http.txt"
        done
      done
      kill -TERM $SP; wait $SP
    done ;;
  httpab)
    # HTTP A/B on one machine: offline baselines, then one server per variant in HTTPAB_VARIANTS,
    # each "code[@cpus]": code "new" = this tree, "swi" = this tree with sys.setswitchinterval($SWI),
    # "uv" = this tree with uvloop + httptools from .whl2/, "old" = the tree in .old/src.tar;
    # @cpus pins the server process (taskset), e.g. new@0-1 for a slow host. HTTP_REPEAT runs
    # for each of HTTP_PROCS; py-spy (if it attaches) on the first variant's first run.
    python3 -m tnl.cli bench --model random-7b --batch-sizes 64 --prompt-len 128 --output-len 128 --prefill-len \
      --context-lens 2>&1 | grep -v INFO | tail -3 | tee "$OUT/httpab.txt"
    python3 benchmarks/offline_workload.py --requests 256 --max-num-seqs 64 --prompt-len 128 --output-len 128 \
      2>&1 | grep -v INFO | tee -a "$OUT/httpab.txt"
    port=8130; first=1
    [ -d .whl2 ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl2/*.whl
    [ -f .old/src.tar ] && mkdir -p /tmp/old && tar -xf .old/src.tar -C /tmp/old
    for variant in ${HTTPAB_VARIANTS:-new old}; do
      code=${variant%@*}; cpus=""; [ "$code" != "$variant" ] && cpus="taskset -c ${variant#*@}"
      port=$((port + 1)); pp=$PYTHONPATH; pre="import sys"
      [ "$code" = old ] && pp=/tmp/old/src:$PYTHONPATH
      [ "$code" = uv ] && pp=$PYTHONPATH:/tmp/site2
      [ "$code" = swi ] && pre="import sys; sys.setswitchinterval(${SWI:-0.001})"
      PYTHONPATH=$pp $cpus python3 -c "$pre; from tnl.cli import main; sys.argv[0] = 'tnl'; sys.exit(main())" serve \
        --model random-7b --port $port --max-num-seqs 64 > "$OUT/serve_$code.log" 2>&1 &
      SP=$!
      until curl -sf http://127.0.0.1:$port/health >/dev/null; do sleep 0.2; kill -0 $SP 2>/dev/null || break; done
      for rep in $(seq "${HTTP_REPEAT:-2}"); do
        for procs in ${HTTP_PROCS:-4}; do
          spy=""
          if [ $first = 1 ] && [ -x /tmp/site/bin/py-spy ]; then
            /tmp/site/bin/py-spy record -p $SP -r 100 -d 5 --threads --gil -f raw -o "$OUT/pyspy_gil.txt" \
              --nonblocking > "$OUT/pyspy.log" 2>&1 & spy=$!
          fi
          first=0
          echo "== $variant, 64 streaming clients in $procs process(es), run $rep" | tee -a "$OUT/httpab.txt"
          python3 benchmarks/serve_load.py --url http://127.0.0.1:$port --concurrency 64 --requests 256 --logprobs \
            --prompt-len 128 --output-len 128 --processes "$procs" 2>&1 | tee -a "$OUT/httpab.txt"
          [ -n "$spy" ] && wait $spy
        done
      done
      kill -TERM $SP; wait $SP
    done ;;
  ab)
    # A/B of the fused decode layers and programmatic dependent launch, alternating runs
    IFS=';' read -ra combos <<< "${AB_COMBOS:-default;--no-pdl;--fused-decode off;--no-pdl --fused-decode off}"
    for rep in $(seq "${AB_REPEAT:-1}"); do
      for combo in "${combos[@]}"; do
        echo "== $combo (round $rep)" | tee -a "$OUT/ab.txt"
        # shellcheck disable=SC2046
        python3 -m tnl.cli bench --model random-7b $([ "$combo" = default ] || echo "$combo") \
          --batch-sizes ${AB_BATCH:-1 64} --prompt-len 128 --output-len ${AB_OUTPUT_LEN:-128} --prefill-len \
          --context-lens 2>&1 | grep -v INFO | tee -a "$OUT/ab.txt"
      done
    done ;;
  statekernel)
    python3 benchmarks/decode_kernel_bench.py --batch 1 64 256 2>&1 | tee "$OUT/decode_kernel.txt" ;;
  gemm)
    python3 benchmarks/gemm_bench.py ${GEMM_ARGS:-} --json "$OUT/gemm.json" 2>&1 | tee "$OUT/gemm.txt" | tail -60 ;;
  profile)
    python3 benchmarks/profile_decode.py --batch-sizes 1 64 2>&1 | grep -v INFO | tee "$OUT/profile.txt" ;;
  demo)
    python3 demo/train.py --device cuda 2>&1 | tee "$OUT/demo_train.txt" | tail -30
    mkdir -p "$OUT/demo" && cp src/tnl/demo/* "$OUT/demo/" ;;
  esac
done
