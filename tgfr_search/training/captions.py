"""Witness-style captions from predicted face attributes, via a small probabilistic grammar.

Each LFW image carries probabilities of the 40 CelebA attributes (a FaRL model) and DeepFace
guesses of race, gender, age and emotion. `caption_attributes` keeps only the confident ones,
`generate_captions` turns them into several different sentences, as MM-CelebA-HQ did.

Thresholds (probabilities in [0, 1]; DeepFace confidences may be given in percent):

* an attribute is present at >= 0.7 (PRESENT) and clearly absent at <= 0.3 (ABSENT);
* gender comes from FaRL `Male` alone: >= 0.7 man, <= 0.3 woman. DeepFace `df_gender` is used
  only when `Male` is missing, because on LFW it calls ~770 faces "Man" (at up to 99%) that
  FaRL confidently and correctly calls female (Cate Blanchett, Serena Williams, ...);
* age group: "young" when `Young` >= 0.7 and `df_age` < 35; "middle-aged" when `Young` <= 0.3
  and 38 <= `df_age` < 55; "older" when `Young` <= 0.3 and `df_age` >= 55;
* ethnicity from `df_race` only when its confidence is >= 0.9 (STRONG);
* facial hair, baldness or a receding hairline on a woman, and makeup or lipstick on a man,
  need >= 0.95 (VERY_STRONG); "bald" overrides hair colour, style and bangs;
* the only absences said are "clean-shaven" (a man with `No_Beard` >= 0.9 and every other
  facial-hair attribute <= 0.3) and a "serious" expression (`Smiling` <= 0.1 and a DeepFace
  neutral/sad/angry emotion at >= 0.9);
* `Attractive` and `Blurry` are never used: one is an opinion, the other describes the photo.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["caption_attributes", "generate_captions", "PRESENT", "ABSENT", "STRONG"]

PRESENT = 0.7
ABSENT = 0.3
STRONG = 0.9
VERY_STRONG = 0.95

_T = TypeVar("_T")

_RACES = {
    "white": "white",
    "asian": "asian",
    "black": "black",
    "indian": "indian",
    "latino hispanic": "latino",
    "latino": "latino",
    "hispanic": "latino",
    "middle eastern": "middle eastern",
}


def _num(row: Mapping[str, object], key: str) -> float | None:
    """Read a number from a CSV-like row; missing, empty, non-numeric or NaN give None."""
    value = row.get(key)
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _prob(row: Mapping[str, object], key: str) -> float | None:
    """A probability in [0, 1]; DeepFace writes its confidences in percent."""
    p = _num(row, key)
    if p is None or p < 0:
        return None
    return p / 100 if p > 1 else min(p, 1.0)


def _text(row: Mapping[str, object], key: str) -> str:
    """A lower-cased label, or '' when absent."""
    value = row.get(key)
    return value.strip().lower() if isinstance(value, str) else ""


def caption_attributes(row: Mapping[str, object], *, ethnicity: bool = True) -> dict[str, str]:
    """The confident attributes of one attribute row, as {slot: canonical value}.

    Slots: gender, age, ethnicity, hair, hair_colour, hair_style, bangs, hat, facial_hair,
    sideburns, glasses, makeup, lipstick, face, chin, cheekbones, nose, lips, eyebrows, eyes,
    eye_bags, skin, cheeks, expression, earrings, necklace, necktie. Unknown slots are absent.
    """

    def p(key: str) -> float:
        value = _prob(row, key)
        return -1.0 if value is None else value  # unknown is never confident either way

    def present(key: str, threshold: float = PRESENT) -> bool:
        return p(key) >= threshold

    def absent(key: str, threshold: float = ABSENT) -> bool:
        return 0.0 <= p(key) <= threshold

    out: dict[str, str] = {}

    if present("Male"):
        out["gender"] = "man"
    elif absent("Male"):
        out["gender"] = "woman"
    elif _prob(row, "Male") is None and p("df_gender_prob") >= 0.99:
        label = _text(row, "df_gender")
        if label in ("man", "woman"):
            out["gender"] = label
    gender = out.get("gender")

    age = _num(row, "df_age")
    if present("Young") and (age is None or age < 35):
        out["age"] = "young"
    elif absent("Young") and age is not None and age >= 55:
        out["age"] = "older"
    elif absent("Young") and age is not None and 38 <= age < 55:
        out["age"] = "middle-aged"

    if ethnicity and p("df_race_prob") >= STRONG and _text(row, "df_race") in _RACES:
        out["ethnicity"] = _RACES[_text(row, "df_race")]

    hat = present("Wearing_Hat")
    if hat:
        out["hat"] = "yes"
    # A hat hides the scalp, so baldness, hairline and hair style are not trusted under one;
    # on women FaRL mostly reads pulled-back hair as "bald" or "receding".
    scalp_threshold = VERY_STRONG if gender == "woman" else PRESENT
    bald = present("Bald", scalp_threshold) and not hat
    if bald:
        out["hair"] = "bald"
    elif present("Receding_Hairline", scalp_threshold) and not hat:
        out["hair"] = "receding"
    if not bald:
        colours = {
            "black": p("Black_Hair"),
            "brown": p("Brown_Hair"),
            "blond": p("Blond_Hair"),
            "grey": p("Gray_Hair"),
        }
        colour, best = max(colours.items(), key=lambda kv: kv[1])
        if best >= PRESENT:
            out["hair_colour"] = colour
        if not hat:
            styles = {"wavy": p("Wavy_Hair"), "straight": p("Straight_Hair")}
            style, best = max(styles.items(), key=lambda kv: kv[1])
            if best >= PRESENT:
                out["hair_style"] = style
            if present("Bangs"):
                out["bangs"] = "yes"

    beard_threshold = VERY_STRONG if gender == "woman" else PRESENT
    goatee = present("Goatee", beard_threshold)
    moustache = present("Mustache", beard_threshold)
    beard = absent("No_Beard", 1 - beard_threshold)
    if goatee:
        out["facial_hair"] = "goatee and moustache" if moustache else "goatee"
    elif beard:
        out["facial_hair"] = "beard and moustache" if moustache else "beard"
    elif moustache:
        out["facial_hair"] = "moustache"
    elif present("5_o_Clock_Shadow", beard_threshold):
        out["facial_hair"] = "stubble"
    elif (
        gender == "man"
        and present("No_Beard", STRONG)
        and all(absent(k) for k in ("Mustache", "Goatee", "5_o_Clock_Shadow", "Sideburns"))
    ):
        out["facial_hair"] = "clean-shaven"
    if present("Sideburns", beard_threshold) and not bald:
        out["sideburns"] = "yes"

    if present("Eyeglasses"):
        out["glasses"] = "yes"
    makeup_threshold = VERY_STRONG if gender == "man" else PRESENT
    if present("Heavy_Makeup", makeup_threshold):
        out["makeup"] = "heavy"
    if present("Wearing_Lipstick", makeup_threshold):
        out["lipstick"] = "yes"

    if present("Chubby"):
        out["face"] = "chubby"
    elif present("Oval_Face"):
        out["face"] = "oval"
    if present("Double_Chin"):
        out["chin"] = "double"
    if present("High_Cheekbones"):
        out["cheekbones"] = "high"
    if present("Big_Nose"):
        out["nose"] = "big"
    elif present("Pointy_Nose"):
        out["nose"] = "pointy"
    if present("Big_Lips"):
        out["lips"] = "full"
    if present("Bushy_Eyebrows"):
        out["eyebrows"] = "bushy"
    elif present("Arched_Eyebrows"):
        out["eyebrows"] = "arched"
    if present("Narrow_Eyes"):
        out["eyes"] = "narrow"
    if present("Bags_Under_Eyes"):
        out["eye_bags"] = "yes"
    # Skin tone is a proxy for ethnicity, so it goes when ethnicity does.
    if ethnicity and present("Pale_Skin"):
        out["skin"] = "pale"
    if present("Rosy_Cheeks"):
        out["cheeks"] = "rosy"

    if present("Smiling"):
        out["expression"] = "smiling"
    elif absent("Smiling") and present("Mouth_Slightly_Open"):
        out["expression"] = "mouth open"
    elif (
        absent("Smiling", 0.1)
        and _text(row, "df_emotion") in ("neutral", "sad", "angry")
        and p("df_emotion_prob") >= STRONG
    ):
        out["expression"] = "serious"

    for key, slot in (
        ("Wearing_Earrings", "earrings"),
        ("Wearing_Necklace", "necklace"),
        ("Wearing_Necktie", "necktie"),
    ):
        if present(key):
            out[slot] = "yes"
    return out


# --------------------------------------------------------------------------------------
# The grammar. Each attribute becomes one "piece" per sentence: a pre-noun adjective
# ("bald"), a noun phrase for "with"/"has" ("a goatee"), or a worn item ("glasses").

_ADJ, _NP, _WEAR = "adj", "np", "wear"
_Option = tuple[str, str]  # (role, text)

# Adjective order follows English (opinion, age, appearance, origin): "smiling middle-aged
# bald white man", never "white bald middle-aged".
_ADJ_RANK = {"expression": 0, "age": 1, "hair": 2, "facial_hair": 2, "glasses": 2, "ethnicity": 3}
_MAX_ADJS = 2
_MAX_PHRASES = 4

_ETHNIC = {
    "white": ["white", "Caucasian"],
    "asian": ["Asian", "East Asian"],
    "black": ["Black"],
    "indian": ["South Asian"],
    "latino": ["Hispanic", "Latino"],
    "middle eastern": ["Middle Eastern"],
}
_AGE = {"young": ["young"], "middle-aged": ["middle-aged"], "older": ["older", "elderly"]}
_NOUNS = {
    "man": ["man", "man", "man", "gentleman", "guy", "male"],
    "woman": ["woman", "woman", "woman", "lady", "female"],
    None: ["person", "person", "individual"],
}
_PRONOUNS = {"man": "he", "woman": "she"}
_HAIR_COLOUR = {
    "black": ["black", "dark", "jet-black"],
    "brown": ["brown", "chestnut-brown"],
    "blond": ["blond", "fair", "light blond"],
    "grey": ["grey", "gray", "silver", "greying"],
}
_HAIRED = {
    "black": ["dark-haired", "black-haired"],
    "brown": ["brown-haired"],
    "blond": ["blond", "fair-haired", "blond-haired"],
    "grey": ["grey-haired", "gray-haired", "silver-haired"],
}


@dataclass
class _Parts:
    """The pieces of one sentence, grouped by where they go."""

    gender: str | None
    noun: str
    adjs: list[tuple[int, str]] = field(default_factory=list)  # (_ADJ_RANK, adjective)
    nps: list[str] = field(default_factory=list)
    wears: list[str] = field(default_factory=list)


def _choose(rng: random.Random, options: Sequence[_T]) -> _T:
    return options[rng.randrange(len(options))]


_WORDING: dict[tuple[str, str], list[tuple[str, tuple[str, ...]]]] = {
    **{("age", k): [(_ADJ, tuple(v))] for k, v in _AGE.items()},
    **{("ethnicity", k): [(_ADJ, tuple(v))] for k, v in _ETHNIC.items()},
    ("hair", "receding"): [(_ADJ, ("balding",)), (_NP, ("a receding hairline",))],
    ("hair", "bald"): [(_ADJ, ("bald", "bald-headed")), (_NP, ("a bald head", "no hair"))],
    ("facial_hair", "goatee"): [(_NP, ("a goatee",))],
    ("facial_hair", "goatee and moustache"): [
        (_NP, ("a goatee and moustache", "a goatee and a mustache"))
    ],
    ("facial_hair", "beard"): [(_ADJ, ("bearded",)), (_NP, ("a beard", "a full beard"))],
    ("facial_hair", "beard and moustache"): [
        (_ADJ, ("bearded",)),
        (_NP, ("a beard and moustache", "a beard and a mustache")),
    ],
    ("facial_hair", "moustache"): [
        (_ADJ, ("moustached", "mustached")),
        (_NP, ("a moustache", "a mustache")),
    ],
    ("facial_hair", "stubble"): [
        (_ADJ, ("unshaven", "stubbly")),
        (_NP, ("stubble", "a five o'clock shadow", "a stubbly chin")),
    ],
    ("facial_hair", "clean-shaven"): [(_ADJ, ("clean-shaven",))],
    ("sideburns", "yes"): [(_NP, ("sideburns", "long sideburns"))],
    ("glasses", "yes"): [
        (_ADJ, ("bespectacled",)),
        (_WEAR, ("glasses", "eyeglasses", "spectacles")),
    ],
    ("hat", "yes"): [(_WEAR, ("a hat", "a hat", "headwear"))],
    ("makeup", "heavy"): [(_WEAR, ("heavy makeup", "a lot of makeup", "bold makeup"))],
    ("lipstick", "yes"): [(_WEAR, ("lipstick", "lipstick", "bright lipstick"))],
    ("earrings", "yes"): [(_WEAR, ("earrings",))],
    ("necklace", "yes"): [(_WEAR, ("a necklace",))],
    ("necktie", "yes"): [(_WEAR, ("a tie", "a necktie"))],
    ("face", "chubby"): [(_ADJ, ("chubby",)), (_NP, ("a chubby face", "a round, full face"))],
    ("face", "oval"): [(_NP, ("an oval face", "an oval-shaped face"))],
    ("chin", "double"): [(_NP, ("a double chin",))],
    ("cheekbones", "high"): [(_NP, ("high cheekbones", "prominent cheekbones"))],
    ("nose", "big"): [(_NP, ("a big nose", "a large nose"))],
    ("nose", "pointy"): [(_NP, ("a pointed nose",))],
    ("lips", "full"): [(_NP, ("full lips", "big lips"))],
    ("eyebrows", "bushy"): [(_NP, ("bushy eyebrows", "thick eyebrows"))],
    ("eyebrows", "arched"): [(_NP, ("arched eyebrows",))],
    ("eyes", "narrow"): [(_NP, ("narrow eyes", "narrow-set eyes"))],
    ("eye_bags", "yes"): [(_NP, ("bags under the eyes", "puffy eyes"))],
    ("skin", "pale"): [(_NP, ("pale skin", "a pale complexion"))],
    ("cheeks", "rosy"): [(_NP, ("rosy cheeks",))],
    ("expression", "smiling"): [(_ADJ, ("smiling",)), (_NP, ("a smile", "a broad smile"))],
    ("expression", "serious"): [
        (_ADJ, ("serious-looking",)),
        (_NP, ("a serious expression", "a neutral expression", "a serious face")),
    ],
    ("expression", "mouth open"): [
        (_NP, ("a slightly open mouth", "parted lips", "lips slightly apart"))
    ],
}


def _realise(slot: str, value: str, attrs: Mapping[str, str], rng: random.Random) -> list[_Option]:
    """The possible (role, text) wordings of one slot; empty when it has none on its own."""
    options = [(role, _choose(rng, words)) for role, words in _WORDING.get((slot, value), [])]
    if attrs.get("gender") == "woman":
        options = [(role, "Latina" if text == "Latino" else text) for role, text in options]
    return options


def _hair_phrase(attrs: Mapping[str, str], rng: random.Random) -> list[_Option]:
    """Hair colour, style and bangs as one phrase ("wavy blond hair and bangs")."""
    colour, style, bangs = attrs.get("hair_colour"), attrs.get("hair_style"), "bangs" in attrs
    if not (colour or style or bangs) or attrs.get("hair") == "bald":
        return []
    words = [w for w in (style, _choose(rng, _HAIR_COLOUR[colour]) if colour else None) if w]
    if attrs.get("gender") == "woman" and words and words[-1] in ("blond", "light blond"):
        words[-1] += "e"
    hair = " ".join([*words, "hair"])
    out: list[_Option] = []
    if bangs:
        fringe = _choose(rng, ["bangs", "a fringe"])
        out.append((_NP, f"{hair} and {fringe}" if words else fringe))
    else:
        out.append((_NP, hair))
    if colour and not style and not bangs:
        adj = _choose(rng, _HAIRED[colour])
        out.append((_ADJ, adj + "e" if adj == "blond" and attrs.get("gender") == "woman" else adj))
    return out


# How likely each slot is to be said in one sentence: the identifying ones most often.
_KEEP = {
    "age": 0.85,
    "ethnicity": 0.6,
    "hair": 0.85,
    "hair_phrase": 0.8,
    "facial_hair": 0.75,
    "glasses": 0.9,
    "hat": 0.85,
    "expression": 0.55,
    "makeup": 0.7,
    "lipstick": 0.6,
}
_KEEP_DEFAULT = 0.4
_KEEP_CLEAN_SHAVEN = 0.3


def _sample_parts(attrs: Mapping[str, str], rng: random.Random) -> _Parts:
    """Pick which attributes one sentence says, and how."""
    gender = attrs.get("gender")
    parts = _Parts(gender=gender, noun=_choose(rng, _NOUNS[gender]))
    slots = [s for s in attrs if s not in ("gender", "hair_colour", "hair_style", "bangs")]
    slots.append("hair_phrase")
    rng.shuffle(slots)
    for slot in slots:
        keep = _KEEP.get(slot, _KEEP_DEFAULT)
        if attrs.get(slot) == "clean-shaven":
            keep = _KEEP_CLEAN_SHAVEN
        if rng.random() >= keep:
            continue
        if slot == "hair_phrase":
            options = _hair_phrase(attrs, rng)
        else:
            options = _realise(slot, attrs[slot], attrs, rng)
        rng.shuffle(options)
        for role, text in options:
            if role == _ADJ and len(parts.adjs) < _MAX_ADJS:
                parts.adjs.append((_ADJ_RANK.get(slot, 2), text))
                break
            if role != _ADJ and len(parts.nps) + len(parts.wears) < _MAX_PHRASES:
                (parts.wears if role == _WEAR else parts.nps).append(text)
                break
    parts.adjs.sort(key=lambda adj: adj[0])
    return parts


def _join(items: Sequence[str]) -> str:
    """English list: "a, b and c", with a serial comma when an item has its own "and"."""
    if len(items) <= 1:
        return "".join(items)
    last = ", and " if any(" and " in item for item in items) else " and "
    return ", ".join(items[:-1]) + last + items[-1]


def _a(phrase: str) -> str:
    """Prefix the indefinite article that the phrase's first sound takes."""
    first = phrase.split()[0].lower()
    vowel = first[0] in "aeiou" and not first.startswith(("uni", "eu", "one"))
    return ("an " if vowel else "a ") + phrase


