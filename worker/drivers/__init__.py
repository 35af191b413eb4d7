"""Driver loading: turns a provider's `driver` settings into a Driver instance."""

import importlib

from shared.errors import DriverError
from shared.settings import DriverConfig
from worker.drivers.base import Driver
from worker.drivers.command import CommandDriver
from worker.drivers.docker import DockerDriver, DockerOptionsError


def load_driver(provider: str, config: DriverConfig, base_dir: str) -> Driver:
    """Create the driver for `provider` from its `driver` settings.

    `type: command` gives a CommandDriver, which resolves `workdir` against `base_dir`.
    `type: docker` gives a DockerDriver for the Docker Engine API endpoint in `options`.
    `type: module:Class` imports the module and constructs `Class(provider, options)`,
    where the class must subclass Driver. Every failure raises DriverError naming the
    provider, the `type` value and the cause.
    """
    if config.type == "command":
        return CommandDriver(provider, config, base_dir)
    if config.type == "docker":
        try:
            return DockerDriver(provider, config.options)
        except DockerOptionsError as exc:
            location = f"providers.{provider}.driver.options"
            raise DriverError(f"provider {provider}: driver docker: {exc.describe(location)}") from None

    driver_class = import_driver_class(provider, config.type)
    try:
        return driver_class(provider, config.options)
    except Exception as exc:
        raise DriverError(f"provider {provider}: driver {config.type} raised in its constructor: {exc!r}") from exc


def import_driver_class(provider: str, type_value: str) -> type[Driver]:
    """Import the class named by a `module:Class` value and check that it subclasses Driver."""
    module_name, separator, class_name = type_value.partition(":")
    if not separator or not module_name or not class_name:
        raise DriverError(
            f"provider {provider}: invalid driver type {type_value!r}: "
            f"expected 'command' or a Python class as 'module:Class' (or 'docker')"
        )

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        message = f"provider {provider}: driver {type_value}: module not found: {exc}. Check the module name and sys.path"
        raise DriverError(message) from exc
    except Exception as exc:
        raise DriverError(f"provider {provider}: driver {type_value}: importing {module_name} failed: {exc!r}") from exc

    driver_class = getattr(module, class_name, None)
    if driver_class is None:
        raise DriverError(f"provider {provider}: driver {type_value}: module {module_name} has no class {class_name}")
    if not isinstance(driver_class, type) or not issubclass(driver_class, Driver):
        raise DriverError(
            f"provider {provider}: driver {type_value}: {class_name} is not a subclass of worker.drivers.base.Driver"
        )
    return driver_class
