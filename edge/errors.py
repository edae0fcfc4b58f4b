"""The one family of user-facing errors.

CLIs print ``HemaedgeError`` messages as one red line and exit non-zero;
anything else keeps its traceback.
"""


class HemaedgeError(Exception):
    """Base of every error a user is meant to read (one line, actionable)."""

    exit_code = 2


class UsageError(HemaedgeError):
    """Contradictory or unsupported options, refused before any work."""


class BundleError(HemaedgeError):
    """A model bundle is missing, truncated, tampered with or malformed."""


class InputError(HemaedgeError):
    """An input file or image is missing or corrupt."""


class SourceError(HemaedgeError):
    """A frame source cannot be opened or has failed for good."""


class BackendError(HemaedgeError):
    """An inference backend cannot be loaded or run."""


class MissingDependencyError(HemaedgeError):
    """An optional dependency is absent; the message names the extra to install."""


class AccuracyGateError(HemaedgeError):
    """INT8 lost more accuracy than the gate allows (a failed export)."""

    exit_code = 3


class StoreError(HemaedgeError):
    """The session store cannot be written (disk full, read-only, corrupt)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (e.g. ``systemctl stop``), turned into an interrupt so a session stops cleanly; exits 143."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency or raise a clear error naming the extra.

    Args:
        module: Dotted module name to import.
        extra: The pip extra that provides it (e.g. ``"export"``).
        purpose: What it is needed for, for the message.

    Returns:
        The imported module.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise MissingDependencyError(
            f"{purpose} needs '{module}', which is not installed: pip install 'hemaedge[{extra}]' ({exc})"
        ) from exc
