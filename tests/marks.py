"""The slices of the test matrices that ``make test-fast`` keeps: one case per expert kind and routing level, the
Llama and GPT-2 (Conv1D) families. The other cases are marked ``slow``; ``make test`` runs them all."""

from __future__ import annotations

from typing import Iterable

import pytest

FAST_CASES = {"lora-task", "lora-token_topk", "lora-poly", "dora-task", "prompt-gate"}
FAST_FAMILIES = {"llama", "gpt2"}


def fast_only(values: Iterable, fast: set) -> list:
    """``values`` as pytest parameters, those outside ``fast`` marked slow."""
    return [v if v in fast else pytest.param(v, marks=pytest.mark.slow) for v in values]
