"""MMBench prompt, choice extraction, CircularEval, loaders and the easy-vqa converter."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vllm_expertflow.eval import mmbench
from vllm_expertflow.eval.mmbench import MMBenchItem, circular_eval, circular_rotations, extract_choice

OPTS = {"A": "circle", "B": "red", "C": "dark red", "D": "blue"}


def _png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _item(**kw) -> MMBenchItem:
    fields = {
        "index": 7,
        "question": "What color is the shape?",
        "hint": "",
        "options": {"A": "red", "B": "green", "C": "blue", "D": "gray"},
        "answer": "B",
        "category": "color",
    }
    fields.update(kw)
    return MMBenchItem(**fields)


# ----------------------------------------------------------------------------------------------
# prompt
# ----------------------------------------------------------------------------------------------


def test_build_prompt_with_and_without_hint() -> None:
    expected_tail = (
        " What color is the shape? Options:\nA. red\nB. green\nC. blue\nD. gray\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert mmbench.build_prompt(_item(hint="Look closely.")) == "Look closely." + expected_tail
    for empty in ("", "   ", math.nan, None):
        assert mmbench.build_prompt(_item(hint=empty)) == expected_tail[1:]
    two = _item(options={"A": "yes", "B": "no"}, answer="A")
    assert mmbench.build_prompt(two).endswith(
        "Options:\nA. yes\nB. no\nAnswer with the option's letter from the given choices directly."
    )


# ----------------------------------------------------------------------------------------------
# extract_choice
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        # rule 1: a standalone letter among the options
        ("B", "B"),
        ("  D\n", "D"),
        ("The answer is C", "C"),
        ("B. B is right", "B"),  # same letter bare and wrapped
        ("The answer is A because it is round", "A"),  # A mid-sentence is a letter
        ("B, because it is red", "B"),
        # rule 2: wrapped forms
        ("B.", "B"),
        ("(C)", "C"),
        ("D) blue", "D"),
        ("A: circle", "A"),
        ("Answer: (B).", "B"),
        # rule 3: exactly one option's text (case-insensitive, whole words)
        ("It is BLUE.", "D"),
        ("a circle", "A"),
        ("dark red", "C"),  # "red" inside the longer option "dark red" does not count
        # sentence-initial "A" before a lowercase word is the article, so text decides
        ("A circle.", "A"),
        ("A blue square", "D"),
        ("A because it is round", "A"),  # no option text follows, so A is the letter after all
        ("A red or blue thing", None),  # article reading: two option texts, no letter fallback
        # rule 4: nothing decisive
        ("I don't know", None),
        ("A or B", None),  # two standalone letters, no option text
        ("(B), not A", None),  # bare A conflicts with wrapped B
        ("red, not dark red", None),  # a free-standing "red" and "dark red": two options
        ("reddish", None),  # no whole-word match
        ("E", None),  # not among the options
        ("", None),
    ],
)
def test_extract_choice(prediction: str, expected: str | None) -> None:
    assert extract_choice(prediction, OPTS) == expected


def test_extract_choice_letters_only_count_when_they_are_options() -> None:
    five = {**OPTS, "E": "green"}
    assert extract_choice("E", five) == "E"
    assert extract_choice("(E)", five) == "E"
    assert extract_choice("E", OPTS) is None
    with pytest.raises(ValueError, match="'F'"):
        extract_choice("F", {"A": "x", "F": "y"})


def test_is_correct() -> None:
    item = _item()
    assert mmbench.is_correct("B", item)
    assert mmbench.is_correct("green", item)
    assert not mmbench.is_correct("A", item)
    assert not mmbench.is_correct("no idea", item)
    with pytest.raises(ValueError, match="index 7"):
        mmbench.is_correct("B", _item(answer=None))


def test_item_validation() -> None:
    with pytest.raises(ValueError, match="answer 'E'"):
        _item(answer="E")
    with pytest.raises(ValueError, match="consecutive letters"):
        _item(options={"A": "x", "C": "y"}, answer="A")
    with pytest.raises(ValueError, match="consecutive letters"):
        _item(options={"A": "x"}, answer="A")


# ----------------------------------------------------------------------------------------------
# CircularEval
# ----------------------------------------------------------------------------------------------


def test_circular_rotations() -> None:
    rots = circular_rotations(_item(options={"A": "w", "B": "x", "C": "y", "D": "z"}, answer="B"))
    assert [r.index for r in rots] == [7, 1_000_007, 2_000_007, 3_000_007]
    assert [list(r.options.values()) for r in rots] == [
        ["w", "x", "y", "z"],
        ["x", "y", "z", "w"],
        ["y", "z", "w", "x"],
        ["z", "w", "x", "y"],
    ]
    # the correct text "x" moves B -> A -> D -> C
    assert [r.answer for r in rots] == ["B", "A", "D", "C"]
    assert all(r.options[r.answer] == "x" for r in rots)
    assert all(r.question == rots[0].question and r.category == "color" for r in rots)

    three = circular_rotations(_item(options={"A": "p", "B": "q", "C": "r"}, answer=None))
    assert [r.index for r in three] == [7, 1_000_007, 2_000_007]
    assert all(r.answer is None for r in three)
    with pytest.raises(ValueError, match="1000007"):
        circular_rotations(rots[1])


def test_circular_eval() -> None:
    # question 3: all four rotations right; question 5: one rotation wrong; question 9: two options, both right
    records = [(3, True), (1_000_003, True), (2_000_003, True), (3_000_003, True)]
    records += [(5, True), (1_000_005, True), (2_000_005, False), (3_000_005, True)]
    records += [(9, True), (1_000_009, True)]
    assert circular_eval(records) == pytest.approx(2 / 3, abs=1e-12)
    assert circular_eval(dict(records)) == pytest.approx(2 / 3, abs=1e-12)
    assert circular_eval([(5, False)]) == 0.0
    with pytest.raises(ValueError, match="1000003 appears twice"):
        circular_eval(records + [(1_000_003, True)])
    with pytest.raises(ValueError, match="empty"):
        circular_eval([])


# ----------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------

_TSV_HEADER = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "E",
    "answer",
    "category",
    "image",
    "l2-category",
    "split",
]


def _write_tsv(path: Path, rows: list[list[str]]) -> None:
    path.write_text("\n".join("\t".join(r) for r in [_TSV_HEADER, *rows]) + "\n")


def test_load_tsv_official_layout(tmp_path: Path) -> None:
    red, blue = _png((6, 4), (255, 0, 0)), _png((3, 3), (0, 0, 255))
    b64_red, b64_blue = base64.b64encode(red).decode(), base64.b64encode(blue).decode()
    path = tmp_path / "MMBench_DEV_EN.tsv"
    _write_tsv(
        path,
        [
            [
                "0",
                "Which color?",
                "The picture shows a shape.",
                "red",
                "green",
                "blue",
                "gray",
                "",
                "A",
                "color",
                b64_red,
                "attr",
                "dev",
            ],
            # rotation stored with an image reference to row 0, as in the official dev TSV
            [
                "1000000",
                "Which color?",
                "The picture shows a shape.",
                "green",
                "blue",
                "gray",
                "red",
                "",
                "D",
                "color",
                "0",
                "attr",
                "dev",
            ],
            # two options, no hint, an option whose text pandas would read as NaN by default
            ["5", "Anything?", "", "None", "NA", "", "", "", "B", "misc", b64_blue, "x", "dev"],
            # five options, test split (no answer)
            ["6", "Pick one", "", "a", "b", "c", "d", "e", "", "misc", b64_blue, "x", "test"],
        ],
    )
    items = mmbench.load_tsv(path)
    assert [i.index for i in items] == [0, 1_000_000, 5, 6]
    first, rot, short, five = items
    assert first.hint == "The picture shows a shape."
    assert first.options == {"A": "red", "B": "green", "C": "blue", "D": "gray"}
    assert (first.answer, first.category, first.image) == ("A", "color", red)
    assert rot.image == red and rot.options["D"] == "red" and rot.answer == "D"
    assert short.hint == "" and short.options == {"A": "None", "B": "NA"} and short.answer == "B"
    assert five.options == {"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"} and five.answer is None
    assert first.load_image().size == (6, 4)
    assert short.load_image().getpixel((0, 0)) == (0, 0, 255)
    assert mmbench.build_prompt(short) == (
        "Anything? Options:\nA. None\nB. NA\nAnswer with the option's letter from the given choices directly."
    )


def test_load_tsv_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.tsv"
    _write_tsv(path, [["1", "q", "", "x", "y", "", "", "", "A", "c", "99", "", ""]])
    with pytest.raises(ValueError, match="index 1: image cell '99'"):
        mmbench.load_tsv(path)
    _write_tsv(path, [["1", "q", "", "x", "y", "", "", "", "C", "c", "", "", ""]])
    with pytest.raises(ValueError, match="answer 'C'"):
        mmbench.load_tsv(path)
    _write_tsv(path, [["1", "q", "", "x", "y", "", "", "", "A", "c", "not base64!" * 10, "", ""]])
    with pytest.raises(ValueError, match="not valid base64"):
        mmbench.load_tsv(path)
    _write_tsv(path, [["1", "q", "", "x", "y", "", "", "", "A", "c", "", "", ""]] * 2)
    with pytest.raises(ValueError, match="index 1 appears twice"):
        mmbench.load_tsv(path)
    path.write_text("index\tquestion\tA\n1\tq\tx\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['B'\]"):
        mmbench.load_tsv(path)


def test_load_parquet_image_forms(tmp_path: Path) -> None:
    img = _png((5, 2), (0, 255, 0))
    base = {"question": "Q?", "hint": None, "A": "x", "B": "y", "C": "z", "D": None, "answer": "C", "category": "cat"}
    # image as HF struct (lmms-lab), raw binary, and base64 text
    struct_rows = [{"index": 1, **base, "image": {"bytes": img, "path": None}}]
    pq.write_table(pa.Table.from_pylist(struct_rows), tmp_path / "struct.parquet")
    pq.write_table(pa.Table.from_pylist([{"index": 2, **base, "image": img}]), tmp_path / "binary.parquet")
    b64_rows = [
        {"index": 3, **base, "image": base64.b64encode(img).decode()},
        {"index": 1_000_003, **base, "image": "3"},
    ]
    pq.write_table(pa.Table.from_pylist(b64_rows), tmp_path / "b64.parquet")
    for name, indices in [("struct", [1]), ("binary", [2]), ("b64", [3, 1_000_003])]:
        items = mmbench.load_parquet(tmp_path / f"{name}.parquet")
        assert [i.index for i in items] == indices
        for item in items:
            assert item.image == img
            assert item.options == {"A": "x", "B": "y", "C": "z"}
            assert (item.hint, item.answer, item.category) == ("", "C", "cat")
    pq.write_table(pa.table({"index": [1], "question": ["q"], "A": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['B'\]"):
        mmbench.load_parquet(tmp_path / "bad.parquet")


# ----------------------------------------------------------------------------------------------
# easy-vqa converter
# ----------------------------------------------------------------------------------------------


def test_easy_vqa_options_kinds() -> None:
    import random

    import easy_vqa

    vocab = easy_vqa.get_answers()
    shapes, yes_no = {"circle", "rectangle", "triangle"}, {"yes", "no"}
    colors = set(vocab) - shapes - yes_no
    for seed in range(20):
        rng = random.Random(seed)
        for answer in vocab:
            opts = mmbench.easy_vqa_options(answer, vocab, rng)
            assert len(opts) == 4 and len(set(opts)) == 4 and answer in opts
            if answer in colors:
                assert set(opts) <= colors
            elif answer in shapes:
                assert shapes <= set(opts)  # both other shapes, plus one from the rest
            else:
                assert yes_no <= set(opts) and len(set(opts) - yes_no) == 2
    with pytest.raises(ValueError, match="'purple'"):
        mmbench.easy_vqa_options("purple", vocab, random.Random(0))
    with pytest.raises(ValueError, match=">= 4"):
        mmbench.easy_vqa_options("yes", ["yes", "no", "red"], random.Random(0))


@pytest.mark.parametrize("fmt", ["tsv", "parquet"])
def test_write_easy_vqa_mmbench_round_trip(tmp_path: Path, fmt: str) -> None:
    import easy_vqa

    from vllm_expertflow.eval.vqav2 import select_easy_vqa_questions

    texts, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    out = tmp_path / f"easy.{fmt}"
    assert mmbench.write_easy_vqa_mmbench(out, split="test", limit=25, seed=3, fmt=fmt) == 100
    items = (mmbench.load_tsv if fmt == "tsv" else mmbench.load_parquet)(out)
    assert len(items) == 100

    groups: dict[int, list[MMBenchItem]] = {}
    for item in items:
        groups.setdefault(item.index % mmbench.ROTATION_STRIDE, []).append(item)
    assert sorted(groups) == [q.index for q in select_easy_vqa_questions("test", 25, 3)]
    for base, rows in groups.items():
        assert sorted(r.index for r in rows) == [base + k * 1_000_000 for k in range(4)]
        rows.sort(key=lambda r: r.index)
        if answers[base] in {"yes", "no"}:
            expected_kind = "yes/no"
        elif answers[base] in {"circle", "rectangle", "triangle"}:
            expected_kind = "shape"
        else:
            expected_kind = "color"
        assert rows == circular_rotations(rows[0])  # stored rotations equal freshly computed ones
        for r in rows:
            assert r.question == texts[base]
            assert r.options[r.answer] == answers[base]
            assert r.hint == ""
            assert r.category == expected_kind
            assert r.image == Path(paths[image_ids[base]]).read_bytes()
    # each base question's 4 rotations put the answer at 4 different letters
    assert all(sorted(r.answer for r in rows) == ["A", "B", "C", "D"] for rows in groups.values())
    # answered perfectly -> 1.0; always "A" -> every question has a wrong rotation -> 0.0
    assert circular_eval([(r.index, mmbench.is_correct(r.answer, r)) for r in items]) == 1.0
    assert circular_eval([(r.index, mmbench.is_correct("A", r)) for r in items]) == 0.0


def test_write_easy_vqa_mmbench_deterministic(tmp_path: Path) -> None:
    mmbench.write_easy_vqa_mmbench(tmp_path / "a.tsv", limit=25, seed=3)
    mmbench.write_easy_vqa_mmbench(tmp_path / "b.tsv", limit=25, seed=3)
    assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()
    # a question's options do not depend on limit
    mmbench.write_easy_vqa_mmbench(tmp_path / "c.tsv", limit=200, seed=3)
    small = {i.index: i.options for i in mmbench.load_tsv(tmp_path / "a.tsv")}
    large = {i.index: i.options for i in mmbench.load_tsv(tmp_path / "c.tsv")}
    shared = small.keys() & large.keys()
    assert shared
    assert all(small[i] == large[i] for i in shared)
    # TSV rotations reference the base row's image instead of repeating it
    lines = (tmp_path / "a.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    image_col, index_col = header.index("image"), header.index("index")
    for line in lines[1:]:
        cells = line.split("\t")
        if int(cells[index_col]) >= 1_000_000:
            assert cells[image_col] == str(int(cells[index_col]) % 1_000_000)
    with pytest.raises(ValueError, match="'csv'"):
        mmbench.write_easy_vqa_mmbench(tmp_path / "x.csv", fmt="csv")  # type: ignore[arg-type]
