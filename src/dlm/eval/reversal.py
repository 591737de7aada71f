"""The reversal curse as a test: synthetic facts with prior-free names, some seen in one direction only.

A fact relates two invented names by a relation with an inverse ("Vomaru's teacher is Kelidan." / "Kelidan's
student is Vomaru."). Names are random syllable strings (seeded), each used by one fact only, so no model knows
anything about them beforehand. The split (Berglund et al. 2023, "The Reversal Curse"; LLaDA, Nie et al. 2025,
section 4.3, tests it on poems):
- `both` facts: both statements are in the training text; they teach that every relation has an inverse;
- `test` facts: only one statement (the `seen` direction, forward or inverse, balanced) is in the training text.
At test time a `test` fact is asked in its seen direction (memory) and in the other (reversal): the prompt is the
statement up to the answer name ("Kelidan's student is"), the answer the name (" Vomaru").
Upstream of the poem test: ML-GSAI/LLaDA `eval_reverse.py` (greedy generation, the answer must appear).

    facts = make_facts(n_both=200, n_test=100, seed=0)
    text = training_text(facts, repeats=1, seed=0)        # lines, shuffled; the unseen statements are absent
    for q in questions(facts): q.prompt, q.answer, q.direction  # "seen" / "reversed"
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

# (relation, its inverse): "A's teacher is B" <-> "B's student is A".
RELATIONS: list[tuple[str, str]] = [
    ("teacher", "student"),
    ("parent", "child"),
    ("employer", "employee"),
    ("doctor", "patient"),
    ("landlord", "tenant"),
    ("coach", "trainee"),
]
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"


def make_names(n: int, rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> list[str]:
    """n distinct capitalised names of 2-3 consonant-vowel syllables, one ending in a consonant half the time."""
    names: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        k = rng.randint(*syllables)
        name = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(k))
        if rng.random() < 0.5:
            name += rng.choice(CONSONANTS)
        name = name.capitalize()
        if name not in names:
            names.add(name)
            out.append(name)
    return out


@dataclass(frozen=True)
class Fact:
    a: str  # "A's <relation> is B"
    relation: str
    inverse: str
    b: str  # "B's <inverse> is A"
    split: Literal["both", "test"]
    seen: Literal["forward", "inverse", "both"]  # which statement the training text holds

    def statement(self, direction: Literal["forward", "inverse"]) -> str:
        if direction == "forward":
            return f"{self.a}'s {self.relation} is {self.b}."
        return f"{self.b}'s {self.inverse} is {self.a}."

    def training_statements(self) -> list[str]:
        if self.seen == "both":
            return [self.statement("forward"), self.statement("inverse")]
        return [self.statement(self.seen)]


@dataclass(frozen=True)
class Question:
    prompt: str  # "Kelidan's student is"
    answer: str  # " Vomaru" (the name, with its leading space; the statement ends with ".")
    direction: Literal["seen", "reversed"]
    fact: Fact


def make_facts(n_both: int = 200, n_test: int = 100, seed: int = 0) -> list[Fact]:
    """n_both facts seen in both directions, then n_test seen in one (forward and inverse alternate); every name
    occurs in exactly one fact; relations cycle so each appears about equally often in each split."""
    rng = random.Random(seed)
    names = make_names(2 * (n_both + n_test), rng)
    facts = []
    for i in range(n_both + n_test):
        rel, inv = RELATIONS[i % len(RELATIONS)]
        test = i >= n_both
        seen = ("forward" if (i - n_both) % 2 == 0 else "inverse") if test else "both"
        facts.append(Fact(names[2 * i], rel, inv, names[2 * i + 1], "test" if test else "both", seen))
    return facts


def training_text(facts: list[Fact], repeats: int = 1, seed: int = 0) -> str:
    """Every training statement `repeats` times, one per line, in a seeded random order (a different shuffle
    per repeat). A `test` fact's unseen statement never appears."""
    rng = random.Random(seed)
    lines = []
    for _ in range(repeats):
        block = [s for f in facts for s in f.training_statements()]
        rng.shuffle(block)
        lines += block
    return "\n".join(lines) + "\n"


def _ask(fact: Fact, direction: Literal["forward", "inverse"], kind: Literal["seen", "reversed"]) -> Question:
    stem, _, _ = fact.statement(direction).rpartition(" ")
    answer = fact.b if direction == "forward" else fact.a
    return Question(stem, " " + answer, kind, fact)


def questions(facts: list[Fact]) -> list[Question]:
    """Two questions per `test` fact: its seen direction and the reversed one (never in the training text)."""
    out = []
    for f in facts:
        if f.split != "test":
            continue
        other = "inverse" if f.seen == "forward" else "forward"
        out += [_ask(f, f.seen, "seen"), _ask(f, other, "reversed")]
    return out


def answer_of(completion: str) -> str:
    """The name a completion gives: its text up to the first '.' or line break, stripped."""
    return completion.split("\n")[0].split(".")[0].strip()
