"""VQAv2 metric, loaders and easy-vqa converter; expected values worked out by hand from the official rules."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vllm_expertflow.eval import vqav2
from vllm_expertflow.eval.vqav2 import normalize_answer, score

# ----------------------------------------------------------------------------------------------
# normalize_answer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # whitespace: tabs/newlines -> spaces, collapsed
        ("\tYes\n", "yes"),
        ("left\nright", "left right"),
        # punctuation next to a space is deleted; elsewhere it becomes a space
        ("red, blue", "red blue"),
        ("red,blue", "red blue"),
        ("hello-world", "hello world"),
        ("yes!", "yes"),
        ("what?!", "what"),
        # "(" is preceded by a space -> deleted; ")" touches no space -> space
        ("red (approx)", "red approx"),
        # digit-comma-digit anywhere deletes every punctuation character, so "a-b" is not split
        ("1,000", "1000"),
        ("a-b 1,2", "ab 12"),
        # ...while without it "-" becomes a space and the lone "a" is then dropped as an article
        ("a-b", "b"),
        # periods: removed unless followed by a digit
        ("Yes.", "yes"),
        ("3.5", "3.5"),
        ("3.5.", "3.5"),
        ("e.g. yes", "eg yes"),
        # characters outside the official list are kept (colon, apostrophe)
        ("ratio: 2", "ratio: 2"),
        ("it's", "it's"),
        # number words zero..ten (and "none") -> digits, others untouched
        ("Two", "2"),
        ("ten dogs", "10 dogs"),
        ("none", "0"),
        ("eleven", "eleven"),
        # articles dropped as whole words only
        ("The cat", "cat"),
        ("an apple a day", "apple day"),
        ("theater", "theater"),
        # contractions (after lowercasing)
        ("dont", "don't"),
        ("Isnt it", "isn't it"),
        ("youre", "you're"),
        # the official table's capitalised keys never match after lowercasing
        ("Im", "im"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


# ----------------------------------------------------------------------------------------------
# score
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("matches", "expected"),
    # k matching of 10: k answers see k-1 other matches, 10-k see k:
    # k=1: (1*0 + 9*1/3)/10 = 0.3; k=2: (2*1/3 + 8*2/3)/10 = 0.6; k=3: (3*2/3 + 7*1)/10 = 0.9; k>=4: 1.
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)],
)
def test_score_ten_answers(matches: int, expected: float) -> None:
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert score("cat", answers) == pytest.approx(expected, abs=1e-12)


def test_score_normalises_both_sides() -> None:
    assert score("Two.", ["2"] * 10) == 1.0
    assert score("2", ["two"] * 10) == 1.0
    assert score("The dog", ["dog"] * 2 + ["a cat"] * 8) == pytest.approx(0.6, abs=1e-12)
    assert score("cat", ["dog"] * 2 + ["a cat"] * 8) == 1.0


def test_score_few_answers() -> None:
    assert score("yes", ["Yes"]) == 1.0
    assert score("no", ["yes"]) == 0.0
    # two equal answers: each sees one match among the others -> 1/3 (documented, not capped to 1)
    assert score("yes", ["yes", "yes"]) == pytest.approx(1 / 3, abs=1e-12)


def test_score_rejects_empty_or_string_answers() -> None:
    with pytest.raises(ValueError, match="empty"):
        score("yes", [])
    with pytest.raises(TypeError, match="string"):
        score("yes", "yes")


def _official_loop(pred: str, answers: list[str]) -> float:
    # the official per-answer loop, excluding answer j by position
    accs = []
    for j in range(len(answers)):
        others = [a for i, a in enumerate(answers) if i != j]
        accs.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(accs) / len(accs)


def test_score_matches_official_loop_on_random_answer_sets() -> None:
    rng = random.Random(0)
    vocab = ["yes", "no", "2", "red", "blue"]
    for _ in range(200):
        answers = [rng.choice(vocab) for _ in range(10)]
        pred = rng.choice(vocab)
        assert score(pred, answers) == pytest.approx(_official_loop(pred, answers), abs=1e-12)


def test_evaluate_and_prompt() -> None:
    items = [
        vqav2.VQAItem(1, "q1", ["cat"] * 10, b""),
        vqav2.VQAItem(2, "q2", ["cat"] * 2 + ["dog"] * 8, b""),
    ]
    assert vqav2.evaluate(items, {1: "cat", 2: "cat"}) == pytest.approx((1.0 + 0.6) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="question_id 2"):
        vqav2.evaluate(items, {1: "cat"})
    assert vqav2.build_prompt("What color?") == "What color?\nAnswer the question using a single word or phrase."


# ----------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------


def _png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


_LMMS_SCHEMA = pa.schema(
    [
        ("question_type", pa.string()),
        ("multiple_choice_answer", pa.string()),
        (
            "answers",
            pa.list_(
                pa.struct([("answer", pa.string()), ("answer_confidence", pa.string()), ("answer_id", pa.int64())])
            ),
        ),
        ("image_id", pa.int64()),
        ("answer_type", pa.string()),
        ("question_id", pa.int64()),
        ("question", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ]
)


def _lmms_row(qid: int, question: str, answers: list[str] | None, image: bytes) -> dict:
    return {
        "question_type": "what",
        "multiple_choice_answer": answers[0] if answers else None,
        "answers": None
        if answers is None
        else [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
        "image_id": qid // 1000,
        "answer_type": "other",
        "question_id": qid,
        "question": question,
        "image": {"bytes": image, "path": None},
    }


def test_load_lmms_parquet_struct_schema(tmp_path: Path) -> None:
    red, blue = _png((8, 6), (255, 0, 0)), _png((4, 4), (0, 0, 255))
    answers = ["red"] * 9 + ["pink"]
    rows = [_lmms_row(262148000, "What color?", answers, red), _lmms_row(262148001, "Test?", None, blue)]
    pq.write_table(pa.Table.from_pylist(rows, schema=_LMMS_SCHEMA), tmp_path / "val.parquet")

    items = vqav2.load_lmms_parquet(tmp_path / "val.parquet")
    assert [i.question_id for i in items] == [262148000, 262148001]
    assert items[0].question == "What color?"
    assert items[0].answers == answers
    assert items[0].image_id == 262148
    assert items[0].image == red
    assert items[0].load_image().size == (8, 6)
    assert items[0].load_image().getpixel((0, 0)) == (255, 0, 0)
    assert items[1].answers == []  # test split: no answers
    assert len(vqav2.load_lmms_parquet(tmp_path / "val.parquet", limit=1)) == 1


def test_load_lmms_parquet_plain_lists_and_shard_directory(tmp_path: Path) -> None:
    img = _png((2, 2), (0, 255, 0))
    schema = pa.schema(
        [
            ("question_id", pa.int64()),
            ("question", pa.string()),
            ("answers", pa.list_(pa.string())),
            ("image", pa.binary()),
        ]
    )
    shards = tmp_path / "shards"
    shards.mkdir()
    # written out of name order: the loader must read shards sorted by name
    pq.write_table(
        pa.Table.from_pylist([{"question_id": 2, "question": "b", "answers": ["x"], "image": img}], schema),
        shards / "validation-00001.parquet",
    )
    pq.write_table(
        pa.Table.from_pylist([{"question_id": 1, "question": "a", "answers": ["y", "z"], "image": img}], schema),
        shards / "validation-00000.parquet",
    )
    items = vqav2.load_lmms_parquet(shards)
    assert [(i.question_id, i.question, i.answers) for i in items] == [(1, "a", ["y", "z"]), (2, "b", ["x"])]
    assert items[0].image == img and items[0].image_id is None


def test_load_lmms_parquet_errors(tmp_path: Path) -> None:
    pq.write_table(pa.table({"question_id": [1], "question": ["q"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['answers', 'image'\]"):
        vqav2.load_lmms_parquet(tmp_path / "bad.parquet")
    with pytest.raises(FileNotFoundError):
        vqav2.load_lmms_parquet(tmp_path / "nope.parquet")
    with pytest.raises(ValueError, match="limit"):
        vqav2.load_lmms_parquet(tmp_path / "bad.parquet", limit=0)


def _write_official(tmp_path: Path, with_missing_annotation: bool = False) -> tuple[Path, Path, Path]:
    image_dir = tmp_path / "val2014"
    image_dir.mkdir()
    Image.new("RGB", (10, 7), (9, 9, 9)).save(image_dir / "COCO_val2014_000000000042.jpg")
    Image.new("RGB", (5, 3), (9, 9, 9)).save(image_dir / "000000000043.jpg")  # COCO 2017 naming
    questions = {
        "info": {},
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "data_subtype": "val2014",
        "license": {},
        "questions": [
            {"image_id": 42, "question": "How many dogs?", "question_id": 42000},
            {"image_id": 43, "question": "Is it raining?", "question_id": 43001},
        ],
    }
    annotations = {
        "annotations": [
            {
                "question_id": 42000,
                "image_id": 42,
                "question_type": "how many",
                "answer_type": "number",
                "multiple_choice_answer": "2",
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                    for i, a in enumerate(["2"] * 8 + ["3", "two"])
                ],
            },
        ]
    }
    if not with_missing_annotation:
        annotations["annotations"].append(
            {
                "question_id": 43001,
                "image_id": 43,
                "answer_type": "yes/no",
                "multiple_choice_answer": "no",
                "answers": [{"answer": "no", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)],
            }
        )
    qpath, apath = tmp_path / "questions.json", tmp_path / "annotations.json"
    qpath.write_text(json.dumps(questions))
    apath.write_text(json.dumps(annotations))
    return qpath, apath, image_dir


def test_load_official_json(tmp_path: Path) -> None:
    qpath, apath, image_dir = _write_official(tmp_path)
    items = vqav2.load_official_json(qpath, apath, image_dir)
    assert [(i.question_id, i.image_id, i.question) for i in items] == [
        (42000, 42, "How many dogs?"),
        (43001, 43, "Is it raining?"),
    ]
    assert items[0].answers == ["2"] * 8 + ["3", "two"]
    assert items[0].image == image_dir / "COCO_val2014_000000000042.jpg"
    assert items[1].image == image_dir / "000000000043.jpg"
    assert items[0].load_image().size == (10, 7)
    # "two" normalises to "2": 9 matching answers -> 1.0
    assert score("two", items[0].answers) == 1.0
    # no annotations (test split): answers empty
    assert [i.answers for i in vqav2.load_official_json(qpath, None, image_dir)] == [[], []]


def test_load_official_json_errors(tmp_path: Path) -> None:
    qpath, apath, image_dir = _write_official(tmp_path, with_missing_annotation=True)
    with pytest.raises(ValueError, match="question_id 43001"):
        vqav2.load_official_json(qpath, apath, image_dir)
    (image_dir / "COCO_val2014_000000000042.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000042.jpg"):
        vqav2.load_official_json(qpath, None, image_dir)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="'questions' list"):
        vqav2.load_official_json(bad, None, image_dir)


# ----------------------------------------------------------------------------------------------
# easy-vqa converter
# ----------------------------------------------------------------------------------------------


def test_write_easy_vqa_lmms_parquet_round_trip(tmp_path: Path) -> None:
    import easy_vqa

    texts, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    out = tmp_path / "easy.parquet"
    assert vqav2.write_easy_vqa_lmms_parquet(out, split="test", limit=30, seed=1) == 30

    items = vqav2.load_lmms_parquet(out)
    assert len(items) == 30
    qids = [i.question_id for i in items]
    assert qids == sorted(set(qids))
    assert qids == [q.index for q in vqav2.select_easy_vqa_questions("test", 30, 1)]
    for item in items:
        # read back against the package's own data, not the converter's helper
        assert item.question == texts[item.question_id]
        assert item.answers == [answers[item.question_id]] * 10
        assert item.image_id == image_ids[item.question_id]
        assert item.image == Path(paths[item.image_id]).read_bytes()
        assert item.image[:8] == b"\x89PNG\r\n\x1a\n"
        assert score(answers[item.question_id], item.answers) == 1.0
    assert items[0].load_image().size == (64, 64)

    # the raw file carries the lmms-lab columns
    table = pq.read_table(out)
    assert {"question_id", "question", "answers", "image", "image_id", "answer_type"} <= set(table.column_names)
    assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])

    # same seed -> same questions; another seed -> another sample
    assert qids == [q.index for q in vqav2.select_easy_vqa_questions("test", 30, 1)]
    assert qids != [q.index for q in vqav2.select_easy_vqa_questions("test", 30, 2)]


def test_write_easy_vqa_lmms_parquet_full_split(tmp_path: Path) -> None:
    import easy_vqa

    n_questions = len(easy_vqa.get_test_questions()[0])
    assert vqav2.write_easy_vqa_lmms_parquet(tmp_path / "all.parquet") == n_questions
    assert pq.ParquetFile(tmp_path / "all.parquet").metadata.num_rows == n_questions


def test_select_easy_vqa_questions_errors() -> None:
    with pytest.raises(ValueError, match="'validation'"):
        vqav2.select_easy_vqa_questions("validation")
    with pytest.raises(ValueError, match="limit"):
        vqav2.select_easy_vqa_questions("test", limit=0)
