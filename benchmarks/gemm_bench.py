"""The skinny-GEMM sweep (cuBLAS vs tnl's Triton configs per decode shape): tnl.kernels.gemm_sweep,
which `tnl tune` runs to write this card's table. Kept here so the benchmark commands of
BENCHMARKS.md still run:

    python benchmarks/gemm_bench.py [--quick] [--json PATH]
"""
from tnl.kernels.gemm_sweep import main

if __name__ == "__main__":
    main()
