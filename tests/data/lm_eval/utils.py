"""Loads the 5 local examples for the test tasks (the harness's hub datasets are not reachable offline)."""

import json
from pathlib import Path


def load_docs(**kwargs):
    import datasets

    rows = [json.loads(line) for line in (Path(__file__).parent / "shakespeare.jsonl").read_text().splitlines()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
