"""Training and test data of the study model: easy-vqa questions in two regimes and two forms.

Regimes (``vllm_expertflow.eval.prompts``): ``direct`` (the answer word or letter) and ``rationale`` (a short
description of the image, then ``Answer: X``). Forms: open answer (VQAv2 style) and multiple choice (MMBench
style, 4 options). The rationale names the image's shape and colour, read off the image's questions
(``image_labels``); images whose labels cannot be read are used in the direct regime only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vllm_expertflow.eval import prompts

from . import easy_vqa_data
from .easy_vqa_data import LETTERS


@dataclass(frozen=True)
class Sample:
    prompt: str  # user text (the image goes first in the chat turn)
    target: str  # what the model learns to write before <|im_end|>
    path: str


def prompt_for(question: str, options, regime: str) -> str:
    """The user text of an open (``options`` None) or multiple-choice question."""
    if options is None:
        return prompts.open_prompt(question, regime)
    return prompts.mc_prompt(question, list(options), regime)


def target_for(answer: str, options, regime: str, shape: str | None, color: str | None) -> str:
    letter = None if options is None else LETTERS[list(options).index(answer)]
    if regime == "direct":
        return answer if letter is None else letter
    return prompts.rationale_text(shape, color, easy_vqa_data.answer_kind(answer), answer, letter)


def extra_tokenizer_texts(questions, vocabulary, colors) -> list[str]:
    """Every prompt and target of the regimes the toy model's tokenizer never saw."""
    texts = [prompts.RATIONALE_OPEN_SUFFIX, prompts.RATIONALE_MC_INSTRUCTION]
    for q in sorted(set(questions)):
        texts += [prompts.open_prompt(q, "rationale"), prompts.mc_prompt(q, sorted(vocabulary)[:4], "rationale")]
    for shape in easy_vqa_data.SHAPES:
        for color in colors:
            for answer in vocabulary:
                for letter in (None, *LETTERS):
                    texts.append(prompts.rationale_text(shape, color, easy_vqa_data.answer_kind(answer), answer, letter))
    return texts


class TrainingData:
    """Draws training samples: regime, form and distractors decided by a seeded ``random.Random``."""

    def __init__(self, seed: int, rationale_fraction: float, mc_fraction: float):
        import easy_vqa

        self.questions, self.answers, self.image_ids, self.paths = easy_vqa_data.load_split("train")
        self.vocabulary = list(easy_vqa.get_answers())
        labelled, shape_of, color_of, self.colors = easy_vqa_data.image_labels(self.questions, self.answers, self.image_ids)
        self.shape = {i: easy_vqa_data.SHAPES[shape_of[i]] for i in labelled}
        self.color = {i: self.colors[color_of[i]] for i in labelled}
        self.rng = random.Random(seed)
        self.rationale_fraction = rationale_fraction
        self.mc_fraction = mc_fraction
        self._order: list[int] = []

    def sample(self, i: int) -> Sample:
        q, a, image = self.questions[i], self.answers[i], self.image_ids[i]
        regime = "direct"
        if image in self.shape and self.rng.random() < self.rationale_fraction:
            regime = "rationale"
        options = None
        if self.rng.random() < self.mc_fraction:
            options = easy_vqa_data.mc_options(a, self.vocabulary, self.rng, same_kind_first=self.rng.random() < 0.7)
        return Sample(
            prompt_for(q, options, regime),
            target_for(a, options, regime, self.shape.get(image), self.color.get(image)),
            self.paths[image],
        )

    def batch(self, size: int) -> list[Sample]:
        """The next ``size`` questions of a shuffled pass over the split (reshuffled each epoch)."""
        if len(self._order) < size:
            perm = list(range(len(self.questions)))
            self.rng.shuffle(perm)
            self._order += perm
        picked, self._order = self._order[:size], self._order[size:]
        return [self.sample(i) for i in picked]


@dataclass(frozen=True)
class TestItem:
    index: int
    question: str
    answer: str
    kind: str
    path: str
    options: tuple[str, ...]
    letter: str


def test_items(limit: int | None, seed: int = 0) -> list[TestItem]:
    """easy-vqa test questions (all, or a seeded sample) with the MC options the project's converter builds."""
    return [
        TestItem(it["index"], it["question"], it["answer"], easy_vqa_data.answer_kind(it["answer"]), it["path"],
                 tuple(it["options"]), it["letter"])
        for it in easy_vqa_data.test_items(limit, seed)
    ]  # fmt: skip
