"""`ondevice fit`: will this model fit on that device, and how fast will it decode? An estimate.

Decoding one token streams every weight the token touches plus the KV cache once from memory, so on
CPUs it is bound by memory bandwidth (a roofline):

    tok/s ~ efficiency x sustained bandwidth / bytes read per token

`efficiency` is what a backend achieves of the bandwidth, calibrated from the measurements in the store taken on
this machine (decode tok/s x bytes per token / the memory read bandwidth measured during that run). It is carried
over to the target device, whose sustained bandwidth is the profile's measured figure when it has one, else its
published peak x SUSTAINED_FRACTION. RAM need = the model file (mapped) + the KV cache at the context length +
the runtime overhead measured here.

Device profiles are JSON files (ondevice/data/devices/, the user config dir's `devices/`, or --profile FILE),
each fact with its public source.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ondevice.bench.artifacts import Artifact
from ondevice.errors import OndeviceError

BUNDLED_PROFILES = Path(__file__).resolve().parent.parent / "data" / "devices"
SUSTAINED_FRACTION = 0.7  # typical sustained (STREAM-like) share of the theoretical DRAM peak
DEFAULT_EFFICIENCY = 0.5  # used only when nothing was measured on this machine; said so in the output
DEFAULT_OVERHEAD_MIB = 100.0
REQUIRED_FIELDS = ("name", "title", "ram_gb", "memory_bandwidth_gbs")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    title: str
    ram_gb: float
    memory_bandwidth_gbs: float
    usable_ram_fraction: float = 0.5
    sustained_bandwidth_gbs: float | None = None
    data: dict[str, Any] = field(default_factory=dict, compare=False)
    path: str = ""

    @property
    def sustained_gbs(self) -> float:
        return self.sustained_bandwidth_gbs or self.memory_bandwidth_gbs * SUSTAINED_FRACTION

    @classmethod
    def from_file(cls, path: Path) -> DeviceProfile:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise OndeviceError(f"device profile {path}: cannot read it as JSON ({exc})") from None
        missing = [k for k in REQUIRED_FIELDS if k not in data]
        if missing:
            raise OndeviceError(f"device profile {path} lacks {', '.join(missing)} (needs {', '.join(REQUIRED_FIELDS)})")
        try:
            ram, bandwidth = float(data["ram_gb"]), float(data["memory_bandwidth_gbs"])
            fraction = float(data.get("usable_ram_fraction", 0.5))
            sustained = float(data["sustained_bandwidth_gbs"]) if data.get("sustained_bandwidth_gbs") else None
        except (TypeError, ValueError):
            raise OndeviceError(f"device profile {path}: ram_gb, memory_bandwidth_gbs and usable_ram_fraction must "
                                "be numbers") from None
        if ram <= 0 or bandwidth <= 0 or not 0 < fraction <= 1:
            raise OndeviceError(f"device profile {path}: ram_gb and memory_bandwidth_gbs must be > 0 and "
                                "usable_ram_fraction in (0, 1]")
        return cls(str(data["name"]), str(data["title"]), ram, bandwidth, fraction, sustained, data, str(path))


def user_profile_dir() -> Path:
    from platformdirs import user_config_dir

    return Path(user_config_dir("ondevice")) / "devices"


def load_profiles(extra: list[Path] | None = None) -> dict[str, DeviceProfile]:
    """Bundled profiles, then the user's (same name overrides), then --profile files."""
    files = sorted(BUNDLED_PROFILES.glob("*.json"))
    user_dir = user_profile_dir()
    if user_dir.is_dir():
        files += sorted(user_dir.glob("*.json"))
    files += list(extra or [])
    profiles: dict[str, DeviceProfile] = {}
    for path in files:
        profile = DeviceProfile.from_file(Path(path))
        profiles[profile.name] = profile
    return profiles


def find_profile(profiles: dict[str, DeviceProfile], name: str) -> DeviceProfile:
    key = name.lower()
    if key in profiles:
        return profiles[key]
    matches = [p for p in profiles.values() if key in p.name.lower() or key in p.title.lower()]
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(sorted(profiles))
    if not matches:
        raise OndeviceError(f"no device profile matches {name!r}; known: {listing} (or add one with --profile FILE)")
    raise OndeviceError(f"{name!r} matches several profiles ({', '.join(p.name for p in matches)}); be more precise")


# ---------------------------------------------------------------------- calibration from the store
@dataclass(frozen=True)
class Calibration:
    backend: str
    efficiency: float  # achieved / measured read bandwidth
    overhead_mib: float  # peak RSS beyond the model file and its KV cache
    measurements: int
    measured: bool  # False: defaults, nothing measured on this machine


def _bytes_per_token(weights: int, kv_per_position: int, position: float, slots: int = 1) -> float:
    """Bytes a decode step reads: the weights once, and the KV cache of every sequence decoded in that step."""
    return weights + kv_per_position * position * slots


