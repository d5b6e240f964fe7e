"""MMBench multiple-choice evaluation: prompt, rule-based choice extraction, CircularEval, loaders.

CircularEval: a question with N options is asked N times with the options rotated; the dev
split stores rotation k of question ``i`` at index ``i + k * 1_000_000``. A question counts
correct only if every rotation is answered correctly.

Schemas read here (one row per asked question, rotations included where the file has them):

* Official TSV (``MMBench_DEV_EN.tsv``): ``index: int``, ``question``, ``hint`` (empty for
  none), option columns ``A``, ``B``, ``C``, ``D`` (and ``E``; empty where the question has
  fewer options), ``answer`` (a letter; absent/empty on test splits), ``category``, ``image``
  (base64-encoded image, or, to save space, the decimal ``index`` of the row that holds it —
  any cell of <= 64 characters is such a reference, as in VLMEvalKit), plus optional
  ``source``, ``l2-category``, ``split``, ``comment``.
* Parquet (e.g. lmms-lab MMBench): the same columns; ``image`` as a ``struct<bytes, path>``,
  raw ``binary``, or a base64 string.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from vllm_expertflow.eval.vqav2 import (
    EASY_VQA_SHAPES,
    EASY_VQA_YES_NO,
    easy_vqa_kind,
    iter_parquet_rows,
    select_easy_vqa_questions,
)

if TYPE_CHECKING:
    from PIL import Image

ROTATION_STRIDE = 1_000_000
ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPTION_LETTERS = "ABCDE"
# VLMEvalKit's convention: an image cell this short cannot be an image, it names another row.
_MAX_IMAGE_REFERENCE_CHARS = 64


@dataclasses.dataclass
class MMBenchItem:
    """One asked MMBench question (a base question or one of its rotations).

    ``options`` maps consecutive letters from "A" to option text, in letter order. ``answer``
    is the correct letter, or None on test splits. ``hint`` is "" when the file has none.
    ``image`` holds the encoded image bytes (decoded lazily by :meth:`load_image`, for the same
    memory reason as ``vqav2.VQAItem``), or None if the row has no image.
    """

    index: int
    question: str
    hint: str
    options: dict[str, str]
    answer: str | None
    category: str
    image: bytes | None = None

    def __post_init__(self) -> None:
        letters = "".join(self.options)
        if not 2 <= len(letters) <= len(OPTION_LETTERS) or letters != OPTION_LETTERS[: len(letters)]:
            raise ValueError(
                f"index {self.index}: options must use consecutive letters from A (2..5 of {OPTION_LETTERS}), "
                f"got {list(self.options)}"
            )
        if self.answer is not None and self.answer not in self.options:
            raise ValueError(
                f"index {self.index}: answer {self.answer!r} is not one of the options {list(self.options)}"
            )

    def load_image(self) -> Image.Image:
        """Decode the image as an RGB ``PIL.Image.Image``."""
        from PIL import Image

        if self.image is None:
            raise ValueError(f"index {self.index} has no image")
        with Image.open(io.BytesIO(self.image)) as im:
            return im.convert("RGB")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value)


def build_prompt(item: MMBenchItem) -> str:
    """MMBench prompt: ``"{hint} {question} Options:\\nA. ..\\nB. ..\\n" + ANSWER_INSTRUCTION``.

    The hint and its separating space are omitted when the hint is empty, blank or NaN.
    """
    hint = "" if _missing(item.hint) else str(item.hint).strip()
    head = f"{hint} {item.question}" if hint else item.question
    lines = [f"{head} Options:"] + [f"{letter}. {text}" for letter, text in item.options.items()]
    return "\n".join(lines) + "\n" + ANSWER_INSTRUCTION


# ---------------------------------------------------------------------------------------------
# Choice extraction
# ---------------------------------------------------------------------------------------------

# A standalone letter, allowing trailing sentence punctuation ("B", "B,", "B!").
_BARE = re.compile(r"([A-E])[,;!?]*")
# A letter wrapped as "(B)", "B.", "B)" or "B:", optionally followed by sentence punctuation.
_WRAPPED = re.compile(r"\(([A-E])\)[.,:;!?]*|([A-E])[.):][.,;!?]*")


def _is_article(tokens: Sequence[str], i: int) -> bool:
    # "A red circle": a capital A opening a sentence before a lowercase word reads as the article;
    # "The answer is A because ..." keeps A as a letter (not sentence-initial).
    starts_sentence = i == 0 or tokens[i - 1][-1] in ".!?"
    return tokens[i] == "A" and starts_sentence and i + 1 < len(tokens) and tokens[i + 1][:1].islower()


def extract_choice(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-text ``prediction`` names, or None if none can be told.

    Rules, first decisive one wins:

    1. Letters among ``options`` written as standalone words ("B", "B,", "The answer is B"):
       exactly one such letter, and no *different* letter in a wrapped form, -> that letter.
       A sentence-initial "A" before a lowercase word ("A red circle") may be the article: it is
       counted as a letter when another letter also appears ("A or B"), and otherwise only
       after rule 3 found no option text ("A because ..." -> A; "A circle" -> circle's letter).
    2. Else letters among ``options`` in wrapped forms ``A.`` ``(A)`` ``A)`` ``A:``: exactly one
       -> that letter.
    3. Else option texts found in the prediction (case-insensitive, whole words): exactly one
       option -> its letter. An occurrence inside a longer option's occurrence does not count,
       so "dark red" names "dark red", not also "red".
    4. Else None (scored as wrong). Two letters ("A or B") with no decisive text are None.

    Raises:
        ValueError: if an option key is not a single letter A-E.
    """
    for key in options:
        if not (isinstance(key, str) and len(key) == 1 and key in OPTION_LETTERS):
            raise ValueError(f"option keys must be single letters from {OPTION_LETTERS}, got {key!r}")
    tokens = prediction.split()
    bare: set[str] = set()
    wrapped: set[str] = set()
    article_a = False
    for i, token in enumerate(tokens):
        m = _BARE.fullmatch(token)
        if m and m.group(1) in options:
            if _is_article(tokens, i):
                article_a = True
            else:
                bare.add(m.group(1))
            continue
        m = _WRAPPED.fullmatch(token)
        if m and (m.group(1) or m.group(2)) in options:
            wrapped.add(m.group(1) or m.group(2))
    if article_a and (bare or wrapped):
        bare.add("A")
    if len(bare) == 1 and wrapped <= bare:
        return next(iter(bare))
    if not bare and len(wrapped) == 1:
        return next(iter(wrapped))
    named = _options_named(prediction, options)
    if len(named) == 1:
        return next(iter(named))
    if not named and article_a and not (bare or wrapped):
        return "A"
    return None


