"""The reversal-curse fact sets (dlm/eval/reversal.py): names carry no overlap, the splits are disjoint as specified,
and the reversed questions were never in the training text."""

from __future__ import annotations

from collections import Counter

from dlm.eval.reversal import RELATIONS, answer_of, make_facts, questions, training_text


def test_names_are_unique_and_each_in_one_fact():
    facts = make_facts(60, 30, seed=1)
    names = [n for f in facts for n in (f.a, f.b)]
    assert len(names) == len(set(names)) == 180
    assert all(n.isalpha() and n[0].isupper() for n in names)


def test_seeded():
    assert make_facts(10, 10, seed=3) == make_facts(10, 10, seed=3)
    assert make_facts(10, 10, seed=3) != make_facts(10, 10, seed=4)


def test_splits_are_disjoint_as_specified():
    facts = make_facts(60, 30, seed=0)
    both = [f for f in facts if f.split == "both"]
    test = [f for f in facts if f.split == "test"]
    assert len(both) == 60 and len(test) == 30
    assert not {f.a for f in both} & {f.a for f in test} and not {f.b for f in both} & {f.b for f in test}
    lines = training_text(facts, repeats=3, seed=0).splitlines()
    counts = Counter(lines)
    for f in both:  # both directions, once per repeat
        assert counts[f.statement("forward")] == counts[f.statement("inverse")] == 3
    for f in test:  # one direction only
        unseen = "inverse" if f.seen == "forward" else "forward"
        assert counts[f.statement(f.seen)] == 3 and counts[f.statement(unseen)] == 0
    # the seen directions are balanced, and every relation is in both splits
    assert Counter(f.seen for f in test) == {"forward": 15, "inverse": 15}
    assert {f.relation for f in both} == {f.relation for f in test} == {r for r, _ in RELATIONS}


def test_questions_ask_seen_and_reversed_and_the_reversed_text_is_unseen():
    facts = make_facts(20, 10, seed=0)
    text = training_text(facts, seed=0)
    qs = questions(facts)
    assert len(qs) == 20 and Counter(q.direction for q in qs) == {"seen": 10, "reversed": 10}
    for q in qs:
        statement = q.prompt + q.answer + "."
        assert (statement in text.splitlines()) == (q.direction == "seen")
        assert q.answer.strip() in (q.fact.a, q.fact.b)
        assert answer_of(q.answer + ".\nZed's parent is Q.") == q.answer.strip()
