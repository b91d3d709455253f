"""User-facing errors: caught at the CLI and printed as one line."""


class FacegenError(Exception):
    """Base for errors the user can fix; the message is the whole story."""


class ConfigError(FacegenError):
    """A config key, value or path is wrong. Message starts with the dotted key."""


class DataError(FacegenError):
    """Shards, manifests or images are missing or unreadable."""
