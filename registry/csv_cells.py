"""Text cells of the CSV exports, made safe to open in a spreadsheet.

Metric names come from devices: a name such as `=HYPERLINK(...)` would be a formula in a
spreadsheet. OWASP's rule for CSV injection: a text cell starting with `=`, `+`, `-`, `@`, a
tab or a carriage return gets a leading `'`, which spreadsheets show as text. Numbers are
written as numbers and never pass through here, so negative values stay numeric.
"""

from typing import Final

FORMULA_STARTS: Final = ("=", "+", "-", "@", "\t", "\r")


def text_cell(value: str) -> str:
    return "'" + value if value.startswith(FORMULA_STARTS) else value
