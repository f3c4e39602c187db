"""Errors a user can fix. The CLI prints their message as one line and exits with code 2."""


class DemixError(Exception):
    """Bad input: the message names what is wrong, where, and how to fix it."""

    exit_code = 2


class ConfigError(DemixError):
    """A run config that does not validate."""


class DataError(DemixError):
    """A dataset path, file or record that cannot be used."""


class MixtureError(DemixError):
    """Mixture weights that are not a point of the simplex over the known datasets."""


class ModelError(DemixError):
    """A model folder that cannot be loaded safely or does not match the others."""


class TaskError(DemixError):
    """An evaluation task that does not exist or has no documents."""


class FetchError(DemixError):
    """Demo data that cannot be fetched from the package registries."""


class SearchError(DemixError):
    """A scores table that cannot be read or belongs to another search, or nothing to select."""
