"""ondevice: convert, quantize, run and benchmark small language models on device."""

from ondevice.errors import OndeviceError

__version__ = "0.1.0"

__all__ = ["OndeviceError", "__version__"]
