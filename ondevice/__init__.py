"""ondevice: convert, quantize, run and benchmark small language models on device.

    import ondevice
    model = ondevice.load("smollm2-135m-instruct")          # a path, an alias, or None for the default
    for piece in model.generate([{"role": "user", "content": "Hi!"}], max_tokens=64):
        print(piece, end="", flush=True)
"""

from ondevice import _checkout
from ondevice.errors import OndeviceError

_checkout.install()

__version__ = "0.1.0"

__all__ = ["OndeviceError", "__version__", "load"]


def load(model=None, *, threads=None, n_ctx=None, kv_cache=None, draft=None):
    """Load a model for generation (see ondevice.runtime.load)."""
    from ondevice.runtime import load as _load

    return _load(model, threads=threads, n_ctx=n_ctx, kv_cache=kv_cache, draft=draft)
