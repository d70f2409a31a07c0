"""Errors that tell the user what to change."""


class VLMConfigError(ValueError):
    """A configuration, input or environment problem; the message says what to change."""


class MissingBatchField(VLMConfigError, KeyError):
    """A batch lacks a field that an objective or model needs."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MissingCapability(VLMConfigError):
    """A model lacks a capability (method) that an objective needs."""


class OfflineHubError(VLMConfigError):
    """A hub name was given while the hub is unreachable or disabled."""
