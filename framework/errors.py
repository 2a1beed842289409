"""The framework's exceptions.

Every message ends with what to do about it. HTTP status codes are *not*
decided here: `framework.serve.answers` maps these classes to statuses in one table.
"""

from __future__ import annotations


class FrameworkError(Exception):
    """Base class: anything the framework raises on purpose."""


class ConfigError(FrameworkError):
    """`deploy.yaml` or an environment variable is wrong."""


class RegistryError(FrameworkError):
    """A deployment was declared wrongly (duplicate name, bad option)."""


class PackagingError(FrameworkError):
    """A deployment could not be pickled into an artifact."""


class StoreError(FrameworkError):
    """The store could not be read or written."""


class NotFound(FrameworkError):
    """An unknown deployment, branch, version or alias."""


class StoreDamaged(FrameworkError):
    """A store file is unreadable (truncated, not JSON) or not where it was published."""


class IntegrityError(FrameworkError):
    """An artifact does not match its manifest (sha256, signature)."""


class IncompatibleArtifact(FrameworkError):
    """An artifact was built for another Python major.minor."""


class LoadFailed(FrameworkError):
    """A stored version raised while being unpickled or set up."""


class EnvironmentFailed(LoadFailed):
    """A version's environment could not be built (a missing package, a conflict)."""


class EnvironmentBuilding(FrameworkError):
    """A version's environment is still being built; retry later."""


class Unauthorized(FrameworkError):
    """A call without a valid API key, where keys are required."""


class Forbidden(FrameworkError):
    """An API key that is valid but not allowed on this deployment."""


class BadRequest(FrameworkError):
    """A request body that does not follow the protocol."""


class Gone(FrameworkError):
    """Something that existed for a limited time (a result link) has expired."""


class PayloadTooLarge(FrameworkError):
    """A request body over the configured limit."""


class BodyTimeout(FrameworkError):
    """A client did not send its whole request body within `server.body_timeout_seconds`."""


class DeploymentFailed(FrameworkError):
    """The user's function raised on a single call."""


class WorkerCrashed(DeploymentFailed):
    """The worker process of an isolated version died while running a call."""


class RowsFailed(FrameworkError):
    """At least one row of a batch raised; carries every row's outcome."""

    def __init__(self, message: str, data: list, errors: list) -> None:
        super().__init__(message)
        self.data = data
        self.errors = errors


class CallTimeout(FrameworkError):
    """A call ran past its time limit."""


class Overloaded(FrameworkError):
    """The server is at its concurrency limit; retry later."""


class InferenceError(FrameworkError):
    """Raised by the client: the server refused a call, or some rows failed.

    `data` holds the rows that succeeded and `errors` the rows that failed,
    both sorted by id, so a caller can keep the partial answer.
    """

    def __init__(
        self, message: str, *, status: int | None = None, data: list | None = None,
        errors: list | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.data = data or []
        self.errors = errors or []
