"""Time fastddim's DDIM step against diffusers' on this machine and write JSON plus a markdown table.

    python bench/run.py --out bench/results/cpu-2core-x86_64.json      # CPU: one thread, torch path
    python bench/run.py --out bench/results/gpu-h100.json              # CUDA: Triton kernel, GPU and host time

The timing code lives in `fastddim.benchmark` (also behind `fastddim bench`); see its docstring for the method.
"""

import sys

from fastddim import benchmark

if __name__ == "__main__":
    sys.exit(benchmark.main())