def _options_named(prediction: str, options: Mapping[str, str]) -> set[str]:
    """Letters whose option text occurs as whole words, not only inside a longer option's occurrence."""
    lowered = prediction.lower()
    spans: dict[str, list[tuple[int, int]]] = {}
    for letter, text in options.items():
        needle = str(text).strip().lower()
        if needle:
            pattern = r"(?<!\w)" + re.escape(needle) + r"(?!\w)"
            spans[letter] = [(m.start(), m.end()) for m in re.finditer(pattern, lowered)]
    named: set[str] = set()
    for letter, own in spans.items():
        others = [s for other, ss in spans.items() if other != letter for s in ss]
        for start, end in own:
            inside_longer = any(o0 <= start and end <= o1 and o1 - o0 > end - start for o0, o1 in others)
            if not inside_longer:
                named.add(letter)
                break
    return named


def is_correct(prediction: str, item: MMBenchItem) -> bool:
    """Whether ``prediction`` names ``item.answer`` under :func:`extract_choice`.

    Raises:
        ValueError: if the item has no answer (test split).
    """
    if item.answer is None:
        raise ValueError(f"index {item.index} has no answer to score against (test split?)")
    return extract_choice(prediction, item.options) == item.answer


# ---------------------------------------------------------------------------------------------
# CircularEval
# ---------------------------------------------------------------------------------------------


def circular_rotations(item: MMBenchItem) -> list[MMBenchItem]:
    """The N rotations of a base question with N options, rotation 0 (the item itself) first.

    Rotation k moves option text ``i`` to letter ``(i - k) mod N`` (so the text that was at "B"
    is at "A" in rotation 1), updates the answer letter, and gets index
    ``item.index + k * 1_000_000`` as in the MMBench dev split. Every other field is shared.

    Raises:
        ValueError: if ``item.index`` is not a base index (0 <= index < 1_000_000).
    """
    if not 0 <= item.index < ROTATION_STRIDE:
        raise ValueError(
            f"index {item.index} is not a base index; rotate only rows with 0 <= index < {ROTATION_STRIDE}"
        )
    texts = list(item.options.values())
    n = len(texts)
    answer_pos = None if item.answer is None else OPTION_LETTERS.index(item.answer)
    out = []
    for k in range(n):
        options = {OPTION_LETTERS[i]: texts[(i + k) % n] for i in range(n)}
        answer = None if answer_pos is None else OPTION_LETTERS[(answer_pos - k) % n]
        out.append(dataclasses.replace(item, index=item.index + k * ROTATION_STRIDE, options=options, answer=answer))
    return out


