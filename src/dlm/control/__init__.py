"""Controlled generation: fill canvases under per-position constraints (dlm.control.canvas), and what is built on
it: constraints with validators and repair, JSON from a schema, structured documents, augmentation."""

from dlm.control.canvas import fill_canvas, token_texts

__all__ = ["fill_canvas", "token_texts"]
