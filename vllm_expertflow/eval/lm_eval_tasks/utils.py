"""Functions the lm-eval task YAMLs of this directory call through ``!function utils.<name>``.

They reuse the project's own metric code (``vllm_expertflow.eval.vqav2`` / ``mmbench``), so an
lm-eval run scores exactly as ``python -m vllm_expertflow.eval.sweep`` does on the same items:
the same prompts (``build_prompt``, and ``eval/prompts.py`` for the rationale regime; lm-eval's chat
template puts the image first, as the sweep does), the same VQAv2 soft score, the same MMBench choice
extraction (of the answer after the last ``Answer:`` in the rationale regime) and CircularEval.

Document schemas (one parquet row per doc, read by ``datasets``' parquet builder):

* VQAv2 (lmms-lab schema): ``question_id``, ``question``, ``answers`` (list of ``{"answer": ...}``
  structs or strings), ``image`` (``{"bytes", "path"}`` struct or raw bytes).
* MMBench: ``index``, ``question``, ``hint``, ``A``..``E``, ``answer``, ``category``, ``image``
  (bytes, ``{"bytes"}`` struct or base64 string), every rotation as its own row (index +
  k * 1,000,000), as ``python -m vllm_expertflow.eval.harness make-tasks`` writes it.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable, Mapping
from typing import Any

from vllm_expertflow.eval import mmbench, prompts, vqav2

IMAGE_PLACEHOLDER = "<image>"  # lm-eval's multimodal backends replace it with the model's image tokens


def _image_bytes(cell: Any) -> bytes | None:
    if cell is None:
        return None
    if isinstance(cell, Mapping):
        if cell.get("bytes") is not None:
            return bytes(cell["bytes"])
        if cell.get("path"):
            with open(cell["path"], "rb") as f:
                return f.read()
        return None
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell)
    if isinstance(cell, str) and cell:
        return base64.b64decode(cell)
    return None


def _pil(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


# --- VQAv2 -----------------------------------------------------------------------------------


def vqav2_answers(doc: Mapping[str, Any]) -> list[str]:
    return [str(a["answer"]) if isinstance(a, Mapping) else str(a) for a in (doc.get("answers") or [])]


def vqav2_doc_to_text(doc: Mapping[str, Any]) -> str:
    return IMAGE_PLACEHOLDER + vqav2.build_prompt(str(doc["question"]))


def vqav2_doc_to_image(doc: Mapping[str, Any]) -> list:
    return [_pil(_image_bytes(doc["image"]))]


def vqav2_doc_to_target(doc: Mapping[str, Any]) -> str:
    answers = vqav2_answers(doc)
    return str(doc.get("multiple_choice_answer") or (answers[0] if answers else ""))


def vqav2_process_results(doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    return {"vqav2_accuracy": vqav2.score(results[0], vqav2_answers(doc))}


def vqav2_rationale_doc_to_text(doc: Mapping[str, Any]) -> str:
    return IMAGE_PLACEHOLDER + prompts.open_prompt(str(doc["question"]), "rationale")


def vqav2_rationale_process_results(doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    final = prompts.final_answer(results[0], "rationale")
    return {"vqav2_accuracy": 0.0 if final is None else vqav2.score(final, vqav2_answers(doc))}


# --- MMBench ---------------------------------------------------------------------------------


def mmbench_item(doc: Mapping[str, Any]) -> mmbench.MMBenchItem:
    options = {letter: str(doc[letter]) for letter in mmbench.OPTION_LETTERS
               if letter in doc and not _missing(doc[letter])}
    answer = doc.get("answer")
    return mmbench.MMBenchItem(
        index=int(doc["index"]),
        question=str(doc["question"]),
        hint="" if _missing(doc.get("hint")) else str(doc["hint"]),
        options=options,
        answer=None if _missing(answer) else str(answer).strip(),
        category="" if _missing(doc.get("category")) else str(doc["category"]),
        image=_image_bytes(doc.get("image")),
    )


def mmbench_doc_to_text(doc: Mapping[str, Any]) -> str:
    item = mmbench_item(doc)
    return (IMAGE_PLACEHOLDER if item.image is not None else "") + mmbench.build_prompt(item)


def mmbench_doc_to_image(doc: Mapping[str, Any]) -> list:
    data = _image_bytes(doc.get("image"))
    return [] if data is None else [_pil(data)]


def mmbench_doc_to_target(doc: Mapping[str, Any]) -> str:
    return str(doc.get("answer") or "")


def mmbench_process_results(doc: Mapping[str, Any], results: list[str]) -> dict[str, Any]:
    item = mmbench_item(doc)
    correct = mmbench.is_correct(results[0], item)
    return {"mmbench_circular_accuracy": (item.index, correct), "mmbench_row_accuracy": float(correct)}


def mmbench_rationale_doc_to_text(doc: Mapping[str, Any]) -> str:
    item = mmbench_item(doc)
    hint = "" if _missing(item.hint) else item.hint.strip()
    text = prompts.mc_prompt(item.question, list(item.options.values()), "rationale", hint)
    return (IMAGE_PLACEHOLDER if item.image is not None else "") + text


def mmbench_rationale_process_results(doc: Mapping[str, Any], results: list[str]) -> dict[str, Any]:
    item = mmbench_item(doc)
    final = prompts.final_answer(results[0], "rationale")
    correct = final is not None and mmbench.extract_choice(final, item.options) == item.answer
    return {"mmbench_circular_accuracy": (item.index, correct), "mmbench_row_accuracy": float(correct)}


def circular_accuracy(records: Iterable[tuple[int, bool]]) -> float:
    """Aggregation of ``mmbench_circular_accuracy``: CircularEval over every scored row."""
    return mmbench.circular_eval([(int(i), bool(c)) for i, c in records])
