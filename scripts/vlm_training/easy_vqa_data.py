"""easy-vqa as both training scripts read it: splits, answer kinds, multiple-choice options, test items, and the
shape and colour of each train image read off its questions."""

from __future__ import annotations

import random
import re

from vllm_expertflow.eval import prompts

LETTERS = "ABCD"
YES_NO = ("yes", "no")
SHAPES = ("circle", "rectangle", "triangle")


def answer_kind(answer: str) -> str:
    if answer in YES_NO:
        return "yes/no"
    if answer in SHAPES:
        return "shape"
    return "color"


def load_split(split: str):
    """(questions, answers, image_ids, {image_id: path}) of an easy-vqa split."""
    import easy_vqa

    if split == "train":
        q, a, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        q, a, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(split)
    return list(q), list(a), [int(i) for i in ids], {int(k): v for k, v in paths.items()}


def mc_options(answer: str, vocabulary, rng: random.Random, same_kind_first: bool) -> list[str]:
    """Four distinct options: ``answer`` plus 3 distractors, shuffled.

    ``same_kind_first``: distractors of the answer's kind first (other colours for a colour, the other shapes
    for a shape, "yes"/"no"), topped up from the rest of the vocabulary (as the project's MMBench converter
    does); otherwise 3 distractors drawn uniformly from the whole vocabulary.
    """
    vocab = sorted(set(vocabulary))
    if same_kind_first:
        kind = answer_kind(answer)
        same = sorted(a for a in vocab if a != answer and answer_kind(a) == kind)
        other = sorted(a for a in vocab if answer_kind(a) != kind)
        picked = rng.sample(same, min(3, len(same)))
        picked += rng.sample(other, 3 - len(picked))
    else:
        picked = rng.sample([a for a in vocab if a != answer], 3)
    options = [answer, *picked]
    rng.shuffle(options)
    return options


def open_prompt_text(question: str) -> str:
    return prompts.open_prompt(question, "direct")


def mc_prompt_text(question: str, options) -> str:
    return prompts.mc_prompt(question, list(options), "direct")


def chat_messages(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def render_prompt(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template(chat_messages(text), tokenize=False, add_generation_prompt=True)


def test_items(limit: int | None, seed: int = 0):
    """Test questions (all, or a seeded sample of ``limit`` in split order) with their MC options."""
    import easy_vqa

    q, a, ids, paths = load_split("test")
    vocab = easy_vqa.get_answers()
    pos = list(range(len(q)))
    if limit is not None and limit < len(q):
        pos = sorted(random.Random(seed).sample(pos, limit))
    items = []
    for i in pos:
        rng = random.Random(f"toy-vlm-test-mc:{seed}:{i}")
        opts = mc_options(a[i], vocab, rng, same_kind_first=True)
        items.append(
            {"index": i, "question": q[i], "answer": a[i], "path": paths[ids[i]], "options": opts,
             "letter": LETTERS[opts.index(a[i])]}
        )  # fmt: skip
    return items


def image_labels(questions, answers, image_ids):
    """Per train image: (shape index, colour index) read off its questions (each image has one shape)."""
    colors = sorted({a for a in answers if answer_kind(a) == "color"})
    shape_of: dict[int, str] = {}
    color_of: dict[int, str] = {}
    for q, a, i in zip(questions, answers, image_ids, strict=True):
        negated = bool(re.search(r"\b(not|no)\b", q))
        # What the question names is in the image when: it asks for the other attribute ("what is the blue
        # shape?" -> rectangle), or it is a yes/no question answered "yes" (plain) or "no" (negated).
        names_truth = a not in YES_NO or (a == "yes") != negated
        if a in SHAPES:
            shape_of[i] = a
        elif a not in YES_NO:
            color_of[i] = a
        if names_truth:
            for w in re.findall(r"\w+", q):
                if w in SHAPES:
                    shape_of[i] = w
                elif w in colors:
                    color_of[i] = w
    labelled = sorted(i for i in set(image_ids) if i in shape_of and i in color_of)
    return (
        labelled,
        {i: SHAPES.index(shape_of[i]) for i in labelled},
        {i: colors.index(color_of[i]) for i in labelled},
        colors,
    )
