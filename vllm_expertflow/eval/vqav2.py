"""VQAv2 accuracy (official soft score), loaders for the published schemas, and an easy-vqa converter.

Metric (official VQA evaluation script, ``vqaEval.py``): prediction and human answers are
normalised with :func:`normalize_answer`; for each of the 10 human answers the prediction
scores ``min(1, matches among the other 9 / 3)``; the question's accuracy is the mean of
those 10 values.

Schemas read here:

* lmms-lab VQAv2 parquet (Hugging Face ``datasets`` export): one row per question with
  ``question_id: int``, ``question: str``, ``answers: list<struct<answer: str, answer_confidence: str,
  answer_id: int>>`` (a plain ``list<str>`` is accepted too; null on test splits) and
  ``image: struct<bytes: binary, path: str>`` (raw ``binary`` accepted too); other columns
  (``image_id``, ``multiple_choice_answer``, ``answer_type``, ...) are optional.
* Official VQAv2 JSON: ``v2_OpenEnded_mscoco_<subtype>_questions.json`` with
  ``{"data_subtype": "val2014", "questions": [{"question_id", "image_id", "question"}]}`` and
  ``v2_mscoco_<subtype>_annotations.json`` with ``{"annotations": [{"question_id", "image_id",
  "answers": [{"answer", "answer_confidence", "answer_id"}], "multiple_choice_answer", ...}]}``;
  images are COCO files ``COCO_<subtype>_<image_id:012d>.jpg``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

VQA_PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."

# Tables copied from the official vqaEval.py. Keys with capitals ("Im", "Ive", "Id've") can never
# match because words are lowercased first; kept verbatim so scores equal the official ones.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
# "none" -> "0" is in the official map too: "none" answers count questions.
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a mistyped lookbehind that never
# rejects anything, so the effective rule is "a period not followed by a digit".
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def normalize_answer(text: str) -> str:
    """Official VQAv2 answer normalisation.

    Steps, in the official order: newlines/tabs -> spaces and strip; for each punctuation
    character in ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: if it occurs next to a space
    anywhere in the text, or the text holds a digit-comma-digit anywhere, every occurrence is
    deleted, otherwise every occurrence becomes a space; periods not followed by a digit are
    removed (``3.5`` keeps its period); lowercase; number words ``none/zero..ten`` -> digits;
    articles ``a an the`` dropped; contractions fixed (``dont`` -> ``don't``); whitespace collapsed.

    Note the official script applies the rule per character over the whole text and limits the
    period substitution to 32 occurrences (it passes ``re.UNICODE`` as ``count``); the latter
    is not copied since no short answer holds 32 periods.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in _PUNCT:
        if delete_all or (p + " " in text or " " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_NOT_BEFORE_DIGIT.sub("", out)
    words = []
    for word in out.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def score(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy of ``prediction`` against the human ``answers`` (10 in VQAv2).

    For each answer j: ``min(1, #{i != j : answers[i] == prediction} / 3)``; the result is the
    mean over j, after normalising both sides. With 10 answers of which k equal the prediction
    this gives 0, 0.3, 0.6, 0.9, 1.0 for k = 0, 1, 2, 3, >=4.

    Both sides are always normalised (the official script skips the answers when all 10 agree;
    the stored official answers are already normalised, so the result is the same).

    Any number of answers >= 1 is accepted. With exactly one answer there are no "other"
    answers, so the score is defined as 1.0 if it equals the prediction, else 0.0. With 2..3
    answers the formula is applied as is and cannot reach 1.0 (e.g. 2 equal answers -> 1/3).

    Raises:
        ValueError: if ``answers`` is empty (test splits have no answers).
    """
    if isinstance(answers, str):
        raise TypeError(f"answers must be a sequence of strings, got the string {answers!r}")
    if len(answers) == 0:
        raise ValueError("answers is empty; need >= 1 human answer (test splits carry none)")
    pred = normalize_answer(prediction)
    norm = [normalize_answer(a) for a in answers]
    if len(norm) == 1:
        return 1.0 if norm[0] == pred else 0.0
    total_matches = Counter(norm)[pred]
    per_answer = [min(1.0, (total_matches - (1 if a == pred else 0)) / 3.0) for a in norm]
    return sum(per_answer) / len(per_answer)


def build_prompt(question: str) -> str:
    """Prompt used by common harnesses (lmms-eval): the question plus the short-answer instruction."""
    return question + VQA_PROMPT_SUFFIX


@dataclasses.dataclass
class VQAItem:
    """One VQAv2 question.

    ``image`` holds the *encoded* image (PNG/JPEG bytes) or the path of the image file, never a
    decoded picture: a full val split decoded would need tens of GB, encoded bytes or a path cost
    little. :meth:`load_image` decodes on demand.
    """

    question_id: int
    question: str
    answers: list[str]  # 10 human answers in VQAv2; empty on test splits
    image: bytes | Path
    image_id: int | None = None

    def load_image(self) -> Image.Image:
        """Decode the image as an RGB ``PIL.Image.Image``."""
        from PIL import Image

        if isinstance(self.image, Path):
            with Image.open(self.image) as im:
                return im.convert("RGB")
        with Image.open(io.BytesIO(self.image)) as im:
            return im.convert("RGB")


def evaluate(items: Sequence[VQAItem], predictions: Mapping[int, str]) -> float:
    """Mean :func:`score` over ``items``; ``predictions`` maps question_id -> predicted answer.

    Raises:
        ValueError: if ``items`` is empty or a question has no prediction.
    """
    if not items:
        raise ValueError("items is empty; nothing to evaluate")
    total = 0.0
    for item in items:
        if item.question_id not in predictions:
            raise ValueError(f"no prediction for question_id {item.question_id}")
        total += score(predictions[item.question_id], item.answers)
    return total / len(items)


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------


def _parquet_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no *.parquet file in directory {p}")
        return files
    if not p.is_file():
        raise FileNotFoundError(f"parquet file or directory {p} does not exist")
    return [p]


def iter_parquet_rows(path: str | Path, columns: Sequence[str], optional: Sequence[str] = ()) -> Iterator[dict]:
    """Rows of a parquet file (or every ``*.parquet`` of a directory, sorted) as plain dicts.

    Reads in record batches so a multi-GB image parquet is never held as one table. Only
    ``columns`` (required) and those of ``optional`` that exist are read.

    Raises:
        ValueError: naming the missing required columns and the ones the file has.
    """
    import pyarrow.parquet as pq

    for file in _parquet_files(path):
        pf = pq.ParquetFile(file)
        names = set(pf.schema_arrow.names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{file}: missing column(s) {missing}; the file has {sorted(names)}")
        wanted = list(columns) + [c for c in optional if c in names and c not in columns]
        for batch in pf.iter_batches(batch_size=256, columns=wanted):
            yield from batch.to_pylist()


def _answer_strings(cell: Any, where: str) -> list[str]:
    if cell is None:
        return []
    out = []
    for a in cell:
        if isinstance(a, Mapping):
            if "answer" not in a:
                raise ValueError(f"{where}: answer entry {a!r} has no 'answer' key")
            out.append(str(a["answer"]))
        elif isinstance(a, str):
            out.append(a)
        else:
            raise ValueError(f"{where}: answer entry {a!r} is neither a dict with 'answer' nor a string")
    return out


def _image_cell(cell: Any, where: str) -> bytes | Path:
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell)
    if isinstance(cell, Mapping):
        if cell.get("bytes") is not None:
            return bytes(cell["bytes"])
        if cell.get("path"):
            return Path(cell["path"])
    raise ValueError(f"{where}: image cell must be bytes or a dict with 'bytes' (or 'path'), got {type(cell).__name__}")


def load_lmms_parquet(path: str | Path, limit: int | None = None) -> list[VQAItem]:
    """Read the lmms-lab VQAv2 parquet schema (see module docstring) into :class:`VQAItem` s.

    Args:
        path: a parquet file, or a directory whose ``*.parquet`` shards are read in name order.
        limit: stop after this many questions (None: all).

    Raises:
        ValueError: on a missing column or a malformed answers/image cell (the message names the question).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be None or >= 1, got {limit}")
    items: list[VQAItem] = []
    for row in iter_parquet_rows(path, ["question_id", "question", "answers", "image"], optional=["image_id"]):
        where = f"{path} question_id {row['question_id']}"
        image_id = row.get("image_id")
        items.append(
            VQAItem(
                question_id=int(row["question_id"]),
                question=str(row["question"]),
                answers=_answer_strings(row["answers"], where),
                image=_image_cell(row["image"], where),
                image_id=None if image_id is None else int(image_id),
            )
        )
        if limit is not None and len(items) >= limit:
            break
    return items


def coco_image_name(image_id: int, subtype: str = "val2014") -> str:
    """COCO 2014 file name, e.g. ``coco_image_name(42) == "COCO_val2014_000000000042.jpg"``."""
    return f"COCO_{subtype}_{int(image_id):012d}.jpg"


def load_official_json(
    questions_json: str | Path, annotations_json: str | Path | None, image_dir: str | Path
) -> list[VQAItem]:
    """Read the official VQAv2 questions + annotations JSON (see module docstring).

    Images are looked up in ``image_dir`` as ``COCO_<data_subtype>_<image_id:012d>.jpg``
    (``data_subtype`` from the questions file, default ``val2014``), falling back to the COCO
    2017 name ``<image_id:012d>.jpg``. Paths are checked here but files are read lazily.

    Args:
        annotations_json: None for test splits (items then have no answers).

    Raises:
        FileNotFoundError: if an image is missing (the message lists the names tried).
        ValueError: if the questions file has no "questions" list or a question has no annotation.
    """
    qdoc = json.loads(Path(questions_json).read_text())
    if not isinstance(qdoc, Mapping) or not isinstance(qdoc.get("questions"), list):
        raise ValueError(f"{questions_json}: expected a JSON object with a 'questions' list")
    subtype = str(qdoc.get("data_subtype") or "val2014")
    answers_by_qid: dict[int, list[str]] | None = None
    if annotations_json is not None:
        adoc = json.loads(Path(annotations_json).read_text())
        if not isinstance(adoc, Mapping) or not isinstance(adoc.get("annotations"), list):
            raise ValueError(f"{annotations_json}: expected a JSON object with an 'annotations' list")
        answers_by_qid = {
            int(a["question_id"]): _answer_strings(a["answers"], f"{annotations_json} question_id {a['question_id']}")
            for a in adoc["annotations"]
        }
    image_dir = Path(image_dir)
    items = []
    for q in qdoc["questions"]:
        qid, image_id = int(q["question_id"]), int(q["image_id"])
        if answers_by_qid is None:
            answers = []
        elif qid in answers_by_qid:
            answers = answers_by_qid[qid]
        else:
            raise ValueError(f"question_id {qid} of {questions_json} has no annotation in {annotations_json}")
        candidates = [image_dir / coco_image_name(image_id, subtype), image_dir / f"{image_id:012d}.jpg"]
        image = next((c for c in candidates if c.is_file()), None)
        if image is None:
            raise FileNotFoundError(f"image of question_id {qid} not found; tried {[str(c) for c in candidates]}")
        items.append(
            VQAItem(question_id=qid, question=str(q["question"]), answers=answers, image=image, image_id=image_id)
        )
    return items


# ---------------------------------------------------------------------------------------------
# easy-vqa conversion
# ---------------------------------------------------------------------------------------------

EASY_VQA_SHAPES = frozenset({"circle", "rectangle", "triangle"})
EASY_VQA_YES_NO = frozenset({"yes", "no"})


@dataclasses.dataclass(frozen=True)
class EasyVQAQuestion:
    """One easy-vqa question; ``index`` is its position in the split's question list."""

    index: int
    question: str
    answer: str
    image_id: int
    image_path: Path


def easy_vqa_kind(answer: str) -> str:
    """Answer kind of an easy-vqa answer: ``"yes/no"``, ``"shape"`` or ``"color"``."""
    if answer in EASY_VQA_YES_NO:
        return "yes/no"
    if answer in EASY_VQA_SHAPES:
        return "shape"
    return "color"


def select_easy_vqa_questions(split: str = "test", limit: int | None = None, seed: int = 0) -> list[EasyVQAQuestion]:
    """Questions of an easy-vqa split, all or a seeded sample of ``limit``, in split order.

    The sample is ``random.Random(seed).sample`` over question positions, so the same
    ``(split, limit, seed)`` always selects the same questions; ``limit`` above the split size
    selects all.

    Raises:
        ValueError: if ``split`` is not "train"/"test" or ``limit`` < 1.
    """
    import easy_vqa

    if split == "test":
        texts, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    elif split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be None or >= 1, got {limit}")
    positions = range(len(texts))
    if limit is not None and limit < len(texts):
        positions = sorted(random.Random(seed).sample(range(len(texts)), limit))
    return [
        EasyVQAQuestion(i, texts[i], answers[i], int(image_ids[i]), Path(paths[int(image_ids[i])])) for i in positions
    ]


def write_easy_vqa_lmms_parquet(path: str | Path, split: str = "test", limit: int | None = None, seed: int = 0) -> int:
    """Write an easy-vqa split in the lmms-lab VQAv2 parquet schema; returns the row count.

    Each question's single answer is repeated as the 10 human answers (so an exact answer scores
    1.0 and anything else 0.0); ``question_id`` is the question's position in the split,
    ``image`` holds the PNG file's bytes, ``answer_type`` is "yes/no" or "other" as in VQAv2.
    Questions are selected by :func:`select_easy_vqa_questions`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("question_id", pa.int64()),
            ("question", pa.string()),
            ("image_id", pa.int64()),
            ("answer_type", pa.string()),
            ("multiple_choice_answer", pa.string()),
            (
                "answers",
                pa.list_(
                    pa.struct([("answer", pa.string()), ("answer_confidence", pa.string()), ("answer_id", pa.int64())])
                ),
            ),
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ]
    )
    image_bytes: dict[int, bytes] = {}
    rows = []
    for q in select_easy_vqa_questions(split, limit, seed):
        if q.image_id not in image_bytes:
            image_bytes[q.image_id] = q.image_path.read_bytes()
        rows.append(
            {
                "question_id": q.index,
                "question": q.question,
                "image_id": q.image_id,
                "answer_type": "yes/no" if q.answer in EASY_VQA_YES_NO else "other",
                "multiple_choice_answer": q.answer,
                "answers": [{"answer": q.answer, "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)],
                "image": {"bytes": image_bytes[q.image_id], "path": f"{q.image_id}.png"},
            }
        )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), Path(path))
    return len(rows)
