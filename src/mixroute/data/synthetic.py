"""The built-in synthetic multi-task suites: the embedded default data sets (``DataConfig.path = None``,
``DataConfig.synthetic_suite`` picks one).

``formats`` (:data:`FAMILIES`, the default of ``mixroute train``): eight task families with clearly different
input and output formats, so a router has something to tell apart and a small model on CPU learns each within
minutes (responses are a few tokens to one line).

``conventions`` (:data:`CONVENTIONS`): built as the case a routed mixture exists for. Six tasks share one input
distribution (a date between 1950 and 2049 in ISO form) and one instruction template, ``Date for the <office>
office: 2023-04-07``; only the office, a short marker, says which of six conflicting output conventions applies
(``04/07/2023`` for New York, ``07/04/2023`` for London, ``07.04.2023`` for Berlin, ...). The same input has a
different answer under every task (New York and London agree only when day = month), so one shared adapter
must learn to read the marker and otherwise hedges between conventions, while one adapter per task learns a
single fixed rewrite; a router reading the prompt can tell the tasks apart by the marker. Responses are 10
characters (10 tokens for SmolLM2), prompts about 28 tokens in the plain template. Measured on it (the demo of
2026-12-05), one shared LoRA learned all six without measurable interference: the digit copying they share
carries from one task to another.

``ciphers`` (:data:`CIPHERS`, the demo's suite): the same input under conflicting mappings that share no output.
Four tasks draw the same input (:data:`CIPHER_DIGITS` = 8 digits from the alphabet ``12345``) into one
instruction template, ``Encode with the amber key: 33531122``; the key named in it (the marker) is a fixed
substitution of the five digits (:data:`KEYS`). Every key moves every digit and no two keys map a digit to the
same digit, so each digit goes to each of the four others under one key: the same input has a different answer
under every task at every output token (``12345123`` becomes ``21534215`` with amber, ``43251432`` with birch,
``54123541`` with cedar, ``35412354`` with delta), and an adapter that ignores the marker can do no better than
a uniform guess among four digits. An adapter per task learns one 5-entry table; one adapter shared by the four
must learn all four and tell them apart by the marker. Responses are 8 digits (8 tokens for SmolLM2, one per
digit), prompts 26 tokens in the plain template. Measured at the demo's budgets (docs/training.md, "The demo"),
the shared LoRA still kept ahead of the four separate ones: it learns what the tasks share once and reads the
key.

Generation is deterministic: each task draws from its own ``random.Random`` seeded with ``(seed, task)``, and
records are unique within a task (no train/test leakage through duplicates).
"""

from __future__ import annotations

import random
from datetime import date, timedelta
from functools import partial
from typing import Callable

from mixroute.data.records import Record

_WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "rocket", "garden", "silver", "planet",
          "forest", "candle", "window", "orange", "bridge", "dragon", "marble", "pepper", "violet", "winter",
          "yellow", "falcon", "harbor", "island", "jungle", "kitten", "ladder", "meadow", "needle")
_NAMES = ("Ada", "Alan", "Grace", "Linus", "Marie", "Nikola", "Rosalind", "Tim", "Edsger", "Barbara")
_CITIES = ("Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Perth", "Dublin", "Seoul", "Vienna")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")

Gen = Callable[[random.Random], tuple[str, str, str]]  # rng -> (instruction, context, response)


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice("+-*")
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"Compute {a} {op} {b}.", "", str(value)


def _sort_list(rng: random.Random) -> tuple[str, str, str]:
    nums = rng.sample(range(100), rng.randint(3, 6))
    order = rng.choice(("ascending", "descending"))
    out = sorted(nums, reverse=order == "descending")
    return f"Sort these numbers in {order} order: {', '.join(map(str, nums))}", "", ", ".join(map(str, out))


def _string_transform(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(_WORDS) + rng.choice(_WORDS)[:rng.randint(0, 4)]
    kind = rng.choice(("reverse", "uppercase", "capitalize every other letter of"))
    if kind == "reverse":
        out = word[::-1]
    elif kind == "uppercase":
        out = word.upper()
    else:
        out = "".join(c.upper() if i % 2 == 0 else c for i, c in enumerate(word))
    return f"{kind.capitalize()} the word: {word}", "", out


def _kv_extract(rng: random.Random) -> tuple[str, str, str]:
    record = {"name": rng.choice(_NAMES), "city": rng.choice(_CITIES), "age": str(rng.randint(18, 90)),
              "id": f"{rng.randint(0, 9999):04d}"}
    keys = list(record)
    rng.shuffle(keys)
    key = rng.choice(keys)
    ctx = "; ".join(f"{k}={record[k]}" for k in keys)
    return f"Extract the value of '{key}' from the record.", ctx, record[key]


def _unit_conversion(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.choice(("km", "kg", "h", "m"))
    x = rng.randint(1, 500)
    if kind == "km":
        return f"Convert {x} km to meters.", "", f"{x * 1000} m"
    if kind == "kg":
        return f"Convert {x} kg to grams.", "", f"{x * 1000} g"
    if kind == "h":
        return f"Convert {x} hours to minutes.", "", f"{x * 60} min"
    return f"Convert {x} meters to centimeters.", "", f"{x * 100} cm"


def _date_reformat(rng: random.Random) -> tuple[str, str, str]:
    d = date(1950, 1, 1) + timedelta(days=rng.randint(0, 365 * 100))
    if rng.random() < 0.5:
        return f"Rewrite the date {d.isoformat()} as 'Month D, YYYY'.", "", f"{_MONTHS[d.month - 1]} {d.day}, {d.year}"
    return f"Rewrite the date {_MONTHS[d.month - 1]} {d.day}, {d.year} in ISO format.", "", d.isoformat()


def _word_count(rng: random.Random) -> tuple[str, str, str]:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 12))]
    return "How many words are in the text?", " ".join(words), str(len(words))


