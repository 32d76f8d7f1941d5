"""Errors raised on bad user input; each message names the file, column or key."""


class RecDistError(ValueError):
    """Base class of every user-facing input error in rec_dist."""


class SchemaError(RecDistError):
    """The schema YAML is malformed or names something that does not exist."""


class DataError(RecDistError):
    """A data file does not match its schema (missing column, bad dtype, bad id or label)."""


class ConfigError(RecDistError):
    """A config (model, task or data knob) names something that does not exist or does not fit together."""
