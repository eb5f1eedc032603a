"""What a quality section says, as data: each finding is a dataclass computed from the numbers, and its ``text()``
is the one way it is put in words. Tests check the findings (orders, intervals, flags), not sentences."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from protocol import verdict

NEAR_ALL, FAR_FROM_ALL = 0.95, 0.9   # router / classifier accuracy "near 100%" / "not near 100%"


@dataclass
class Comparison:
    """(PPL_a - PPL_b) / PPL_b in percent with its paired-bootstrap 95% interval."""

    a: str
    b: str
    point: float
    lo: float
    hi: float

    @property
    def verdict(self) -> str:
        return verdict(self.lo, self.hi, self.a, self.b)

    def text(self) -> str:
        return f"{self.a} vs {self.b}: {self.point:+.1f}% [{self.lo:+.1f}, {self.hi:+.1f}], {self.verdict}."


@dataclass
class Ranking:
    """Mean average test perplexity of every method, best first."""

    ppl: dict[str, float]

    @property
    def order(self) -> list[str]:
        return sorted(self.ppl, key=self.ppl.get)

    def text(self) -> str:
        return ("Mean average test perplexity, best first: "
                + " < ".join(f"{m} {self.ppl[m]:.3f}" for m in self.order) + ".")


@dataclass
class PaperOrder:
    """The MoA paper's order of moa, lora_mixed and lora_single against ours, with the pairwise intervals."""

    ppl: dict[str, float]
    comparisons: list[Comparison] = field(default_factory=list)
    paper: tuple[str, ...] = ("moa", "lora_mixed", "lora_single")

    @property
    def order(self) -> list[str]:
        return sorted(self.ppl, key=self.ppl.get)

    @property
    def matches_paper(self) -> bool:
        return tuple(self.order) == self.paper

    def text(self) -> str:
        return (f"MoA's paper: {' < '.join(self.paper)}. Here, by the means: {' < '.join(self.order)}"
                + (" (the paper's order)." if self.matches_paper else " (not the paper's order).")
                + "".join(" " + c.text() for c in self.comparisons))


@dataclass
class MetricOrder:
    """A generation metric (higher is better) of several methods, its largest gap against the seeds' spread."""

    name: str
    values: dict[str, float]
    spread: Optional[float]   # the largest standard deviation over seeds; None with one seed

    @property
    def gap(self) -> float:
        return max(self.values.values()) - min(self.values.values())

    @property
    def within_noise(self) -> Optional[bool]:
        return None if self.spread is None else self.gap < self.spread

    def text(self) -> str:
        order = " > ".join(sorted(self.values, key=self.values.get, reverse=True))
        line = (f"{self.name} (higher is better), by the means: {order} ("
                + ", ".join(f"{m} {v:.2f}" for m, v in self.values.items()) + ")")
        if self.gap == 0:
            return line + ": a tie."
        if self.spread is None:
            return line + "; one seed, so no spread to compare the gaps with."
        return (line + f"; the largest gap, {self.gap:.2f}, is " + ("smaller" if self.within_noise else "larger")
                + f" than the largest standard deviation over seeds ({self.spread:.2f})"
                + (", so the order is within noise." if self.within_noise else "."))


@dataclass
class MoEPlacement:
    """Where the token-level mixtures land against moa and lora_mixed (the paper: at or above MoA)."""

    ppl: dict[str, float]       # moe methods
    moa: float
    lora_mixed: float
    comparisons: list[Comparison] = field(default_factory=list)

    def place(self, m: str) -> str:
        lo, hi = sorted((self.moa, self.lora_mixed))
        v = self.ppl[m]
        return ("between moa and lora_mixed" if lo <= v <= hi else
                "below both moa and lora_mixed" if v < lo else "above both moa and lora_mixed")

    def text(self) -> str:
        return ("MoA's paper puts MoE-LoRA (3.8578) and the naive mixture (3.7969) at or above MoA (3.7987). Here: "
                + ", ".join(f"{m} {v:.3f} ({self.place(m)})" for m, v in self.ppl.items()) + "."
                + "".join(" " + c.text() for c in self.comparisons))