def _acronym(rng: random.Random) -> tuple[str, str, str]:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 5))]
    return f"Make an acronym from: {' '.join(words)}", "", "".join(w[0].upper() for w in words)


FAMILIES: dict[str, Gen] = {
    "arithmetic": _arithmetic,
    "list_sort": _sort_list,
    "string_transform": _string_transform,
    "kv_extract": _kv_extract,
    "unit_conversion": _unit_conversion,
    "date_reformat": _date_reformat,
    "word_count": _word_count,
    "acronym": _acronym,
}

# ---- the "conventions" suite: one input distribution, conflicting output conventions per task
OFFICES: dict[str, tuple[str, str]] = {  # task -> (the office the instruction names, that office's date format)
    "new_york": ("New York", "{m}/{d}/{y}"),
    "london": ("London", "{d}/{m}/{y}"),
    "berlin": ("Berlin", "{d}.{m}.{y}"),
    "mumbai": ("Mumbai", "{d}-{m}-{y}"),
    "tokyo": ("Tokyo", "{y}/{m}/{d}"),
    "seoul": ("Seoul", "{y}.{m}.{d}"),
}


def random_date(rng: random.Random) -> date:
    """The input of every conventions task: a uniform day between 1950-01-01 and 2049-12-31."""
    return date(1950, 1, 1) + timedelta(days=rng.randint(0, (date(2049, 12, 31) - date(1950, 1, 1)).days))


def render_convention(task: str, d: date) -> tuple[str, str, str]:
    """(instruction, context, response) of conventions task ``task`` for input date ``d``: the instruction
    names the task's office (the marker) and gives the date in ISO form, the context is empty, the response is
    the date in the office's format."""
    office, style = OFFICES[task]
    return (f"Date for the {office} office: {d.isoformat()}", "",
            style.format(y=f"{d.year:04d}", m=f"{d.month:02d}", d=f"{d.day:02d}"))


def _convention(task: str, rng: random.Random) -> tuple[str, str, str]:
    return render_convention(task, random_date(rng))


CONVENTIONS: dict[str, Gen] = {task: partial(_convention, task) for task in OFFICES}

# ---- the "ciphers" suite: one input distribution, a different substitution of the same symbols per task
CIPHER_SYMBOLS = "12345"
KEYS: dict[str, str] = {  # task (= the key the instruction names) -> its table: CIPHER_SYMBOLS[i] becomes key[i]
    "amber": "21534",
    "birch": "43251",
    "cedar": "54123",
    "delta": "35412",
}
CIPHER_DIGITS = 8


def random_digits(rng: random.Random) -> str:
    """The input of every ciphers task: :data:`CIPHER_DIGITS` symbols drawn uniformly from :data:`CIPHER_SYMBOLS`."""
    return "".join(rng.choice(CIPHER_SYMBOLS) for _ in range(CIPHER_DIGITS))


def render_cipher(task: str, digits: str) -> tuple[str, str, str]:
    """(instruction, context, response) of ciphers task ``task`` for input ``digits``: the instruction names the
    task's key (the marker) and gives the digits, the context is empty, the response is every digit substituted
    by the key."""
    key = KEYS[task]
    return f"Encode with the {task} key: {digits}", "", "".join(key[CIPHER_SYMBOLS.index(c)] for c in digits)


def _cipher(task: str, rng: random.Random) -> tuple[str, str, str]:
    return render_cipher(task, random_digits(rng))


CIPHERS: dict[str, Gen] = {task: partial(_cipher, task) for task in KEYS}
SUITES: dict[str, dict[str, Gen]] = {"formats": FAMILIES, "conventions": CONVENTIONS, "ciphers": CIPHERS}


def synthetic_suite(per_task: int = 200, seed: int = 0, families: list[str] | None = None,
                    suite: str = "formats") -> list[Record]:
    """``per_task`` unique records for each family of ``suite`` (a key of :data:`SUITES`; all its families by
    default), category = family name.

    Deterministic in (per_task, seed, families, suite): the same arguments give the same records in the same
    order.
    """
    from mixroute.data.records import DataError

    if suite not in SUITES:
        raise DataError(f"unknown synthetic suite {suite!r}; available: {', '.join(SUITES)}")
    gens = SUITES[suite]
    names = list(gens) if families is None else list(families)
    unknown = [n for n in names if n not in gens]
    if unknown:
        raise DataError(f"unknown synthetic task families {unknown} (suite {suite!r}); available: "
                        f"{', '.join(gens)}")
    if per_task < 1:
        raise DataError(f"per_task must be >= 1, got {per_task}")
    out: list[Record] = []
    for name in names:
        rng = random.Random(f"mixroute-synthetic-{seed}-{name}")
        seen: set[tuple[str, str]] = set()
        for _ in range(per_task * 50):  # spaces are large; the bound only guards against an endless loop
            if len(seen) == per_task:
                break
            instruction, context, response = gens[name](rng)
            if (instruction, context) in seen:
                continue
            seen.add((instruction, context))
            out.append(Record(instruction=instruction, context=context, response=response, category=name))
        if len(seen) < per_task:
            raise DataError(f"synthetic family {name!r} cannot produce {per_task} unique records")
    return out
