"""The built-in synthetic multi-task suite: the embedded default data set (``DataConfig.path = None``).

Eight task families with clearly different input and output formats, so a router has something to tell apart
and a small model on CPU learns each within minutes (responses are a few tokens to one line). Generation is
deterministic: each family draws from its own ``random.Random`` seeded with ``(seed, family)``, and records
are unique within a family (no train/test leakage through duplicates).
"""

from __future__ import annotations

import random
from datetime import date, timedelta
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


def synthetic_suite(per_task: int = 200, seed: int = 0, families: list[str] | None = None) -> list[Record]:
    """``per_task`` unique records for each family (all of :data:`FAMILIES` by default), category = family name.

    Deterministic in (per_task, seed, families): the same arguments give the same records in the same order.
    """
    from mixroute.data.records import DataError

    names = list(FAMILIES) if families is None else list(families)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise DataError(f"unknown synthetic task families {unknown}; available: {', '.join(FAMILIES)}")
    if per_task < 1:
        raise DataError(f"per_task must be >= 1, got {per_task}")
    out: list[Record] = []
    for name in names:
        rng = random.Random(f"mixroute-synthetic-{seed}-{name}")
        seen: set[tuple[str, str]] = set()
        for _ in range(per_task * 50):  # spaces are large; the bound only guards against an endless loop
            if len(seen) == per_task:
                break
            instruction, context, response = FAMILIES[name](rng)
            if (instruction, context) in seen:
                continue
            seen.add((instruction, context))
            out.append(Record(instruction=instruction, context=context, response=response, category=name))
        if len(seen) < per_task:
            raise DataError(f"synthetic family {name!r} cannot produce {per_task} unique records")
    return out
