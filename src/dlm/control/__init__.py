"""Controlled generation, all on one primitive (`fill_canvas`: a canvas with [MASK] gaps filled as one block, known
tokens fixed, per-position token constraints): pattern gaps, code under constraints with validators and repair,
JSON from a schema, structured documents, augmentation. `DiffusionLM` exposes each as a method."""

from dlm.control.augment import distinct_n, faithfulness, self_bleu
from dlm.control.canvas import fill_canvas, token_texts
from dlm.control.code import generate_with_constraints
from dlm.control.constraints import PatternGap, fill_pattern
from dlm.control.documents import generate_document
from dlm.control.json_schema import generate_json

# `augment` and `repair` stay in their modules (dlm.control.augment.augment, dlm.control.repair.repair): a
# function re-exported under its module's name would hide the module.
__all__ = ["distinct_n", "faithfulness", "self_bleu", "fill_canvas", "token_texts", "generate_with_constraints",
           "PatternGap", "fill_pattern", "generate_document", "generate_json"]
