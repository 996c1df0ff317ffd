"""A short soak: benchmarks/soak.py (the one load generator) runs CLIENTS clients of mixed traffic
for SOAK_S seconds against a real server, some of them dropping streams mid-way, and the server
must come out as it went in: no 5xx, every stream read to the end ended with data: [DONE], every
slot free again, its RSS within a bound, and a clean exit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers_server import ServerProcess, make_tiny_model

pytest.importorskip("psutil")

CLIENTS = 64
SOAK_S = 30              # of load after the warm-up; the figures below are over both
WARMUP_S = 5             # the allocator and the first-use buffers settle before RSS is first read
RSS_GROWTH_MB = 64       # measured: 1-5 MB over 30 s (3,300-4,400 requests) once warm
SOAK = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks",
                    "soak.py")


def test_soak(tmp_path):
    model_dir = make_tiny_model(tmp_path / "tiny")
    # the prompt-state cache off: it fills by design (up to its budget), which is not a leak
    srv = ServerProcess(model_dir, "--max-num-seqs", "16", "--no-enable-prefix-caching").start()
    try:
        out = tmp_path / "soak.json"
        run = subprocess.run([sys.executable, SOAK, "--url", srv.url, "--clients", str(CLIENTS),
                              "--duration", str(SOAK_S), "--warmup", str(WARMUP_S), "--pid", str(srv.proc.pid),
                              "--json", str(out)], capture_output=True, text=True, timeout=SOAK_S + WARMUP_S + 120)
        assert run.returncode == 0, run.stdout + run.stderr
        fig = json.loads(out.read_text())
        print(run.stdout)
    finally:
        code = srv.stop()
    log = srv.log()
    assert code == 0, log[-5000:]
    assert fig["server_errors"] == 0 and fig["stream_error_events"] == 0, fig["examples"]
    assert fig["client_errors"] == 0, fig["examples"]
    assert fig["requests"] > 10 * CLIENTS and fig["streams_dropped"] > 0 and fig["streams_read_to_end"] > 0, fig
    assert fig["streams_ended_done"] == fig["streams_read_to_end"], fig["examples"]
    assert not any(fig["gauges_after"].values()), fig["gauges_after"]   # slots, running, waiting: all 0
    assert fig["rss_end_mb"] - fig["rss_start_mb"] < RSS_GROWTH_MB, fig
    assert "Traceback" not in log, log[-5000:]
