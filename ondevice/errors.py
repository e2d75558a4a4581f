"""Error types. Every user-facing failure is an OndeviceError whose message is one line saying what is
wrong and what to do; the CLI prints it without a traceback unless --debug is given."""


class OndeviceError(Exception):
    """Base class: a clear, one-line, user-facing error."""


class InvalidModelError(OndeviceError):
    """A model file or folder is malformed, truncated, hostile or inconsistent."""


class UnsupportedError(OndeviceError):
    """Valid input that ondevice does not support (architecture, dtype, quant type, width...)."""


class OutputExistsError(OndeviceError):
    """The output path exists and --force was not given."""


class MissingExtraError(OndeviceError):
    """An optional dependency is needed; the message names the pip extra to install."""


class InvalidMessagesError(OndeviceError, ValueError):
    """Chat messages given to generate()/chat() are malformed (also a ValueError: it is a bad argument)."""
