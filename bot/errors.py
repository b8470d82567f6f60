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


# ------------------------------------------------------------------ serving
class FieldError(ServeError):
    """A request the server refuses because of one field (``param``), with its HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


class ApiError(Exception):
    """An answer in OpenAI's error shape: status, message naming the fix, code and field."""

    def __init__(self, status: int, message: str, code: str = "invalid_request_error",
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}


class RequestRefused(Exception):
    """A request the HTTP guard answers itself (API key, body size or time), before the app."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class GrammarError(ValueError):
    """The schema, regex or choices cannot be compiled; the message says why."""


# ------------------------------------------------------------------ export, benchmarks
class ExportError(BotError):
    """An adapter cannot be exported in a form the target engine loads."""


class ServerExited(BotError):
    """llama-server stopped before it was ready (``returncode`` < 0: killed by that signal)."""

    def __init__(self, returncode: int, log_tail: str):
        self.returncode = returncode
        what = f"signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
        super().__init__(f"llama-server stopped while starting ({what}); its log ends: {log_tail}")


class NoUsage(RuntimeError):
    """A stream ended without the ``usage`` chunk that ``include_usage`` asks for."""


class MixtureError(BotError):
    """A mixture of adapters (``NAME:WEIGHT+NAME:WEIGHT``) does not parse."""


class ConfigError(BotError):
    """A command-line value or setting is out of range; the message names the flag."""