def _subject(parts: _Parts) -> str:
    return " ".join([*(text for _, text in parts.adjs), parts.noun])


def _bare(np: str) -> str:
    """Drop a leading article, for witness-statement lists ("man, goatee, glasses")."""
    return re.sub(r"^(a|an) ", "", np)


_Template = Callable[[_Parts, random.Random], "str | None"]


def _t_with(parts: _Parts, rng: random.Random) -> str | None:
    items = parts.nps + parts.wears
    if not items:
        return None
    return f"{_a(_subject(parts))} with {_join(items)}"


def _t_wearing(parts: _Parts, rng: random.Random) -> str | None:
    if not parts.wears:
        return None
    tail = f", with {_join(parts.nps)}" if parts.nps else ""
    return f"{_a(_subject(parts))} wearing {_join(parts.wears)}{tail}"


def _t_this_has(parts: _Parts, rng: random.Random) -> str | None:
    if not (parts.nps or parts.wears):
        return None
    demo = _choose(rng, ["This", "The"])
    clauses = []
    if parts.nps:
        clauses.append(f"has {_join(parts.nps)}")
    if parts.wears:
        clauses.append(f"{_choose(rng, ['wears', 'is wearing'])} {_join(parts.wears)}")
    joiner = ", and " if " and " in clauses[0] and len(clauses) > 1 else " and "
    return f"{demo} {_subject(parts)} {joiner.join(clauses)}"


