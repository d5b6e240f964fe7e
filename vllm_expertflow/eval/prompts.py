"""Prompt texts of the two answer regimes, shared by the evaluation and the study model's training.

``direct``: the answer alone (VQAv2's word, MMBench's letter): 1-3 generated tokens, so expert loads happen in
prefill. ``rationale``: a short description of the image, then the final answer after ``ANSWER_MARKER``: a few
dozen generated tokens, so decode steps dominate, as with the reasoning ("thinking") MoE-VLMs people run.
The study model was trained on exactly these strings; changing them changes what it is asked.
"""

from __future__ import annotations

import re

REGIMES = ("direct", "rationale")

DIRECT_OPEN_SUFFIX = "\nAnswer the question using a single word or phrase."
DIRECT_MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
RATIONALE_OPEN_SUFFIX = "\nFirst describe the image, then answer the question."
RATIONALE_MC_INSTRUCTION = "First describe the image, then answer with the option's letter."
ANSWER_MARKER = "Answer:"

# Enough for the longest rationale the study model was trained on (about 35 tokens) plus slack.
MAX_TOKENS = {"direct": 8, "rationale": 64}


def check_regime(regime: str) -> str:
    if regime not in REGIMES:
        raise ValueError(f"unknown prompt regime {regime!r}; valid: {', '.join(REGIMES)}")
    return regime


def open_prompt(question: str, regime: str = "direct") -> str:
    suffix = DIRECT_OPEN_SUFFIX if check_regime(regime) == "direct" else RATIONALE_OPEN_SUFFIX
    return question + suffix


def mc_prompt(question: str, options: list[str] | tuple[str, ...], regime: str = "direct", hint: str = "") -> str:
    """``"{hint} {question} Options:\\nA. ..\\nB. ..\\n" + instruction``, MMBench's layout."""
    instruction = DIRECT_MC_INSTRUCTION if check_regime(regime) == "direct" else RATIONALE_MC_INSTRUCTION
    head = f"{hint} {question}".strip() if hint else question
    lines = [f"{head} Options:"] + [f"{chr(ord('A') + i)}. {text}" for i, text in enumerate(options)]
    return "\n".join(lines) + "\n" + instruction


_FINAL_ANSWER = re.compile(re.escape(ANSWER_MARKER) + r"\s*([^\s.,;]+)")


def final_answer(prediction: str, regime: str) -> str | None:
    """The answer a scorer reads: the whole prediction (direct), or the first word after the last
    ``ANSWER_MARKER`` (rationale; None when the model never wrote the marker, which scores as wrong)."""
    if check_regime(regime) == "direct":
        return prediction.strip()
    found = _FINAL_ANSWER.findall(prediction)
    return found[-1] if found else None


def rationale_text(shape: str, color: str, kind: str, answer: str, option_letter: str | None = None) -> str:
    """The target a study model learns for the rationale regime: what it sees, what is asked, the answer.

    ``kind``: "shape", "color" or "yes/no" (the kind of the answer); ``option_letter``: for multiple choice,
    the letter of the correct option, which becomes the final answer.
    """
    parts = [f"I look at the image. I see one {color} {shape}."]
    if kind == "yes/no":
        parts.append("The question asks yes or no.")
    else:
        parts.append(f"The question asks for the {kind}. The {kind} is {answer}.")
    if option_letter is not None:
        parts.append(f"Option {option_letter} is {answer}.")
    final = option_letter if option_letter is not None else answer
    return " ".join(parts) + f"\n{ANSWER_MARKER} {final}"
