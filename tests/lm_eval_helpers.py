"""Tiny lm-eval tasks written here over local JSON lines (nothing is downloaded): one of each request
type lm-eval sends a model. Task files are JSON, which YAML reads as it is."""

from __future__ import annotations

import json
from pathlib import Path

MULTIPLE_CHOICE = [  # log-likelihoods of each choice after the question
    {"question": "def add(a, b):", "choices": [" return a + b", " import os", " pass"], "answer": 0},
    {"question": "import", "choices": [" os", " sys", " re"], "answer": 1},
    {"question": "class Point:", "choices": [" pass", " def", " x = 1"], "answer": 2},
    {"question": "for i in", "choices": [" range(10):", " None", " 'a'"], "answer": 0},
    {"question": "if x is", "choices": [" None:", " True", " 3"], "answer": 0},
    {"question": "with open(path) as", "choices": [" f:", " 2", " x"], "answer": 0},
]
GENERATION = [  # greedy continuations, cut at the first newline
    {"prompt": "def main(", "answer": "):"},
    {"prompt": "import os\nimport", "answer": " sys"},
    {"prompt": "    return", "answer": " None"},
    {"prompt": "# the", "answer": " end"},
]
TEXTS = [  # rolling log-likelihoods: long enough for several windows of a 64- or 128-token model
    {"text": "def read(path):\n    with open(path) as f:\n        return f.read()\n" * 6},
    {"text": "import os\nimport sys\n\n\nclass Config:\n    \"\"\"Settings.\"\"\"\n\n    name = 'x'\n" * 5},
]


def choice_requests() -> list:
    """lm-eval's requests for every choice of MULTIPLE_CHOICE after its question, and one with no context."""
    from lm_eval.api.instance import Instance

    pairs = [(d["question"], c) for d in MULTIPLE_CHOICE for c in d["choices"]] + [("", "import os")]
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


PERPLEXITIES = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def _task(folder: Path, name: str, rows: list[dict], **config) -> Path:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / f"{name}.yaml"
    files = {"data_files": {"test": str(data)}, "cache_dir": str(folder / "datasets_cache")}  # not ~/.cache
    path.write_text(json.dumps({"task": name, "dataset_path": "json", "dataset_kwargs": files, "test_split": "test",
                                **config}))
    return path


def write_tasks(folder: Path) -> dict[str, Path]:
    """The task YAML files by kind: multiple choice, generation, rolling log-likelihood."""
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "mc": _task(folder, "keel_mc", MULTIPLE_CHOICE, output_type="multiple_choice", doc_to_text="{{question}}",
                    doc_to_choice="{{choices}}", doc_to_target="answer",
                    metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}]),
        "gen": _task(folder, "keel_gen", GENERATION, output_type="generate_until", doc_to_text="{{prompt}}",
                     doc_to_target="{{answer}}", metric_list=[{"metric": "exact_match"}],
                     generation_kwargs={"until": ["\n"], "max_gen_toks": 6, "do_sample": False}),
        "rolling": _task(folder, "keel_rolling", TEXTS, output_type="loglikelihood_rolling", doc_to_text="",
                         doc_to_target="{{text}}", metric_list=[{"metric": m} for m in PERPLEXITIES]),
    }