def calibrate(rows: list[dict[str, Any]], device_id: str) -> dict[str, Calibration]:
    """Per backend: the median over (model, quant) of the best efficiency across thread counts, from the ok speed
    measurements taken on `device_id`."""
    from ondevice.bench.backends import BACKEND_MODULES, backend_class

    # Unlisted backends (the null one) are not runtimes; backends unknown here (imported rows) still count.
    skip = {name for name in BACKEND_MODULES if not backend_class(name).listed}
    best: dict[tuple[str, str, str], tuple[float, float]] = {}
    for r in rows:
        if r["backend"] in skip:
            continue
        env, settings = r.get("environment") or {}, r.get("settings") or {}
        bandwidth = env.get("mem_read_gbs")
        if (r["kind"] != "speed" or r["status"] != "ok" or r["device_id"] != device_id or not bandwidth
                or not r.get("decode_tok_s") or not r.get("weight_bytes_per_token")):
            continue
        position = (r.get("prompt_tokens") or 0) + (r.get("gen_tokens") or 0) / 2
        kv = int(settings.get("kv_bytes_per_position") or 0)
        slots = int(settings.get("slots") or 1)  # sequences decoded together (the bench measures one)
        per_token = _bytes_per_token(r["weight_bytes_per_token"], kv, position, slots)
        efficiency = r["decode_tok_s"] * per_token / (bandwidth * 1e9)
        kv_total = kv * slots * ((r.get("prompt_tokens") or 0) + (r.get("gen_tokens") or 0))
        overhead = (r.get("peak_rss_mib") or 0) - ((r.get("artifact_size_bytes") or 0) + kv_total) / 2**20
        key = (r["backend"], r["model"], r.get("quant") or "")
        if key not in best or efficiency > best[key][0]:
            best[key] = (efficiency, overhead)
    out: dict[str, Calibration] = {}
    for backend in sorted({k[0] for k in best}):
        values = [v for k, v in best.items() if k[0] == backend]
        out[backend] = Calibration(backend, statistics.median(v[0] for v in values),
                                   max(0.0, statistics.median(v[1] for v in values)), len(values), True)
    return out


# ---------------------------------------------------------------------- the estimate
@dataclass
class FitEstimate:
    model: str
    quant: str
    device: DeviceProfile
    weights_bytes: int  # read per decoded token
    file_bytes: int
    ctx: int
    position: float  # average KV cache fill while decoding
    slots: int  # sequences held (each with a KV cache of ctx positions) and decoded together
    usable_ram_bytes: float
    per_backend: list[dict[str, Any]]  # backend, tok_s, ram_need_bytes, kv_bytes_per_position, efficiency, ...
    ceiling_tok_s: float  # weights + f16 KV at the published peak bandwidth, efficiency 1

    @property
    def fits(self) -> bool:
        return all(b["fits"] for b in self.per_backend)

    def to_json(self) -> dict[str, Any]:
        return {
            "estimate": True, "model": self.model, "quant": self.quant, "device": self.device.name,
            "device_title": self.device.title, "ram_gb": self.device.ram_gb,
            "usable_ram_bytes": self.usable_ram_bytes, "fits": self.fits,
            "weights_bytes_per_token": self.weights_bytes, "file_bytes": self.file_bytes, "ctx": self.ctx,
            "kv_fill_tokens": self.position, "slots": self.slots, "memory_bandwidth_gbs": self.device.memory_bandwidth_gbs,
            "sustained_bandwidth_gbs": self.device.sustained_gbs, "ceiling_tok_s": self.ceiling_tok_s,
            "backends": self.per_backend, "sources": self.device.data.get("sources", []),
        }


def _kv_element_bytes(backend: str, kv_cache: str | None = None) -> float:
    """Bytes of a cached K/V value in `backend` asked for kv_cache (a backend that keeps its own cache: its own)."""
    from ondevice.bench.backends import BACKEND_MODULES, backend_class
    from ondevice.runtime.kv import kv_element_bytes

    if backend not in BACKEND_MODULES:
        return kv_element_bytes(kv_cache) if kv_cache else 2
    cls = backend_class(backend)
    return cls.kv_bytes_for(kv_cache if kv_cache in cls.kv_cache_types else None)


def _takes_kv_cache(backend: str, kv_cache: str) -> bool:
    from ondevice.bench.backends import BACKEND_MODULES, backend_class

    return backend in BACKEND_MODULES and kv_cache in backend_class(backend).kv_cache_types


def _uncalibrated_backends(artifact: Artifact) -> list[str]:
    """With nothing measured: ondevice's own line first, then llama.cpp's, for those that run the artifact."""
    from ondevice.bench.backends import backend_class

    return [b for b in ("ondevice", "llama.cpp") if artifact.kind in backend_class(b).artifact_kinds] or ["llama.cpp"]


