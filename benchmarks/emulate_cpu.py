"""Run a benchmark limited to the instruction sets of another kind of processor, on this one: the
code paths, choices and ratios mmcap gets there, not that machine's speed.

    python benchmarks/emulate_cpu.py xeon-without-amx benchmarks/bench_caption.py
    python benchmarks/emulate_cpu.py avx512-bf16-without-amx benchmarks/bench_caption.py --levers

The issue's three kinds of CPU take different paths: AMX (mmcap's int8 kernel on tiles, bf16 on
AMX), AVX-512 VNNI without AMX (an Intel Xeon before Sapphire Rapids: the kernel on VNNI, bf16
slower than fp32) and AVX-512 with BF16 but no AMX (an AMD EPYC of the Zen 4 generation). On an AMX
machine this runner reaches the other two:

- mmcap's C++ kernels are built for the kind's `-march` (no AMX in it, so `amx_int8()` is False),
  into a fresh cache directory, with a fresh cache of timed choices (`MMCAP_CACHE_DIR`);
- oneDNN, under torch's bf16 matmuls, convolutions and its quantized engine, is capped at the
  kind's instruction set (`ONEDNN_MAX_CPU_ISA`). fbgemm has no AMX path and stays as it is.

What it cannot emulate: the other machine's cores (how many VNNI or FMA ports, its clock), caches
and memory, so its ratios are the ones this core gives on that kind's instructions. The JSON line
says `emulated_cpu`; `cpu_model` and `cpu_flags` stay this machine's.
"""
from __future__ import annotations

import os
import runpy
import sys
import tempfile

KINDS = {  # kind: (gcc -march, ONEDNN_MAX_CPU_ISA)
    "xeon-without-amx": ("icelake-server", "AVX512_CORE_VNNI"),
    "avx512-bf16-without-amx": ("cooperlake", "AVX512_CORE_BF16"),
}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in KINDS:
        raise SystemExit(f"usage: emulate_cpu.py {{{','.join(KINDS)}}} BENCHMARK.py [ARGS...]")
    kind, script, args = argv[0], argv[1], argv[2:]
    march, isa = KINDS[kind]
    # before torch loads: oneDNN reads its cap once
    os.environ["ONEDNN_MAX_CPU_ISA"] = isa
    os.environ["MMCAP_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"mmcap-{kind}-")
    os.environ["MMCAP_EMULATED_CPU"] = f"{kind} (-march={march}, ONEDNN_MAX_CPU_ISA={isa})"
    from mmcap.accel import kernels

    kernels.FLAGS[:] = [f"-march={march}" if flag == "-march=native" else flag for flag in kernels.FLAGS]
    print(f"emulating {os.environ['MMCAP_EMULATED_CPU']}", file=sys.stderr)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