def circular_eval(records: Iterable[tuple[int, bool]] | Mapping[int, bool]) -> float:
    """CircularEval accuracy: the fraction of questions whose every asked row is correct.

    Args:
        records: ``(index, correct)`` per asked row, or a mapping ``index -> correct``; rows are
            grouped by ``index % 1_000_000``. A rotation missing from ``records`` is not
            detected, so pass every row of the split.

    Raises:
        ValueError: if ``records`` is empty or an index appears twice.
    """
    pairs = records.items() if isinstance(records, Mapping) else records
    seen: set[int] = set()
    group_ok: dict[int, bool] = {}
    for index, correct in pairs:
        index = int(index)
        if index in seen:
            raise ValueError(f"index {index} appears twice in records; each asked row must be scored once")
        seen.add(index)
        base = index % ROTATION_STRIDE
        group_ok[base] = group_ok.get(base, True) and bool(correct)
    if not group_ok:
        raise ValueError("records is empty; nothing to evaluate")
    return sum(group_ok.values()) / len(group_ok)


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------


def _decode_base64_image(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{where}: image cell is not valid base64 ({exc})") from exc


def _items_from_rows(rows: Sequence[Mapping[str, Any]], source: str) -> list[MMBenchItem]:
    if not rows:
        return []
    required = ["index", "question", "A", "B"]
    missing = [c for c in required if c not in rows[0]]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; the file has {sorted(rows[0])}")

    raw_images: dict[int, Any] = {}
    for r in rows:
        index = int(r["index"])
        if index in raw_images:
            raise ValueError(f"{source}: index {index} appears twice; every row needs its own index")
        raw_images[index] = r.get("image")

    def image_of(index: int, where: str, follow: bool = True) -> bytes | None:
        cell = raw_images[index]
        if isinstance(cell, Mapping):
            cell = cell.get("bytes")
        if _missing(cell):
            return None
        if isinstance(cell, (bytes, bytearray, memoryview)):
            return bytes(cell)
        text = str(cell).strip()
        if len(text) > _MAX_IMAGE_REFERENCE_CHARS:
            return _decode_base64_image(text, where)
        # Only one hop: the referenced row must hold the image itself, as in the official files.
        ref = int(text) if text.isdigit() else None
        if follow and ref is not None and ref != index and ref in raw_images:
            try:
                resolved = image_of(ref, where, follow=False)
            except ValueError:
                resolved = None
            if resolved is not None:
                return resolved
        raise ValueError(f"{where}: image cell {text!r} is neither base64 image data nor the index of a row with one")

    items = []
    for r in rows:
        index = int(r["index"])
        where = f"{source} index {index}"
        options = {}
        for letter in OPTION_LETTERS:
            value = r.get(letter)
            if not _missing(value):
                options[letter] = str(value)
        answer = r.get("answer")
        hint = r.get("hint")
        category = r.get("category")
        items.append(
            MMBenchItem(
                index=index,
                question=str(r["question"]),
                hint="" if _missing(hint) else str(hint),
                options=options,
                answer=None if _missing(answer) else str(answer).strip(),
                category="" if _missing(category) else str(category),
                image=image_of(index, where),
            )
        )
    return items


def load_tsv(path: str | Path) -> list[MMBenchItem]:
    """Read an official MMBench TSV (see module docstring) into :class:`MMBenchItem` s, in file order.

    Only empty cells count as missing: pandas' default would also turn option texts such as
    "None" or "NA" into NaN and drop real options.

    Raises:
        ValueError: on a missing column, an answer that is not an option, or a bad image cell.
    """
    import pandas as pd

    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=[""])
    rows = [{k: (None if isinstance(v, float) else v) for k, v in rec.items()} for rec in df.to_dict("records")]
    return _items_from_rows(rows, str(path))


def load_parquet(path: str | Path) -> list[MMBenchItem]:
    """Read MMBench rows from parquet (same columns as the TSV; image as struct, binary or base64).

    Raises:
        ValueError: on a missing column, an answer that is not an option, or a bad image cell.
    """
    optional = ["hint", "C", "D", "E", "answer", "category", "image"]
    rows = list(iter_parquet_rows(path, ["index", "question", "A", "B"], optional=optional))
    return _items_from_rows(rows, str(path))


