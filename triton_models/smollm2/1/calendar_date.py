"""A GBNF rule for calendar dates (no llama.cpp import: the unit tests read it)."""

# The converter's `date` admits any day 01-31 in any month (2023-02-31) and the year 0000. This one admits the
# dates Python's date.fromisoformat (and so jsonschema's format check) accepts: years 0001-9999, 30-day months
# end at 30, February at 28, and at 29 in leap years (every 4th year, centuries only every 4th century).
_YEAR = '([1-9] [0-9] [0-9] [0-9] | "0" [1-9] [0-9] [0-9] | "00" [1-9] [0-9] | "000" [1-9])'
_LEAP_YEAR = '([0-9] [0-9] ("0" [48] | [2468] [048] | [13579] [26]) | ("0" [48] | [2468] [048] | [13579] [26]) "00")'
CALENDAR_DATE = (
    f'date ::= {_YEAR} "-" (("0" [13578] | "1" [02]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])'
    ' | ("0" [469] | "11") "-" ("0" [1-9] | [12] [0-9] | "30")'
    ' | "02-" ("0" [1-9] | "1" [0-9] | "2" [0-8]))'
    f' | {_LEAP_YEAR} "-02-29"'
)
