"""Captions of a shapes scene: several different sentences, all true for it.

Colours, sizes, counts ("two red squares"), relations between objects ("left of", "above"),
order and position, all judged on the objects' box centres. Objects that look the same are
described together, as one group with a count; a size is said when another group has the same
shape and colour, and at random otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from caption_pipeline.data.shapes.scene import SIZES, ShapeObject, box_centre

# Caption words. Every word that names a shape, singular or plural, maps to its category.
_SHAPE_SYNONYMS = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "hexagon": ("hexagon",),
    "diamond": ("diamond",),
}


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x")) else "s")


SHAPE_WORDS: dict[str, str] = {
    form: shape
    for shape, words in _SHAPE_SYNONYMS.items()
    for word in words
    for form in (word, _plural(word))
}
SIZE_WORDS: dict[str, str] = {
    "large": "large",
    "big": "large",
    "small": "small",
    "little": "small",
    "tiny": "small",
}
_SIZE_SYNONYMS = {size: tuple(w for w, s in SIZE_WORDS.items() if s == size) for size in SIZES}
_NUMBERS = {1: "one", 2: "two", 3: "three"}
_RELATION_WORDS = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
# Where a single group sits in the image (see position_holds), and the words for it.
_POSITIONS = {
    "left": ("on the left side",),  # not "on the right of": that reads as a relation
    "right": ("on the right side",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "middle": ("in the middle", "in the centre"),
}

# Sentence templates, by family. {L}: all groups listed; {A} {rel} {B}: a relation that holds
# between group A and every other group; {be}: is/are agreeing with the next noun phrase.
TEMPLATES: dict[str, tuple[str, str]] = {
    "list": ("list", "{L}"),
    "there": ("list", "there {be} {L}"),
    "image_of": ("list", "an image of {L}"),
    "picture_with": ("list", "a picture with {L}"),
    "shows": ("list", "the image shows {L}"),
    "background": ("list", "{L} on a {bg} background"),
    "total": ("list", "{L}, {n} in total"),
    "relation": ("relation", "{A} {rel} {B}"),
    "relation_be": ("relation", "{A} {be} {rel} {B}"),
    "relation_there": ("relation", "there {be} {A} {rel} {B}"),
    "left_to_right": ("order", "from left to right, {L}"),
    "top_to_bottom": ("order", "from top to bottom, {L}"),
    "position": ("position", "{A} {pos} of the image"),
    "position_there": ("position", "there {be} {A} {pos} of the image"),
}
# Order templates list the groups along an axis, each one in this relation to the next.
_ORDER_RELATION = {"left_to_right": "left", "top_to_bottom": "above"}
# The list family always applies and its templates never give the same sentence.
MAX_CAPTIONS_PER_IMAGE = sum(family == "list" for family, _ in TEMPLATES.values())
# Centres closer than this (a fraction of the image side) along an axis are in no relation on it.
_RELATION_MARGIN = 0.08


@dataclass(frozen=True)
class _Group:
    """Objects that look the same (shape, colour, size): described together, with a count."""

    shape: str
    colour: str
    size: str
    members: tuple[ShapeObject, ...]
    needs_size: bool  # another group has the same shape and colour


def relation_holds(relation: str, a: ShapeObject, b: ShapeObject, side: int) -> bool:
    """Whether `a` is `relation` (left/right/above/below) of `b`, judged on box centres."""
    (ax, ay), (bx, by) = box_centre(a), box_centre(b)
    along, across = {
        "left": (bx - ax, by - ay),
        "right": (ax - bx, ay - by),
        "above": (by - ay, bx - ax),
        "below": (ay - by, ax - bx),
    }[relation]
    # Clearly apart along the axis, and not mostly apart on the other one.
    return along >= _RELATION_MARGIN * side and along >= 0.5 * abs(across)


def position_holds(position: str, obj: ShapeObject, side: int) -> bool:
    """Whether the box centre of `obj` is in that part (left/right/top/bottom/middle) of it."""
    x, y = (c / side for c in box_centre(obj))
    return {
        "left": x < 0.4,
        "right": x > 0.6,
        "top": y < 0.4,
        "bottom": y > 0.6,
        "middle": 0.4 <= x <= 0.6 and 0.4 <= y <= 0.6,
    }[position]


def _groups(objects: tuple[ShapeObject, ...]) -> list[_Group]:
    by_look: dict[tuple[str, str, str], list[ShapeObject]] = {}
    for obj in objects:
        by_look.setdefault((obj.shape, obj.colour, obj.size), []).append(obj)
    return [
        _Group(
            shape,
            colour,
            size,
            tuple(members),
            needs_size=any(s == shape and c == colour and z != size for s, c, z in by_look),
        )
        for (shape, colour, size), members in by_look.items()
    ]


def _group_relation(relation: str, a: _Group, b: _Group, side: int) -> bool:
    return all(relation_holds(relation, x, y, side) for x in a.members for y in b.members)


def _with_article(words: list[str], count: int) -> str:
    if count == 1:
        words = ["an" if words[0][0] in "aeiou" else "a", *words]
    else:
        words = [_NUMBERS[count], *words]
    return " ".join(words)


def _phrase(group: _Group, rng: np.random.Generator) -> str:
    count = len(group.members)
    words = []
    if group.needs_size or rng.random() < 0.5:
        words.append(str(rng.choice(_SIZE_SYNONYMS[group.size])))
    noun = str(rng.choice(_SHAPE_SYNONYMS[group.shape]))
    words += [group.colour, _plural(noun) if count > 1 else noun]
    return _with_article(words, count)


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _be(group: _Group) -> str:
    return "is" if len(group.members) == 1 else "are"


def _slots(
    name: str, groups: list[_Group], background: str, side: int, rng: np.random.Generator
) -> dict | None:
    """Words for template `name`, or None when it says nothing true of these groups."""
    family = TEMPLATES[name][0]
    if family == "list":
        order = [groups[i] for i in rng.permutation(len(groups))]
        total = sum(len(g.members) for g in groups)
        return {
            "L": _join([_phrase(g, rng) for g in order]),
            "be": _be(order[0]),
            "bg": background,
            "n": f"{_NUMBERS[total]} shape{'s' if total > 1 else ''}",
        }
    if family == "relation":
        # A in a relation with every other group, so "A left of B and C" is true read either way.
        options = [
            (a, relation)
            for a in groups
            for relation in _RELATION_WORDS
            if len(groups) > 1
            and all(_group_relation(relation, a, b, side) for b in groups if b is not a)
        ]
        if not options:
            return None
        a, relation = options[int(rng.integers(len(options)))]
        others = [groups[i] for i in rng.permutation(len(groups)) if groups[i] is not a]
        return {
            "A": _phrase(a, rng),
            "be": _be(a),
            "rel": str(rng.choice(_RELATION_WORDS[relation])),
            "B": _join([_phrase(b, rng) for b in others]),
        }
    if family == "order":
        before = _ORDER_RELATION[name]
        axis = 0 if before == "left" else 1
        ordered = sorted(groups, key=lambda g: np.mean([box_centre(m)[axis] for m in g.members]))
        if len(groups) < 2 or not all(
            _group_relation(before, a, b, side) for a, b in pairwise(ordered)
        ):
            return None
        return {"L": _join([_phrase(g, rng) for g in ordered])}
    if family == "position":
        if len(groups) != 1:
            return None
        places = [
            p for p in _POSITIONS if all(position_holds(p, m, side) for m in groups[0].members)
        ]
        if not places:
            return None
        place = places[int(rng.integers(len(places)))]
        return {
            "A": _phrase(groups[0], rng),
            "be": _be(groups[0]),
            "pos": str(rng.choice(_POSITIONS[place])),
        }
    raise ValueError(f"unknown template family {family!r}")


def make_captions(
    objects: tuple[ShapeObject, ...],
    background: str,
    side: int,
    count: int,
    rng: np.random.Generator,
) -> tuple[str, ...]:
    """`count` different captions, all true for the scene, spread over template families."""
    groups = _groups(objects)
    by_family: dict[str, list[str]] = {}
    for name, (family, _) in TEMPLATES.items():
        by_family.setdefault(family, []).append(name)
    # One template of each family first (spatial ones when they apply), then the rest.
    names = [str(rng.choice(by_family[f])) for f in rng.permutation(sorted(by_family))]
    rest = [n for n in TEMPLATES if n not in names]
    names += [rest[i] for i in rng.permutation(len(rest))]
    captions: list[str] = []
    for name in names:
        slots = _slots(name, groups, background, side, rng)
        if slots is None:
            continue
        text = TEMPLATES[name][1].format(**slots)
        caption = text[0].upper() + text[1:] + "."
        if caption not in captions:
            captions.append(caption)
        if len(captions) == count:
            # Written in family order, the first annotation would be spatial more often than
            # the others (48 % against 31 %), and a human-agreement figure built on one of
            # them biased: the order of the annotations is shuffled.
            return tuple(captions[i] for i in rng.permutation(count))
    # Unreachable while captions_per_image <= MAX_CAPTIONS_PER_IMAGE (checked in ShapesConfig).
    raise RuntimeError(f"only {len(captions)} different captions for {objects}")