@dataclass
class RouterVsClassifier:
    """MoA's router against the classifier on the same frozen-base features, pooled over seeds."""

    seeds: int
    n: int
    router: tuple[float, float, float]       # accuracy, 95% interval
    classifier: tuple[float, float, float]

    @property
    def at_least_as_accurate(self) -> bool:
        return self.router[0] >= self.classifier[0]

    @property
    def overlap(self) -> bool:
        return self.router[1] <= self.classifier[2] and self.classifier[1] <= self.router[2]

    @property
    def both_near_all(self) -> bool:
        return min(self.router[0], self.classifier[0]) >= NEAR_ALL

    @property
    def neither_near_all(self) -> bool:
        return max(self.router[0], self.classifier[0]) < FAR_FROM_ALL

    def text(self) -> str:
        pct = lambda t: f"{100 * t[0]:.1f}% [{100 * t[1]:.1f}, {100 * t[2]:.1f}]"  # noqa: E731
        rel = "at least as accurate as" if self.at_least_as_accurate else "less accurate than"
        return (f"Router vs classifier (MoA's paper: 99.90% vs 99.67%, on par): pooled over {self.seeds} seed(s) "
                f"and {self.n} test examples the router picks the example's own category's expert "
                f"{pct(self.router)} of the time, the classifier {pct(self.classifier)}: the router is {rel} the "
                "classifier" + (", the intervals overlap." if self.overlap else ", and the intervals do not overlap.")
                + (" Both are near 100%: the categories are separable from the prompt." if self.both_near_all
                   else " Neither is near 100%: the categories are not fully separable from the prompt's pooled "
                        "hidden states." if self.neither_near_all else ""))


@dataclass
class KeptStart:
    """Seeds whose MoA stage 2 never beat its own start (early stopping returned the start)."""

    seeds: list[int]
    of: int

    def text(self) -> str:
        return (f"In {len(self.seeds)} of {self.of} seed(s) MoA's stage 2 never beat its own start on validation, so "
                "early stopping returned its start (the stage-1 LoRAs with the routers as pre-trained, or as "
                "initialised where pre-training was off): that moa row is not a result of stage 2.")


@dataclass
class Labelled:
    """One comparison under its paper's claim (MoP vs prompt tuning: MoP lower)."""

    claim: str
    comparison: Comparison

    def text(self) -> str:
        c = self.comparison
        return f"{self.claim}: {c.point:+.1f}% [{c.lo:+.1f}, {c.hi:+.1f}], {c.verdict}."


@dataclass
class MethodList:
    """Methods that share a property the reader must know (above the untrained base, still improving at the
    cap), under the sentence that says which."""

    kind: str            # "above_base" | "at_cap"
    methods: list[str]

    def text(self) -> str:
        if self.kind == "above_base":
            return "Above the untrained base model's perplexity: " + ", ".join(self.methods) + "."
        return ("Still improving at the cap (best weights = the last step) in at least one seed or stage-1 LoRA: "
                + ", ".join(self.methods) + "; their numbers are a lower bound on what more epochs give.")


def render(findings: list) -> list[str]:
    """The findings as the section's bullet list."""
    return ["- " + f.text() for f in findings]


# ------------------------------------------------------------------ MoP on pruned bases
@dataclass
class SettingComparisons:
    """MoP vs prompt tuning on each base (pooled over seeds), against the paper's claim."""

    claim: str
    by_setting: dict[str, Comparison]
    per_seed: dict[str, list[float]]

    @property
    def below(self) -> list[str]:
        return [s for s, c in self.by_setting.items() if c.hi < 0]

    @property
    def above(self) -> list[str]:
        return [s for s, c in self.by_setting.items() if c.lo > 0]

    def text(self) -> str:
        n, below, above = len(self.by_setting), self.below, self.above
        return (f"{self.claim} Here MoP is below prompt tuning with a 95% interval excluding 0 in {len(below)} of "
                f"{n} setting(s)" + (f" ({', '.join(below)})" if below else "") + f", above it in {len(above)}"
                + (f" ({', '.join(above)})" if above else "") + f", and within noise in {n - len(below) - len(above)}: "
                + "; ".join(f"{s} {c.point:+.1f}% [{c.lo:+.1f}, {c.hi:+.1f}], per seed "
                            + ", ".join(f"{x:+.1f}%" for x in self.per_seed[s]) for s, c in self.by_setting.items())
                + ".")


@dataclass
class SparsityTrend:
    """MoP vs prompt tuning (percent) along increasing sparsity: does MoP's advantage grow, as the paper says?"""

    ladder: list[tuple[float, float]]   # (sparsity, difference in percent), increasing sparsity

    @property
    def grows(self) -> bool:
        return all(later < earlier for (_, earlier), (_, later) in zip(self.ladder, self.ladder[1:]))

    @property
    def ahead(self) -> int:
        return sum(d < 0 for _, d in self.ladder)

    def text(self) -> str:
        if not self.grows:
            trend = "not monotone in MoP's favour, so the paper's 'more at higher pruning' does not hold here."
        elif self.ahead == len(self.ladder):
            trend = "MoP's relative advantage grows with sparsity, the paper's trend."
        else:
            trend = ("the difference moves in MoP's favour as sparsity grows (the paper's trend), but by the means "
                     f"MoP is below prompt tuning at {self.ahead} of these {len(self.ladder)} sparsities.")
        return ("Against sparsity (unstructured): MoP vs PT goes "
                + " -> ".join(f"{d:+.1f}% at {sp * 100:g}%" for sp, d in self.ladder) + ": " + trend)


