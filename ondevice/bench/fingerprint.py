"""Device fingerprint: the hardware facts that decide speed (CPU model, cores, SIMD features, RAM) plus the
software the numbers came from. The device id hashes the hardware facts only, so it survives OS, Python and
library upgrades (those are recorded with every measurement instead)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

# SIMD features that matter to inference kernels (named as Linux /proc/cpuinfo names them).
X86_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
ARM_FEATURES = ("asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2", "sme")
# macOS sysctl hw.optional.* keys -> the Linux names above.
MAC_ARM_FEATURES = {"hw.optional.neon": "asimd", "hw.optional.arm.FEAT_FP16": "asimdhp",
                    "hw.optional.arm.FEAT_DotProd": "asimddp", "hw.optional.arm.FEAT_I8MM": "i8mm",
                    "hw.optional.arm.FEAT_BF16": "bf16", "hw.optional.arm.FEAT_SME": "sme"}


def _sysctl(key: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _linux_cpu() -> dict[str, Any]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = ""
    flags: set[str] = set()
    cores: set[tuple[str, str]] = set()
    physical_id = core_id = ""
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("model name", "Model") and not model:
            model = value
        elif key in ("flags", "Features"):
            flags.update(value.split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            core_id = value
        elif not key:  # blank line ends one processor's block
            if core_id:
                cores.add((physical_id, core_id))
            physical_id = core_id = ""
    if core_id:
        cores.add((physical_id, core_id))
    if not model:
        model = platform.processor() or platform.machine()
    known = X86_FEATURES if platform.machine().lower() in ("x86_64", "amd64", "i686") else ARM_FEATURES
    return {"cpu_model": model, "cores_physical": len(cores) or None,
            "simd": [f for f in known if f in flags]}


def _mac_cpu() -> dict[str, Any]:
    simd = [name for key, name in MAC_ARM_FEATURES.items() if _sysctl(key) == "1"]
    physical = _sysctl("hw.physicalcpu")
    return {"cpu_model": _sysctl("machdep.cpu.brand_string") or platform.processor(),
            "cores_physical": int(physical) if physical and physical.isdigit() else None, "simd": simd}


def total_ram_bytes() -> int | None:
    if sys.platform == "darwin":
        value = _sysctl("hw.memsize")
        return int(value) if value and value.isdigit() else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def hardware_facts() -> dict[str, Any]:
    cpu = _mac_cpu() if sys.platform == "darwin" else _linux_cpu()
    logical = os.cpu_count() or 1
    ram = total_ram_bytes()
    return {
        "cpu_model": cpu.get("cpu_model") or platform.machine(),
        "arch": platform.machine().lower(),
        "cores_physical": cpu.get("cores_physical") or logical,
        "cores_logical": logical,
        "simd": cpu.get("simd", []),
        "ram_gib": round(ram / 2**30) if ram else None,  # rounded: the kernel reserves a varying sliver
    }


def device_id(hardware: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(hardware, sort_keys=True).encode()).hexdigest()[:16]


def device_label(hardware: dict[str, Any]) -> str:
    return (f"{hardware['cpu_model']} ({hardware['cores_physical']}C/{hardware['cores_logical']}T, "
            f"{hardware['ram_gib']} GiB)")


def measure_read_bandwidth_gbs(megabytes: int = 256, rounds: int = 5) -> float:
    """Sustained single-thread memory read bandwidth (GB/s): best of a few sums over an array far larger than
    the caches. A reference point for the roofline calibration, not a STREAM replacement."""
    import numpy as np

    data = np.ones(megabytes * 2**20 // 8, dtype=np.int64)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return round(data.nbytes / best / 1e9, 2)


def software_facts(backend_names: list[str] | None = None) -> dict[str, Any]:
    from ondevice import __version__
    from ondevice.bench.backends import BACKEND_MODULES, backend_class

    names = backend_names if backend_names is not None else list(BACKEND_MODULES)
    return {
        "os": platform.platform(),
        "python": platform.python_version(),
        "ondevice": __version__,
        "backends": {name: backend_class(name).version() for name in names},
    }


@lru_cache(maxsize=1)
def fingerprint(measure_bandwidth: bool = True) -> dict[str, Any]:
    """{"device_id", "label", "hardware", "software", "mem_read_gbs"} for this machine."""
    hardware = hardware_facts()
    return {
        "device_id": device_id(hardware),
        "label": device_label(hardware),
        "hardware": hardware,
        "software": software_facts(),
        "mem_read_gbs": measure_read_bandwidth_gbs() if measure_bandwidth else None,
    }
