"""The exception tree: one root for the project, one branch per subsystem."""


class TaskvisorError(Exception):
    """Root of every error taskvisor raises on purpose."""


class ConfigError(TaskvisorError):
    """The configuration file or an option is invalid; the message names the key and value."""


class InvalidEntry(TaskvisorError):
    """A stream entry breaks the producer contract; the message is the dead-letter reason."""


class StoreError(TaskvisorError):
    """The SQL store could not be opened, initialised or written."""


class DriverError(TaskvisorError):
    """A driver could not be loaded or configured."""


class TaskFailed(TaskvisorError):
    """Raised by a driver to end a task as `failed` with this message.

    `retry=False` says that trying again cannot help (bad input, a missing instance), so
    the task fails at once even when the provider allows automatic retries.
    """

    def __init__(self, message: str, result: dict | None = None, retry: bool = True) -> None:
        super().__init__(message)
        self.result = result
        self.retry = retry


class TaskNotFound(TaskvisorError):
    """No task with this id exists in Redis or in the SQL store."""
