"""Exceptions users see. Each message names the file or field and says how to fix it."""


class BotError(ValueError):
    """Base class for every error this package raises on purpose.

    A ``ValueError`` too (as in peft), so callers that guard against bad values catch it.
    """


class AssetMissingError(BotError):
    """A bundled model or data package is not installed."""


class BackboneError(BotError):
    """The backbone could not be found or loaded."""


class AdapterError(BotError):
    """An adapter folder is missing, corrupt, or belongs to another backbone."""


class FingerprintMismatch(AdapterError):
    """An adapter was trained on a different backbone than the one loaded."""


class SpecError(BotError):
    """A manifest (adapter.yaml) is malformed."""


class DataError(BotError):
    """A data file cannot be read or does not have the expected columns/labels."""


class BusyError(BotError):
    """Another process is already working on the same adapter (see bot.util.fsutil.adapter_lock)."""


class CacheError(BotError):
    """``$BOT_CACHE`` cannot be used (a file, not writable)."""


class ServeError(BotError):
    """A request the engine or the server refuses; ``status`` is the HTTP status to answer with."""

    status = 400
    code = "invalid_request_error"


class QueueFull(ServeError):
    """Too many requests are waiting or running (HTTP 429)."""

    status = 429
    code = "rate_limit_exceeded"


class UnknownModel(ServeError):
    """The request names a model or adapter that is not served (HTTP 404)."""

    status = 404
    code = "model_not_found"