def _t_bare(parts: _Parts, rng: random.Random) -> str | None:
    items = parts.nps + parts.wears
    if not parts.adjs or not items:
        return None
    return f"{_subject(parts)} with {_join(items)}"


def _t_photo(parts: _Parts, rng: random.Random) -> str | None:
    if not (parts.adjs or parts.nps or parts.wears):
        return None
    lead = _choose(rng, ["A photo of", "A picture of", "A close-up of", "Portrait of", "Face of"])
    text = f"{lead} {_a(_subject(parts))}"
    if parts.nps:
        text += f" with {_join(parts.nps)}"
    if parts.wears:
        text += f"{',' if parts.nps else ''} wearing {_join(parts.wears)}"
    return text


def _t_predicate(parts: _Parts, rng: random.Random) -> str | None:
    if not parts.adjs:
        return None
    where = _choose(rng, ["in the photo", "in the picture", "in this image", "shown"])
    text = f"The {parts.noun} {where} is {_join([text for _, text in parts.adjs])}"
    rest = []
    if parts.nps:
        rest.append(f"has {_join(parts.nps)}")
    if parts.wears:
        rest.append(f"wears {_join(parts.wears)}")
    if rest:
        text += f"{',' if len(parts.adjs) > 1 else ''} and {' and '.join(rest)}"
    return text