@dataclass
class ReusedRates:
    """Learning rates chosen on one base's validation split and reused on others."""

    chosen_on: str
    reused_for: list[str]

    def text(self) -> str:
        return (f"The learning rates were chosen on {self.chosen_on}'s validation split and reused for "
                + ", ".join(self.reused_for) + ": there both methods run at rates tuned for another base, so those "
                "comparisons may favour whichever method's best rate moves less with sparsity.")


@dataclass
class GateEvidence:
    """Where MoP does not beat prompt tuning: what its gate and size measured (first seed)."""

    setting: str
    accuracy: float
    merged: list[tuple[str, str, float]]   # (category, the other category whose expert takes most of it, share)
    trainable: int
    gate: Optional[int]
    prompt_tuning: int

    def text(self) -> str:
        merged = "; ".join(f"{c} -> {o}'s expert {100 * share:.0f}%" for c, o, share in self.merged)
        return (f"What the runs show about why ({self.setting}, first seed): MoP's gate, pre-trained to send category "
                f"i to expert i, sends {100 * self.accuracy:.1f}% of test examples to their category's expert after "
                "training" + (f" and sends most of some categories to another category's expert ({merged}), so "
                              "fewer experts specialise than there are categories" if self.merged else "")
                + f"; MoP trains {self.trainable:,} parameters" + (f" ({self.gate:,} in its gate)" if self.gate else "")
                + f" against prompt tuning's {self.prompt_tuning:,} on the same train examples.")


@dataclass
class AgainstBase:
    """One base model's untrained perplexity against its best trained method, and the methods above it."""

    setting: str
    base: float
    best: str
    best_ppl: float
    above: list[str]

    def text(self) -> str:
        return (f"{self.setting}: base {self.base:.2f}; best {self.best} {self.best_ppl:.2f} "
                f"({100 * (self.best_ppl - self.base) / self.base:+.1f}%)"
                + ("; " + ", ".join(f"{m} is above the base" for m in self.above) if self.above else "") + ".")


@dataclass
class AtCap:
    """Runs whose best weights were their last step: a lower bound on what more epochs give."""

    runs: list[str]

    def text(self) -> str:
        return ("Still improving at the cap in at least one seed: " + ", ".join(self.runs)
                + "; more epochs would lower these.")


# ------------------------------------------------------------------ federated
@dataclass
class FederatedVsCentral:
    """One method against its reference on one base, federated and central (the MoP paper: the federated gap
    is larger than the central one)."""

    setting: str
    federated: Optional[Comparison]
    central: Optional[Comparison]

    @property
    def larger_federated(self) -> Optional[bool]:
        """Whether the method's advantage (a more negative difference) is larger federated than central."""
        if self.federated is None or self.central is None:
            return None
        return self.federated.point < self.central.point

    def text(self) -> str:
        parts = [f"{where} {c.point:+.1f}% [{c.lo:+.1f}, {c.hi:+.1f}] ({c.verdict})"
                 for where, c in (("federated", self.federated), ("central", self.central)) if c is not None]
        c = self.federated or self.central
        line = f"{self.setting}, {c.a} vs {c.b}: " + "; ".join(parts)
        if self.larger_federated is None:
            return line + "."
        noisy = " by the point estimates (an interval contains 0)" if any(
            c.lo <= 0 <= c.hi for c in (self.federated, self.central)) else ""
        return line + (f"; the advantage is larger federated{noisy}, the paper's direction." if self.larger_federated
                       else f"; the advantage is not larger federated{noisy}, against the paper's direction.")


@dataclass
class GapVsSparsity:
    """A method's difference to its reference along increasing sparsity (0 = dense), federated or central."""

    method: str
    where: str
    ladder: list[tuple[float, float]]

    @property
    def grows(self) -> bool:
        """The advantage grows (the difference falls) at every step up in sparsity."""
        return all(later < earlier for (_, earlier), (_, later) in zip(self.ladder, self.ladder[1:]))

    def text(self) -> str:
        return (f"{self.method} against sparsity, {self.where}: "
                + " -> ".join(f"{d:+.1f}% at {100 * sp:g}%" for sp, d in self.ladder) + ": "
                + ("the advantage grows with sparsity, the paper's trend." if self.grows
                   else "not monotone in its favour, so 'more at higher pruning' does not hold here."))
