"""Two lm-evaluation-harness tasks over local JSON lines, written by the tests that need them
(tests/test_harness.py, tests/test_downstream.py): nothing downloads."""

from __future__ import annotations

import json
from pathlib import Path

# a corpus that spells every character of the tasks (a character model needs them all)
TEXT = (
    "ROMEO: O, she doth teach the torches to burn bright!\n"
    "JULIET: Good night, good night! Parting is such sweet sorrow.\n"
) * 20
MC = [
    {"question": "ROMEO: O, she doth", "choices": [" teach", " burn", " night"], "answer": 0},
    {"question": "JULIET: Good", "choices": [" sorrow", " night", " torches!"], "answer": 1},
    {"question": "Parting is such", "choices": [" sweet", " bright", " she"], "answer": 0},
    {"question": "", "choices": ["ROMEO", "JULIET"], "answer": 1},
]
LAST_WORD = [
    {"text": "O, she doth teach the torches to burn bright"},
    {"text": "Good night, good night! Parting is such sweet sorrow"},
    {"text": ("JULIET: Good night, good night! " * 3) + "Parting"},  # longer than the context
]


def write_tasks(root: Path) -> Path:
    """``root`` with tiny_mc (multiple choice: acc, acc_norm) and tiny_lambada (last word:
    perplexity, acc) task YAMLs and their data; the datasets library caches under ``root``."""
    for name, rows in (("mc", MC), ("lambada", LAST_WORD)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
    data += f"  cache_dir: {root / 'cache'}\ntest_split: test\n"
    (root / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        + data.format(path=root / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (root / "tiny_lambada.yaml").write_text(
        "task: tiny_lambada\n"
        + data.format(path=root / "lambada.jsonl")
        + "output_type: loglikelihood\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n"
    )
    return root