# ---------------------------------------------------------------------------------------------
# easy-vqa conversion
# ---------------------------------------------------------------------------------------------


def easy_vqa_options(answer: str, vocabulary: Sequence[str], rng: random.Random) -> list[str]:
    """Four distinct options: ``answer`` plus 3 distractors, shuffled by ``rng``.

    Distractors come from ``answer``'s own kind first (other colours for a colour; the other
    shapes for a shape; "yes"/"no" for yes/no) and are topped up from the rest of the
    vocabulary when the kind has fewer than 3 other members.

    Raises:
        ValueError: if ``answer`` is not in ``vocabulary`` or the vocabulary has < 4 answers.
    """
    if answer not in vocabulary:
        raise ValueError(f"answer {answer!r} is not in the vocabulary {sorted(vocabulary)}")
    if len(set(vocabulary)) < 4:
        raise ValueError(f"need >= 4 distinct answers to build 4 options, got {sorted(set(vocabulary))}")
    kind = easy_vqa_kind(answer)
    same = sorted(a for a in set(vocabulary) if a != answer and easy_vqa_kind(a) == kind)
    other = sorted(a for a in set(vocabulary) if easy_vqa_kind(a) != kind)
    picked = rng.sample(same, min(3, len(same)))
    picked += rng.sample(other, 3 - len(picked))
    options = [answer, *picked]
    rng.shuffle(options)
    return options


def write_easy_vqa_mmbench(
    path: str | Path,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    fmt: Literal["tsv", "parquet"] = "tsv",
) -> int:
    """Write an easy-vqa split as an MMBench-style file with CircularEval rotations; returns the row count.

    Each selected question (:func:`vqav2.select_easy_vqa_questions`) becomes a base row at
    ``index`` = its position in the split, with 4 options from :func:`easy_vqa_options` (seeded
    per question from ``(seed, split, index)``, so a question's options do not depend on
    ``limit``), followed by its 3 rotations at ``index + k * 1_000_000``. ``category`` is the
    answer kind ("yes/no", "color", "shape"); ``hint`` is empty.

    In TSV the base row carries the base64 PNG and the rotations reference it by index (the
    official convention); in parquet every row carries the PNG bytes.

    Raises:
        ValueError: on a bad ``fmt``, ``split`` or ``limit``.
    """
    if fmt not in ("tsv", "parquet"):
        raise ValueError(f"fmt must be 'tsv' or 'parquet', got {fmt!r}")
    import easy_vqa
    import pandas as pd

    vocabulary = easy_vqa.get_answers()
    if not (EASY_VQA_YES_NO | EASY_VQA_SHAPES) <= set(vocabulary):
        raise ValueError(f"easy-vqa vocabulary {vocabulary} lacks the expected yes/no and shape answers")
    image_bytes: dict[int, bytes] = {}
    rows = []
    for q in select_easy_vqa_questions(split, limit, seed):
        if q.image_id not in image_bytes:
            image_bytes[q.image_id] = q.image_path.read_bytes()
        rng = random.Random(f"easy-vqa-mmbench:{seed}:{split}:{q.index}")
        texts = easy_vqa_options(q.answer, vocabulary, rng)
        base = MMBenchItem(
            index=q.index,
            question=q.question,
            hint="",
            options=dict(zip(OPTION_LETTERS[: len(texts)], texts, strict=True)),
            answer=OPTION_LETTERS[texts.index(q.answer)],
            category=easy_vqa_kind(q.answer),
        )
        for rot in circular_rotations(base):
            if fmt == "parquet":
                image: str | bytes = image_bytes[q.image_id]
            elif rot.index == base.index:
                image = base64.b64encode(image_bytes[q.image_id]).decode("ascii")
            else:
                image = str(base.index)
            rows.append(
                {
                    "index": rot.index,
                    "question": rot.question,
                    "hint": None,
                    **rot.options,
                    "answer": rot.answer,
                    "category": rot.category,
                    "image": image,
                    "source": "easy-vqa",
                    "split": split,
                }
            )
    columns = ["index", "question", "hint", *OPTION_LETTERS[:4], "answer", "category", "image", "source", "split"]
    df = pd.DataFrame(rows, columns=columns)
    df["hint"] = df["hint"].astype("string")
    if fmt == "tsv":
        df.to_csv(path, sep="\t", index=False)
    else:
        df.to_parquet(path, index=False)
    return len(df)
