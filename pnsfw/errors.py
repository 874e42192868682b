"""Domain exceptions. The CLI shows them as one-line errors, the API as 4xx JSON."""


class PnsfwError(Exception):
    """Base class: a problem the user can fix, shown as one line."""

    http_status = 400


class StoreError(PnsfwError):
    """The store is missing, corrupt or of an unknown format."""


class StoreLocked(StoreError):
    """Another process is writing the store."""

    http_status = 409


class SpaceMismatch(PnsfwError):
    """Vectors, a model or an index come from another embedding space."""

    http_status = 409


class ModelNotFound(PnsfwError):
    """A CLIP model or a classifier cannot be found or loaded."""

    http_status = 404


class SourceError(PnsfwError):
    """A SOURCE argument cannot be read."""


class BadInput(PnsfwError):
    """An argument or an uploaded file is not acceptable."""

    http_status = 422


class NotFound(PnsfwError):
    """An id, a name or a file does not exist."""

    http_status = 404


class NotAnImage(BadInput):
    """An upload is not a decodable image, or a request body has the wrong content type."""

    http_status = 415


class TooLarge(BadInput):
    """An upload or image is over a size limit."""

    http_status = 413


class WorkerLost(PnsfwError):
    """A worker process died (killed, out of memory) while it held work."""

    http_status = 500


class DeviceStalled(PnsfwError):
    """A device call (nvJPEG's hardware decode) did not return: the run stops instead of hanging."""

    http_status = 500


class Interrupted(BaseException):
    """SIGINT/SIGTERM stopped a command; `progress` says how far it got. Not a PnsfwError: exit 128 + signal."""

    def __init__(self, signum: int, progress: str = ""):
        super().__init__(signum, progress)
        self.signum, self.progress = signum, progress
