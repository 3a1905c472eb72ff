"""What registry operations refuse, and why. The API maps each to one HTTP status, in one place.

RegistryError
├── NotFound   the platform or device does not exist (or is not visible to the caller)
├── Conflict   it exists already, or the change contradicts the current state
└── Invalid    the request itself is wrong (unknown field values, limits)
"""


class RegistryError(Exception):
    """Base class: refuse the request; retrying it unchanged gives the same answer."""


class NotFound(RegistryError):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what} does not exist")


class Conflict(RegistryError):
    pass


class Invalid(RegistryError):
    pass