def estimate(artifact: Artifact, profile: DeviceProfile, calibrations: dict[str, Calibration], *, ctx: int = 2048,
             prompt_tokens: int = 512, gen_tokens: int = 128, backends: list[str] | None = None,
             slots: int = 1, kv_cache: str | None = None) -> FitEstimate:
    """RAM need and decode speed; with slots > 1 (`serve --parallel`) the KV cache is held once per slot, and
    tok_s is each stream's speed when all slots decode together (one weight read serves every stream). kv_cache:
    the cache type asked of the backends that take one (None: their default, f16)."""
    position = prompt_tokens + gen_tokens / 2  # the average cache fill while generating
    usable = profile.ram_gb * 1e9 * profile.usable_ram_fraction
    rows = []
    for name in backends or list(calibrations) or _uncalibrated_backends(artifact):
        cal = calibrations.get(name) or Calibration(name, DEFAULT_EFFICIENCY, DEFAULT_OVERHEAD_MIB, 0, False)
        kv = artifact.shape.kv_bytes_per_position(_kv_element_bytes(name, kv_cache)) if artifact.shape else 0
        per_token = _bytes_per_token(artifact.weight_bytes_per_token, kv, position, slots)
        ram = artifact.size_bytes + kv * ctx * slots + cal.overhead_mib * 2**20
        tok_s = cal.efficiency * profile.sustained_gbs * 1e9 / per_token
        rows.append({"backend": name, "tok_s": tok_s, "aggregate_tok_s": tok_s * slots,
                     "bytes_per_token": per_token, "kv_bytes_per_position": kv, "kv_cache_bytes": kv * ctx * slots,
                     "kv_cache": kv_cache if kv_cache and _takes_kv_cache(name, kv_cache) else None,
                     "overhead_bytes": cal.overhead_mib * 2**20, "ram_need_bytes": ram, "fits": ram <= usable,
                     "efficiency": cal.efficiency, "calibrated": cal.measured, "measurements": cal.measurements})
    kv_bytes = artifact.shape.kv_bytes_per_position(_kv_element_bytes("", kv_cache)) if artifact.shape else 0
    ceiling = profile.memory_bandwidth_gbs * 1e9 / _bytes_per_token(artifact.weight_bytes_per_token, kv_bytes, position)
    return FitEstimate(artifact.model, artifact.quant, profile, artifact.weight_bytes_per_token, artifact.size_bytes,
                       ctx, position, slots, usable, rows, ceiling)


def render_text(est: FitEstimate) -> str:
    p = est.device
    mb = 1e6
    lines = [f"{est.model} {est.quant} on {p.title}: an ESTIMATE from a roofline model, not a measurement", "",
             f"{p.ram_gb:g} GB RAM, about {est.usable_ram_bytes / 1e9:.1f} GB usable by one app; context {est.ctx} "
             "tokens" + (f" x {est.slots} slots (each stream's speed while all decode together)"
                          if est.slots > 1 else "") + f"; decode speed with the cache {est.position:.0f} tokens full (roofline ceiling at peak "
             f"bandwidth: {est.ceiling_tok_s:.0f} tok/s)"]
    for b in est.per_backend:
        verdict = "fits" if b["fits"] else "does NOT fit"
        how = (f"efficiency {b['efficiency']:.2f} calibrated on {b['measurements']} measurement(s) on this machine"
               if b["calibrated"] else f"efficiency {b['efficiency']:.2f} ASSUMED: no {b['backend']} measurement of "
               "this machine in the store (run `ondevice bench` first)")
        together = f" (~{b['aggregate_tok_s']:.0f} in all)" if est.slots > 1 else ""
        cache = f"{b['kv_cache']} KV cache" if b.get("kv_cache") else "KV cache"
        lines.append(f"  {b['backend']:<12} ~{b['tok_s']:.0f} tok/s{together}; RAM ~{b['ram_need_bytes'] / 1e9:.2f} GB "
                     f"(file {est.file_bytes / mb:.0f} MB + {cache} {b['kv_cache_bytes'] / mb:.0f} MB"
                     + (f" for {est.slots} slots" if est.slots > 1 else "") + " + runtime "
                     f"{b['overhead_bytes'] / mb:.0f} MB): {verdict}; {how}")
    basis = p.data.get("bandwidth_basis", "")
    sustained = (f"{p.sustained_gbs:g} GB/s sustained" if p.sustained_bandwidth_gbs else
                 f"{p.memory_bandwidth_gbs:g} GB/s peak x {SUSTAINED_FRACTION} sustained = {p.sustained_gbs:.1f} GB/s")
    lines += ["", f"how: tok/s = efficiency x bandwidth / bytes read per token (weights {est.weights_bytes / mb:.1f} MB"
                  f" + the KV cache read); bandwidth {sustained}" + (f" ({basis})" if basis else "") + ".",
              "The efficiency measured here carries over only roughly to another CPU (other cores, SIMD, thermal "
              "limits); small models are also limited by compute and per-token overheads. The runtime overhead is "
              "what a Python process needed here; a native app needs less."]
    sources = p.data.get("sources", [])
    if sources:
        lines.append("profile sources:")
        lines += [f"  - {s.get('fact', '')}" + (f": {s['url']}" if s.get("url") else "") for s in sources]
    return "\n".join(lines)
