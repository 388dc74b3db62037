"""The line every benchmark prints first: its figures mean little without the CPU they ran on."""

import os


def cpu_line() -> str:
    """The CPU model, core count, and whether it has the bfloat16 instructions (AMX, AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return f"cpu: {os.cpu_count()} cores (no /proc/cpuinfo: flags unknown)"
    model = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?"
    )
    flags = set(
        next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    )
    bf16 = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("amx_bf16", "avx512_bf16"))
    return f"cpu: {model}, {os.cpu_count()} cores; {bf16}"
