"""KernelConfig and its flags (torch-free, bad values are argparse errors), and the Backend a
config builds on the CPU."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from helpers_model import tiny_config
from tnl.config import ModelConfig
from tnl.kernels.backend import Backend
from tnl.kernels.config import KernelConfig, add_kernel_args, kernel_config_from_args


def parse(*argv: str) -> KernelConfig:
    p = argparse.ArgumentParser(prog="tnl")
    add_kernel_args(p)
    return kernel_config_from_args(p.parse_args(list(argv)))


def test_config_module_imports_no_torch():
    code = "import sys, tnl.kernels.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_flags_default_to_the_config_defaults_and_set_every_field(tmp_path):
    assert parse() == KernelConfig()
    table = tmp_path / "gemm.json"
    table.write_text('{"tuned": []}')
    got = parse("--kernels", "torch", "--skinny-gemm", "off", "--gemm-table", str(table), "--fused-decode", "on",
                "--fused-decode-max-rows", "0", "--no-pdl", "--pdl-prefetch", "0")
    assert got == KernelConfig(kernels="torch", skinny_gemm="off", gemm_table=str(table), fused_decode="on",
                               fused_decode_max_rows=0, pdl=False, pdl_prefetch=0)
    assert parse("--pdl").pdl and kernel_config_from_args(argparse.Namespace()) == KernelConfig()


@pytest.mark.parametrize("argv,message", [
    (["--kernels", "triton"], "invalid choice: 'triton'"),
    (["--skinny-gemm", "0"], "invalid choice: '0'"),
    (["--fused-decode", "1"], "invalid choice: '1'"),
    (["--fused-decode-max-rows", "-1"], "expected a whole number >= 0, got -1"),
    (["--pdl-prefetch", "8k"], "expected a whole number >= 0, got '8k'"),
    (["--gemm-table", "/nonexistent/gemm.json"], "is not a file"),
])
def test_bad_flag_values_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("field,value", [("kernels", "fast"), ("fused_decode", "1"), ("skinny_gemm", None),
                                         ("fused_decode_max_rows", -1), ("pdl_prefetch", 1.5), ("pdl", "yes")])
def test_config_checks_its_fields(field, value):
    with pytest.raises(ValueError, match=f"KernelConfig.{field}"):
        KernelConfig(**{field: value})


def test_cpu_backend_is_plain_pytorch():
    b = Backend(KernelConfig(), "cpu")
    assert b.names() == {"prefill": "torch", "decode": "torch", "decode_matmul": "torch",
                         "fused_decode": "auto (up to 1 row)", "pdl": "off"}
    assert b.gemm is None and b.route(1, 4096, 4096, "plain") == "cublas"
    x, w = torch.randn(1, 8), torch.randn(16, 8)
    assert not b.fused_decode_ok(x, [w]) and not b.block_ops(x, [w]).fused
    assert Backend(KernelConfig(fused_decode="on")).fused_decode_ok(x, [w])       # the CPU tests' switch
    assert not Backend(KernelConfig(fused_decode="off")).fused_decode_ok(x, [w])
    assert b.precompile(ModelConfig.from_dict(tiny_config()), torch.bfloat16, [1, 2]) == 0   # no skinny GEMM
    assert torch.equal(b.linear(x, w), torch.nn.functional.linear(x, w))
