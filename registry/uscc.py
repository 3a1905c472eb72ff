"""The Unified Social Credit Code (统一社会信用代码, GB 32100-2015): parsing and validation.

An 18-character code: the registration authority (1), the kind of organization (1), the
administrative division of the registering office (6, GB/T 2260), the organization's own
identifier (9, an organization code of GB 11714 with its own check character) and the check
character (1). The alphabet has 31 characters: digits and upper-case letters without I, O, S,
V and Z. Position i (from 0) weighs 3**i mod 31; the check character brings the weighted sum
to a multiple of 31.
"""

from dataclasses import dataclass
from typing import Final

from registry.errors import Invalid

ALPHABET: Final = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_VALUE: Final = {c: i for i, c in enumerate(ALPHABET)}
_WEIGHTS: Final = tuple(pow(3, i, 31) for i in range(17))
# GB 11714's organization code: digits and letters A-Z valued 10-35, weights per position.
_ORG_WEIGHTS: Final = (3, 7, 9, 10, 5, 8, 4, 2)
# Enterprises are registered by market regulation (authority 9) as enterprises (kind 1); the
# other kinds of that authority (2 individual businesses, 3 farmers' cooperatives) and the other
# authorities (government bodies, public institutions, social organizations) are not enterprises.
ENTERPRISE_PREFIX: Final = "91"


@dataclass(frozen=True, slots=True)
class Uscc:
    code: str

    @property
    def division(self) -> str:
        """Characters 3-8: the administrative division of the registering office."""
        return self.code[2:8]

    @property
    def organization(self) -> str:
        return self.code[8:17]


def check_character(first17: str) -> str:
    """The check character of the first 17 characters (all from ALPHABET)."""
    total = sum(_VALUE[c] * w for c, w in zip(first17, _WEIGHTS, strict=True))
    return ALPHABET[(31 - total % 31) % 31]


def organization_check(first8: str) -> str:
    """GB 11714's check character of an organization code's first 8 characters."""
    total = sum(int(c, 36) * w for c, w in zip(first8, _ORG_WEIGHTS, strict=True))
    value = (11 - total % 11) % 11
    return "X" if value == 10 else str(value)


def parse(text: str) -> Uscc:
    """The code of an enterprise, or Invalid naming what is wrong with it."""
    code = text.strip().upper()
    if len(code) != 18:
        raise Invalid(f"a unified social credit code has 18 characters, not {len(code)}")
    bad = sorted({c for c in code if c not in _VALUE})
    if bad:
        raise Invalid(
            f"characters {''.join(bad)!r} are not used in unified social credit codes "
            "(digits and upper-case letters without I, O, S, V, Z)"
        )
    expected = check_character(code[:17])
    if code[17] != expected:
        raise Invalid(
            f"check character {code[17]!r} does not match the code (expected {expected!r}): "
            "a character was mistyped"
        )
    if not code[2:8].isdigit():
        raise Invalid(f"characters 3-8 {code[2:8]!r} are not an administrative division code")
    organization = code[8:17]
    if not organization[:8].isalnum() or organization_check(organization[:8]) != organization[8]:
        raise Invalid(
            f"characters 9-17 {organization!r} are not a valid organization code (GB 11714 "
            "check character)"
        )
    if code[:2] != ENTERPRISE_PREFIX:
        raise Invalid(
            f"the code begins {code[:2]!r}, not {ENTERPRISE_PREFIX!r}: it identifies a "
            "registrant other than an enterprise registered by market regulation"
        )
    return Uscc(code)


def compose(division: str, organization: str) -> str:
    """An enterprise's code from its division (6 digits) and the first 8 characters of its
    organization code, with both check characters (for simulations and tests)."""
    first17 = ENTERPRISE_PREFIX + division + organization + organization_check(organization)
    return first17 + check_character(first17)
