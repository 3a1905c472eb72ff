"""The two national classifications enterprises and platforms are grouped by, read from the
data files shipped in registry/data (their sources are noted in each file):

- industries: GB/T 4754-2017 (with its 2019 amendment), sections (门类, a letter) and divisions
  (大类, two digits);
- regions: GB/T 2260 administrative divisions at province (xx0000) and prefecture (xxxx00)
  level; a county-level code (xxxxxx) is named by its prefecture and province.
"""

import csv
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Final

from registry.errors import Invalid

NATIONAL: Final = "000000"
_INDUSTRY_INPUT = re.compile(r"([A-T])?([0-9]{2})?[0-9]{0,2}")


@dataclass(frozen=True, slots=True)
class Industry:
    code: str  # a section letter or a two-digit division
    level: str  # "section" or "division"
    section: str
    industrial: bool
    name: str


@dataclass(frozen=True, slots=True)
class Region:
    code: str
    level: str  # "province" or "prefecture"
    name: str


def _rows(file: str) -> list[dict[str, str]]:
    text = resources.files("registry").joinpath("data", file).read_text(encoding="utf-8")
    return list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))


@cache
def industries() -> dict[str, Industry]:
    return {
        r["code"]: Industry(r["code"], r["level"], r["section"], r["industrial"] == "1", r["name"])
        for r in _rows("gbt4754.csv")
    }


@cache
def regions() -> dict[str, Region]:
    return {r["code"]: Region(r["code"], r["level"], r["name"]) for r in _rows("gbt2260.csv")}


def division(text: str) -> Industry:
    """The division named by `36`, `C36` or a finer class (`C3670`, `3670`); Invalid otherwise."""
    match = _INDUSTRY_INPUT.fullmatch(text.strip().upper())
    found = industries().get(match.group(2)) if match and match.group(2) else None
    if found is None or (match and match.group(1) and match.group(1) != found.section):
        raise Invalid(
            f"industry {text!r} is not a GB/T 4754-2017 division: give its two digits, "
            "optionally after its section letter (C36) or followed by the class (3670)"
        )
    return found


def industry_name(code: str) -> str | None:
    found = industries().get(code)
    return found.name if found else None


def section_of(code: str) -> str | None:
    found = industries().get(code)
    return found.section if found else None


def province_of(region: str) -> str:
    return region[:2] + "0000"


def prefecture_of(region: str) -> str:
    return region[:4] + "00"


def region_name(code: str) -> str | None:
    """The name of a province or prefecture code (or of a county code's prefecture)."""
    if code == NATIONAL:
        return "全国"
    table = regions()
    found = table.get(code) or table.get(prefecture_of(code))
    return found.name if found else None


def province_name(region: str) -> str | None:
    found = regions().get(province_of(region))
    return found.name if found else None


def prefecture_name(region: str) -> str | None:
    if region.endswith("0000"):
        return None
    found = regions().get(prefecture_of(region))
    return found.name if found else None


def check_region(code: str, *, what: str = "region") -> str:
    """A GB/T 2260 code whose province is known; Invalid otherwise (a prefecture or county
    unknown to the shipped list is accepted: codes of divisions merged since stay valid in
    credit codes issued before)."""
    if not re.fullmatch(r"[0-9]{6}", code) or province_of(code) not in regions():
        raise Invalid(f"{what} {code!r} is not a GB/T 2260 code of a known province")
    return code