def _t_list(parts: _Parts, rng: random.Random) -> str | None:
    items = [_bare(np) for np in parts.nps] + [f"wearing {_join(parts.wears)}"] * bool(parts.wears)
    if not items:
        return None
    return ", ".join([_subject(parts), *items])


def _t_pronoun(parts: _Parts, rng: random.Random) -> str | None:
    pronoun = _PRONOUNS.get(parts.gender or "")
    items = parts.nps + parts.wears
    if pronoun is None or not items:
        return None
    return f"{pronoun} is {_a(_subject(parts))} with {_join(items)}"


def _t_who(parts: _Parts, rng: random.Random) -> str | None:
    if not parts.nps:
        return None
    text = f"{_a(_subject(parts))} who has {_join(parts.nps)}"
    if parts.wears:
        text += f" and is wearing {_join(parts.wears)}"
    return text


def _t_adjs_only(parts: _Parts, rng: random.Random) -> str | None:
    if not parts.adjs or parts.nps or parts.wears:
        return None
    lead = _choose(rng, ["", "A photo of ", "Portrait of ", "This is "])
    return f"{lead}{_a(_subject(parts))}"


_TEMPLATES: tuple[_Template, ...] = (
    _t_with,
    _t_with,
    _t_wearing,
    _t_this_has,
    _t_bare,
    _t_photo,
    _t_predicate,
    _t_list,
    _t_pronoun,
    _t_who,
    _t_adjs_only,
)


