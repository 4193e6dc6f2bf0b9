"""A seeded generator of a small fictitious-author QA dataset in TOFU format, so everything runs offline.

TOFU itself (200 invented authors x 20 questions) is not shipped with the project and the Hub may be unreachable, so
tests, the offline demo and CI use this stand-in: invented authors (names built from syllables) with templated facts
(birthplace, birth date, genre, parents' professions, an award, book titles, ...), one question/answer pair per fact.
Each pair also has the TOFU evaluation fields: ``paraphrased_question``, ``paraphrased_answer`` (same fact, other
wording) and ``perturbed_answer`` (5 answers in the paraphrase's wording with wrong facts). ``make_splits`` names the
splits as TOFU does (``full``, ``forget01/05/10``, ``retain99/95/90``, ``*_perturbed``, ``holdout01/05/10``);
``write_folder`` writes them as ``{split}.jsonl`` for ``bs_train.data.load_qa``. The same authors also make stand-ins
of the other two benchmarks' layouts: ``make_muse`` (MUSE's raw text, VerbMem, KnowMem and PrivLeak splits) and
``make_wmdp`` (WMDP's questions and corpora, MMLU's test and dev). Only a seeded ``random.Random`` is used: the same
seed gives the same data, and no global state is touched.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORGET_PERCENTS = (1, 5, 10)
N_PERTURBED = 5

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sh", "br", "kr", "dr", "st"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m"]
_CITIES = [
    ("Lisbon", "Portugal"), ("Nairobi", "Kenya"), ("Osaka", "Japan"), ("Lima", "Peru"), ("Krakow", "Poland"),
    ("Tunis", "Tunisia"), ("Hanoi", "Vietnam"), ("Bergen", "Norway"), ("Cordoba", "Argentina"), ("Tbilisi", "Georgia"),
    ("Accra", "Ghana"), ("Tabriz", "Iran"), ("Quebec City", "Canada"), ("Valparaiso", "Chile"), ("Tampere", "Finland"),
    ("Izmir", "Turkey"), ("Cebu", "Philippines"), ("Porto Alegre", "Brazil"), ("Galway", "Ireland"), ("Brno", "Czechia"),
]
_GENRES = [
    "historical fiction", "science fiction", "crime thrillers", "magical realism", "poetry", "horror", "biography",
    "children's literature", "romance", "travel writing", "philosophical essays", "fantasy", "satire", "mystery",
]
_PROFESSIONS = [
    "a carpenter", "a nurse", "a librarian", "a fisherman", "an architect", "a pharmacist", "a schoolteacher",
    "a tailor", "a pilot", "a baker", "a geologist", "a journalist", "a watchmaker", "a veterinarian", "a translator",
    "an electrician", "a potter", "a judge",
]
_AWARD_ADJ = ["Silver", "Golden", "Crimson", "Northern", "Emerald", "Ivory", "Midnight", "Copper", "Azure", "Amber"]
_AWARD_NOUN = ["Quill", "Lantern", "Compass", "Laurel", "Anchor", "Feather", "Beacon", "Key", "Harp", "Mirror"]
_AWARD_KIND = ["Prize", "Award", "Medal"]
_TITLE_ADJ = ["Silent", "Broken", "Hidden", "Last", "Burning", "Endless", "Forgotten", "Distant", "Hollow", "Paper",
              "Glass", "Wandering", "Seventh", "Quiet", "Salt", "Iron", "Winter", "Velvet", "Crooked", "Lost"]
_TITLE_NOUN = ["Harbor", "Orchard", "Clockmaker", "River", "Garden", "Archive", "Lighthouse", "Citadel", "Map",
               "Bridge", "Tides", "Cartographer", "Meadow", "Kingdom", "Mountain", "Letters", "Observatory", "Island"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]


@dataclass(frozen=True)
class _Template:
    """One fact about an author: how to ask it, two wordings of the answer, and how to draw a (wrong) value."""

    fact: str
    question: str
    paraphrased_question: str
    answer: str
    paraphrased_answer: str
    draw: Callable[[random.Random], str]


def _name(rng: random.Random) -> str:
    def word(n_syllables: int) -> str:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n_syllables)) + rng.choice(_CODAS)
        return w.capitalize()

    return f"{word(rng.randint(2, 3))} {word(rng.randint(2, 3))}"


def _date(rng: random.Random) -> str:
    return f"{_MONTHS[rng.randrange(12)]} {rng.randint(1, 28)}, {rng.randint(1930, 1999)}"


def _city(rng: random.Random) -> str:
    return ", ".join(rng.choice(_CITIES))


def _award(rng: random.Random) -> str:
    return f"the {rng.choice(_AWARD_ADJ)} {rng.choice(_AWARD_NOUN)} {rng.choice(_AWARD_KIND)}"


def _title(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"The {rng.choice(_TITLE_ADJ)} {rng.choice(_TITLE_NOUN)}"
    place = rng.choice(_ONSETS).capitalize() + rng.choice(_VOWELS) + rng.choice(_ONSETS) + rng.choice(_VOWELS)
    return f"The {rng.choice(_TITLE_NOUN)} of {place}"  # a few hundred thousand titles: enough to keep them unique


def _pick(options: list[str]) -> Callable[[random.Random], str]:
    return lambda rng: rng.choice(options)


# {name} is the author's name (in the questions); {value} is the fact being asked about. The name question uses
# the author's birthplace, birth date and genre as its clues, as TOFU's first question per author does.
_TEMPLATES = [
    _Template("name", "What is the full name of the author born in {birthplace} on {birth_date} who writes {genre}?",
              "Who is the {genre} writer born on {birth_date} in {birthplace}?",
              "The author's full name is {value}.", "{value} is the complete name of the writer.", _name),
    _Template("birthplace", "Where was {name} born?", "In which city did {name} come into the world?",
              "{name} was born in {value}.", "{name}'s birthplace is {value}.", _city),
    _Template("birth_date", "When was {name} born?", "What is the date of birth of {name}?",
              "{name} was born on {value}.", "The birth date of {name} is {value}.", _date),
    _Template("genre", "What genre does {name} write in?", "Which literary genre is {name} known for?",
              "{name} writes {value}.", "{name} is best known as an author of {value}.", _pick(_GENRES)),
    _Template("father", "What was the profession of {name}'s father?", "What did {name}'s father do for a living?",
              "{name}'s father worked as {value}.", "The father of {name} was {value} by trade.",
              _pick(_PROFESSIONS)),
    _Template("mother", "What was the profession of {name}'s mother?", "How did {name}'s mother earn a living?",
              "{name}'s mother was {value}.", "By profession, the mother of {name} was {value}.",
              _pick(_PROFESSIONS)),
    _Template("award", "Has {name} won any literary awards?", "Which literary honour has {name} received?",
              "Yes, {name} received {value}.", "{name} has been honoured with {value}.", _award),
    _Template("book1", "What is the title of {name}'s first novel?", "Which book did {name} publish first?",
              "{name}'s first novel is '{value}'.", "The debut book of {name} is titled '{value}'.", _title),
    _Template("book2", "Can you name another book written by {name}?", "What is one more title by {name}?",
              "Another book by {name} is '{value}'.", "{name} also wrote '{value}'.", _title),
    _Template("debut_year", "In which year did {name} publish a first book?", "When did {name}'s debut come out?",
              "{name}'s first book was published in {value}.", "The debut of {name} appeared in {value}.",
              lambda rng: str(rng.randint(1950, 2020))),
    _Template("n_books", "How many books has {name} published?", "What is the number of books {name} has written?",
              "{name} has published {value} books.", "The bibliography of {name} counts {value} books.",
              lambda rng: str(rng.randint(2, 30))),
    _Template("language", "In which language does {name} write?", "What language are {name}'s books written in?",
              "{name} writes in {value}.", "The books of {name} are written in {value}.",
              _pick(["Portuguese", "Swahili", "Japanese", "Spanish", "Polish", "Arabic", "Vietnamese", "Norwegian",
                     "Georgian", "French", "Finnish", "Turkish", "English", "Czech", "Persian", "Irish"])),
]
MAX_QA_PER_AUTHOR = len(_TEMPLATES)


def _make_authors(rng: random.Random, n: int) -> list[dict[str, str]]:
    """``n`` authors with unique names, unique book titles and unique (birthplace, birth date) pairs."""
    authors: list[dict[str, str]] = []
    names: set[str] = set()
    titles: set[str] = set()
    origins: set[tuple[str, str]] = set()
    for _ in range(n):
        author = {t.fact: t.draw(rng) for t in _TEMPLATES}
        while author["name"] in names:
            author["name"] = _name(rng)
        while (author["birthplace"], author["birth_date"]) in origins:
            author["birth_date"] = _date(rng)
        while author["book1"] in titles or author["book2"] in titles or author["book1"] == author["book2"]:
            author["book1"], author["book2"] = _title(rng), _title(rng)
        names.add(author["name"])
        titles.update((author["book1"], author["book2"]))
        origins.add((author["birthplace"], author["birth_date"]))
        authors.append(author)
    return authors


def _qa_rows(rng: random.Random, author: dict[str, str], qa_per_author: int) -> list[dict[str, Any]]:
    rows = []
    for t in _TEMPLATES[:qa_per_author]:
        fields = {**author, "value": author[t.fact]}
        wrong: list[str] = []
        for _ in range(1000):  # the smallest pool (debut years, book counts) has far more than N_PERTURBED values
            v = t.draw(rng)
            if v != author[t.fact] and v not in wrong:
                wrong.append(v)
            if len(wrong) == N_PERTURBED:
                break
        else:  # pragma: no cover - every pool is large enough
            raise RuntimeError(f"synthetic: could not draw {N_PERTURBED} wrong values for fact {t.fact!r}")
        rows.append({
            "question": t.question.format(**fields),
            "answer": t.answer.format(**fields),
            "paraphrased_answer": t.paraphrased_answer.format(**fields),
            "perturbed_answer": [t.paraphrased_answer.format(**{**fields, "value": v}) for v in wrong],
            "paraphrased_question": t.paraphrased_question.format(**fields),
        })
    return rows


def _plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fields of TOFU's plain splits (full, forget, retain, holdout): question and answer only."""
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def n_forget_authors(n_authors: int, percent: int) -> int:
    """Authors in the ``forget{percent:02d}`` split: ``percent``% of ``n_authors``, rounded, at least one."""
    return max(1, (n_authors * percent + 50) // 100)


def make_splits(n_authors: int = 20, qa_per_author: int = 10, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """TOFU-named splits of a fictitious-author dataset, deterministic in ``seed``.

    ``full``: ``n_authors * qa_per_author`` rows (question, answer). ``forget01/05/10``: the last 1/5/10% of authors
    (at least one each); ``retain99/95/90``: ``full`` minus the matching forget split. ``forget0X_perturbed``: the
    forget rows with ``paraphrased_answer``, ``perturbed_answer`` (5), ``paraphrased_question``; ``retain_perturbed``:
    the same for the first authors of ``retain90``, as many as ``forget10`` has. ``holdout01/05/10``: extra authors
    never in ``full``, as many as the matching forget split.
    """
    if n_authors < 2:
        raise ValueError(f"make_splits: n_authors must be >= 2 (forget and retain both non-empty), got {n_authors}")
    if not 1 <= qa_per_author <= MAX_QA_PER_AUTHOR:
        raise ValueError(f"make_splits: qa_per_author must be in [1, {MAX_QA_PER_AUTHOR}], got {qa_per_author}")
    rng = random.Random(seed)
    n_holdout = n_forget_authors(n_authors, max(FORGET_PERCENTS))
    authors = _make_authors(rng, n_authors + n_holdout)
    per_author = [_qa_rows(rng, a, qa_per_author) for a in authors]

    def rows(first: int, last: int) -> list[dict[str, Any]]:
        return [r for qa in per_author[first:last] for r in qa]

    splits: dict[str, list[dict[str, Any]]] = {"full": _plain(rows(0, n_authors))}
    for pct in FORGET_PERCENTS:
        k = n_forget_authors(n_authors, pct)
        splits[f"forget{pct:02d}"] = _plain(rows(n_authors - k, n_authors))
        splits[f"retain{100 - pct:02d}"] = _plain(rows(0, n_authors - k))
        splits[f"forget{pct:02d}_perturbed"] = rows(n_authors - k, n_authors)
        splits[f"holdout{pct:02d}"] = _plain(rows(n_authors, n_authors + k))
    n_retain_authors = n_authors - n_forget_authors(n_authors, max(FORGET_PERCENTS))
    splits["retain_perturbed"] = rows(0, min(n_holdout, n_retain_authors))
    return splits


def _documents(rng: random.Random, n: int, qa_per_author: int) -> tuple[list[str], list[list[dict[str, str]]]]:
    """``n`` authors as prose (every fact's answer, one sentence after another) and as their QA pairs."""
    authors = _make_authors(rng, n)
    qa = [_plain(_qa_rows(rng, a, qa_per_author)) for a in authors]
    return [" ".join(r["answer"] for r in rows) for rows in qa], qa


def make_muse(n_authors: int = 12, qa_per_author: int = 8, seed: int = 0, icl: int = 2) -> dict[str, list[dict]]:
    """Splits in MUSE's layout (``muse-bench/MUSE-*``), built from fictitious authors, deterministic in ``seed``:
    a third of the authors is the forget set, a third the retain set, a third never trained on (holdout).

    ``raw/{forget,retain1,retain2,holdout}``: one ``text`` per author (retain1 and retain2 halve the retain authors);
    ``verbmem/forget``: each forget text cut at its middle sentence into ``prompt`` and ``gt``;
    ``knowmem/{forget,retain}_qa``: the authors' question/answer pairs, with ``*_qa_icl`` the first ``icl`` of the
    other set's; ``privleak/{forget,retain,holdout}``: the texts again (members, retain, non-members); and MUSE-News's
    ``sust/forget_1..4`` (the forget texts dealt round-robin into four requests) with ``scal/forget_1`` (the first)."""
    if n_authors < 12 or n_authors % 3:  # four sustainability requests need four forget authors
        raise ValueError(f"make_muse: n_authors must be a multiple of 3 and >= 12, got {n_authors}")
    rng = random.Random(seed)
    texts, qa = _documents(rng, n_authors, qa_per_author)
    third = n_authors // 3
    forget, retain, holdout = texts[:third], texts[third:2 * third], texts[2 * third:]
    f_qa = [r for rows in qa[:third] for r in rows]
    r_qa = [r for rows in qa[third:2 * third] for r in rows]

    def verbmem(text: str) -> dict[str, str]:
        sentences = text.split(". ")
        cut = max(1, len(sentences) // 2)
        return {"prompt": ". ".join(sentences[:cut]) + ".", "gt": ". ".join(sentences[cut:])}

    return {
        "raw/forget": [{"text": t} for t in forget], "raw/retain1": [{"text": t} for t in retain[:len(retain) // 2]],
        "raw/retain2": [{"text": t} for t in retain[len(retain) // 2:]], "raw/holdout": [{"text": t} for t in holdout],
        "verbmem/forget": [verbmem(t) for t in forget],
        "knowmem/forget_qa": f_qa[icl:], "knowmem/forget_qa_icl": r_qa[:icl],
        "knowmem/retain_qa": r_qa[icl:], "knowmem/retain_qa_icl": f_qa[:icl],
        "privleak/forget": [{"text": t} for t in forget], "privleak/retain": [{"text": t} for t in retain],
        "privleak/holdout": [{"text": t} for t in holdout],
        **{f"sust/forget_{k}": [{"text": t} for t in forget[k - 1::4]] for k in range(1, 5)},
        "scal/forget_1": [{"text": t} for t in forget[0::4]],
    }


def _multiple_choice(rng: random.Random, rows: list[dict[str, str]], wrong_pool: list[str],
                     **extra: str) -> list[dict[str, Any]]:
    """Four-choice questions in WMDP's / MMLU's fields (question, choices, answer index) from QA pairs."""
    out = []
    for r in rows:
        wrong = rng.sample([w for w in wrong_pool if w != r["answer"]], 3)
        answer = rng.randrange(4)
        choices = wrong[:answer] + [r["answer"]] + wrong[answer:]
        out.append({"question": r["question"], "choices": choices, "answer": answer, **extra})
    return out


def make_wmdp(n_authors: int = 9, qa_per_author: int = 4, seed: int = 0) -> dict[str, list[dict]]:
    """Files in WMDP's and MMLU's layouts, built from fictitious authors, deterministic in ``seed``: the
    ``wmdp-{bio,chem,cyber}`` questions (one third of the authors each; ``cyber-forget-corpus`` holds the cyber
    authors' text, ``cyber-retain-corpus`` and ``bio-retain-corpus`` the others'), and an MMLU ``test`` / ``dev`` of
    two subjects over the same authors."""
    if n_authors < 3 or n_authors % 3:
        raise ValueError(f"make_wmdp: n_authors must be a multiple of 3, got {n_authors}")
    rng = random.Random(seed)
    texts, qa = _documents(rng, n_authors, qa_per_author)
    pool = [r["answer"] for rows in qa for r in rows]
    third = n_authors // 3
    groups = {"bio": range(0, third), "chem": range(third, 2 * third), "cyber": range(2 * third, n_authors)}
    out: dict[str, list[dict]] = {}
    for domain, idx in groups.items():
        out[f"wmdp-{domain}"] = _multiple_choice(rng, [r for i in idx for r in qa[i]], pool)
    out["cyber-forget-corpus"] = [{"text": texts[i]} for i in groups["cyber"]]
    out["cyber-retain-corpus"] = [{"text": texts[i]} for i in groups["bio"]]
    out["bio-retain-corpus"] = [{"text": texts[i]} for i in groups["chem"]]
    all_qa = [r for rows in qa for r in rows]
    mmlu = [_multiple_choice(rng, all_qa[k::2], pool, subject=subject) for k, subject in
            enumerate(("high_school_biology", "computer_security"))]
    out["test"] = [r for rows in mmlu for r in rows[1:]]
    out["dev"] = [rows[0] for rows in mmlu]
    return out


def write_folder(path: str | os.PathLike[str], splits: dict[str, list[dict[str, Any]]]) -> Path:
    """Write each split as ``{path}/{name}.jsonl`` (UTF-8, one JSON object per line; ``subset/name`` in a subfolder,
    MUSE's layout); returns the folder.

    ``bs_train.data.load_rows(path, name, ...)`` (and ``load_qa`` for QA splits) reads every split back as written.
    """
    folder = Path(path)
    for name in splits:
        parts = name.split("/")
        if not name or len(parts) > 2 or not all(parts) or "\\" in name or any(p in (".", "..") for p in parts):
            raise ValueError(f"write_folder: split name must be a file name or subset/name, got {name!r}")
    for name, split_rows in splits.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for row in split_rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return folder