def _fallbacks(gender: str | None) -> list[str]:
    """Sentences that name nothing but the (confident) gender, for rows the model was unsure of."""
    noun = {"man": "man", "woman": "woman"}.get(gender or "", "person")
    out = [
        f"A photo of a {noun}",
        f"A {noun} photographed from the front",
        f"Portrait of a {noun}",
        f"A close-up of a {noun}'s face",
        f"The face of a {noun}",
    ]
    if gender:
        out += [f"A {noun}", "A photo of a person", "A person photographed up close"]
    return out + ["A face photographed head-on", "Someone photographed from the front"]


def _finish(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text[:1].upper() + text[1:] + "."


def _stable_seed(seed: int | str) -> int:
    # Python's hash() of a str changes per process, so it would break reproducibility.
    return int.from_bytes(hashlib.sha256(str(seed).encode()).digest()[:8], "big")


def generate_captions(
    row: Mapping[str, object], *, seed: int | str, n: int = 5, ethnicity: bool = True
) -> list[str]:
    """Up to `n` distinct witness-style sentences naming only the row's confident attributes.

    Deterministic for a given `seed` (e.g. the image's relative path); at least 2 when n >= 2.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    attrs = caption_attributes(row, ethnicity=ethnicity)
    rng = random.Random(_stable_seed(seed))
    captions: list[str] = []
    seen: set[str] = set()

    def add(text: str | None) -> None:
        if text and len(captions) < n:
            sentence = _finish(text)
            if sentence.lower() not in seen:
                seen.add(sentence.lower())
                captions.append(sentence)

    if len(attrs) > int("gender" in attrs):
        for _ in range(20 * n):
            if len(captions) >= n:
                break
            parts = _sample_parts(attrs, rng)
            add(_choose(rng, _TEMPLATES)(parts, rng))
    # Few confident attributes leave few sentences to vary; pad with plain wording.
    pool = _fallbacks(attrs.get("gender"))
    rng.shuffle(pool)
    for text in pool:
        add(text)
    return captions
