"""Structured outputs through the API: for 50 JSON schemas of increasing difficulty, the fraction of answers that
parse and validate (checked with `jsonschema`, an independent validator), the time per request, and the same for
tool calls; compared with free generation asked for the same JSON.

    python benchmarks/structured.py                       # default model -> benchmarks/results/structured.json
    python benchmarks/structured.py --model tiny-random --quick    # smoke run, a random tiny model, seconds

The server is `create_app` under uvicorn in this process (one torch thread; the worker thread owns the model);
requests go over HTTP with httpx, one at a time, seeds 0..k-1. Per schema:
- structured: `/v1/completions` with `response_format: json_schema`; a 400 (`unsupported_schema`: a keyword the
  layout cannot guarantee, e.g. `format`, `pattern`) is counted as refused, not as an answer;
- tools: an object schema as the parameters of one tool, `tool_choice` naming it, on `/v1/chat/completions`;
  the tool list is shown to the model in a system message, which does not fit the default model's 256-token
  context (a 400), so tools run on `--tools-model` (default: a random tiny model with a 1024-token context);
- free: `/v1/completions` on the prompt "JSON:\\n" with as many new tokens as the schema's layout, the text
  parsed from its first "{" / "[" (or whole) and validated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))


def obj(props: dict, required: list | None = None, closed: bool = True) -> dict:
    s = {"type": "object", "properties": props, "required": required if required is not None else list(props)}
    if closed:
        s["additionalProperties"] = False
    return s


S = {"type": "string", "maxLength": 8}
I = {"type": "integer"}
B = {"type": "boolean"}


def schemas() -> list[tuple[str, dict]]:
    """50 schemas in 10 levels of 5, from one flat field to deep nesting, then string formats (refused)."""
    levels = [
        ("flat", [obj({"ok": B}), obj({"n": I}), obj({"name": S}), obj({"x": {"type": "number"}}),
                  obj({"nothing": {"type": "null"}})]),
        ("enum", [obj({"color": {"enum": ["red", "green", "blue"]}}), obj({"level": {"enum": [1, 2, 3]}}),
                  obj({"v": {"enum": ["a", 1, True, None]}}), obj({"kind": {"const": "user"}, "ok": B}),
                  {"enum": ["yes", "no", "maybe"]}]),
        ("ranges", [obj({"age": {"type": "integer", "minimum": 0, "maximum": 120}}),
                    obj({"year": {"type": "integer", "minimum": 1000, "maximum": 9999}}),
                    obj({"t": {"type": "number", "minimum": -1, "maximum": 1}}),
                    obj({"p": {"type": "number", "minimum": 0, "exclusiveMaximum": 1}}),
                    obj({"k": {"type": "integer", "exclusiveMinimum": 0, "maximum": 999999}})]),
        ("strings", [obj({"s": {"type": "string", "minLength": 3, "maxLength": 6}}),
                     obj({"code": {"type": "string", "minLength": 4, "maxLength": 4}}),
                     obj({"a": S, "b": S}), obj({"title": {"type": "string", "maxLength": 24}}),
                     obj({"empty": {"type": "string", "maxLength": 0}, "s": S})]),
        ("arrays", [{"type": "array", "items": I, "minItems": 1, "maxItems": 3},
                    obj({"tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 2,
                                  "maxItems": 2}}),
                    obj({"words": {"type": "array", "items": S, "minItems": 3, "maxItems": 3}}),
                    obj({"m": {"type": "array", "items": {"type": "array", "items": B, "maxItems": 2},
                               "maxItems": 2}}),
                    obj({"xs": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 9},
                                "minItems": 0, "maxItems": 4}})]),
        ("objects", [obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": B}),
                     obj({"id": I, "role": {"enum": ["admin", "user"]}, "active": B}, required=["id"]),
                     obj({"a": I, "b": I, "c": I, "d": I}),
                     obj({"first": S, "last": S, "email": S}, closed=False),
                     obj({"lat": {"type": "number", "minimum": -90, "maximum": 90},
                          "lon": {"type": "number", "minimum": -180, "maximum": 180}})]),
        ("nested", [obj({"user": obj({"name": S, "age": I})}),
                    obj({"a": obj({"b": obj({"c": B})})}),
                    obj({"meta": obj({"v": {"enum": [1, 2]}, "tag": S}), "data": obj({"x": I})}),
                    obj({"point": obj({"x": {"type": "number"}, "y": {"type": "number"}}), "label": S}),
                    obj({"cfg": obj({"debug": B, "level": {"enum": ["low", "high"]}}), "name": S})]),
        ("array_of_objects", [
            obj({"items": {"type": "array", "items": obj({"id": I, "ok": B}), "minItems": 1, "maxItems": 2}}),
            {"type": "array", "items": obj({"k": {"enum": ["a", "b"]}, "v": I}), "minItems": 2, "maxItems": 2},
            obj({"people": {"type": "array", "items": obj({"name": S, "age": {"type": "integer", "minimum": 0,
                                                                                "maximum": 99}}),
                            "maxItems": 2}}),
            obj({"rows": {"type": "array", "items": obj({"cells": {"type": "array", "items": B, "maxItems": 2}}),
                          "maxItems": 2}}),
            obj({"events": {"type": "array", "items": obj({"t": {"type": "number", "minimum": 0, "maximum": 1},
                                                         "kind": {"const": "tick"}}), "minItems": 1,
                            "maxItems": 2}})]),
        ("deep", [
            obj({"a": obj({"b": obj({"c": obj({"d": I})})})}),
            obj({"order": obj({"id": I, "lines": {"type": "array", "items": obj({"sku": S, "qty": {
                "type": "integer", "minimum": 1, "maximum": 9}}), "maxItems": 2}, "paid": B})}),
            obj({"tree": obj({"left": obj({"v": I}), "right": obj({"v": I})}), "depth": {"enum": [1, 2]}}),
            obj({"doc": obj({"title": S, "sections": {"type": "array", "items": obj({"h": S, "n": {
                "type": "integer", "minimum": 0, "maximum": 9}}), "minItems": 1, "maxItems": 2}})}),
            obj({"m": {"type": "array", "items": {"type": "array", "items": obj({"x": B}), "maxItems": 2},
                       "maxItems": 2}, "s": S})]),
        ("formats", [obj({"date": {"type": "string", "format": "date"}}),
                     obj({"email": {"type": "string", "format": "email"}}),
                     obj({"url": {"type": "string", "format": "uri"}}),
                     obj({"id": {"type": "string", "format": "uuid"}}),
                     obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}})]),
    ]
    return [(level, s) for level, group in levels for s in group]


def valid(text: str, schema: dict, free: bool = False) -> tuple[bool, bool]:
    """(parses, validates); free text is parsed from its first '{' / '[' when it does not parse whole."""
    import jsonschema

    candidates = [text]
    if free:
        starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
        if starts:
            candidates.append(text[min(starts):])
    for c in candidates:
        try:
            value = json.loads(c)
        except ValueError:
            continue
        try:
            jsonschema.validate(value, schema)
            return True, True
        except jsonschema.ValidationError:
            return True, False
    return False, False


def main() -> None:
    from dlm.precision import cpu_name  # one definition, beside the bf16 probe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="a shipped model, a checkpoint folder, or tiny-random")
    ap.add_argument("--tools-model", default="tiny-random", help="the model of the tools part (same choices)")
    ap.add_argument("--samples", type=int, default=3, help="requests (seeds) per schema and mode")
    ap.add_argument("--quick", action="store_true", help="1 sample, the first 2 schemas of every level")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "structured.json"))
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import httpx
    import torch

    torch.set_num_threads(1)
    from server_helpers import live_server, tiny_lm

    from dlm.control.json_schema import JsonLayout, canvas_of, compile_schema
    from dlm.pipeline import DiffusionLM
    from dlm.server import ServerSettings, create_app

    def load(name: str) -> DiffusionLM:
        return tiny_lm(max_len=1024) if name == "tiny-random" else DiffusionLM.from_pretrained(name)

    lm = load(args.model)
    tools_lm = lm if args.tools_model == args.model else load(args.tools_model)
    tok = lm.tokenizer
    samples = 1 if args.quick else args.samples
    cases = schemas()
    if args.quick:
        cases = [c for i, c in enumerate(cases) if i % 5 < 2]
    rows = []
    settings = ServerSettings(max_steps=4096, timeout=600)
    with live_server(create_app(lm, "bench", settings)) as url, \
            live_server(create_app(tools_lm, "tools", settings)) as tools_url:
        client = httpx.Client(base_url=url, timeout=600)
        tools_client = httpx.Client(base_url=tools_url, timeout=600)

        def timed(path: str, body: dict, on: httpx.Client = client) -> tuple[httpx.Response, float]:
            t = time.perf_counter()
            r = on.post(path, json=body)
            return r, time.perf_counter() - t

        for k, (level, schema) in enumerate(cases):
            row = {"index": k, "level": level, "schema": schema}
            try:
                ids, _ = canvas_of(compile_schema(schema, JsonLayout()), tok.encode, tok.mask_id, {})
                row["layout_tokens"] = len(ids)
            except ValueError as e:
                row["layout_tokens"], row["engine_refuses"] = None, str(e)[:200]
            fmt = {"type": "json_schema", "json_schema": {"name": f"s{k}", "schema": schema}}
            # structured
            out = {"answered": 0, "parses": 0, "validates": 0, "refused": 0, "seconds": [], "errors": []}
            for seed in range(samples):
                r, dt = timed("/v1/completions", {"prompt": "JSON:\n", "response_format": fmt, "seed": seed,
                                                  "temperature": 0.8})
                if r.status_code != 200:
                    out["refused"] += 1
                    out["errors"].append(r.json()["error"]["message"][:160])
                    continue
                p, v = valid(r.json()["choices"][0]["text"], schema)
                out["answered"] += 1
                out["parses"] += p
                out["validates"] += v
                out["seconds"].append(dt)
            out["errors"] = sorted(set(out["errors"]))
            row["structured"] = out
            # tools (object schemas only: a tool's parameters are an object)
            tools = {"answered": 0, "validates": 0, "refused": 0, "seconds": [], "errors": []}
            if schema.get("type") == "object":
                tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
                for seed in range(samples):
                    r, dt = timed("/v1/chat/completions", {
                        "messages": [{"role": "user", "content": "Call f."}], "tools": [tool], "seed": seed,
                        "tool_choice": {"type": "function", "function": {"name": "f"}}, "temperature": 0.8},
                        tools_client)
                    if r.status_code != 200:
                        tools["refused"] += 1
                        tools["errors"].append(r.json()["error"]["message"][:160])
                        continue
                    call = r.json()["choices"][0]["message"]["tool_calls"][0]["function"]
                    _, v = valid(call["arguments"], schema)
                    tools["answered"] += 1
                    tools["validates"] += v
                    tools["seconds"].append(dt)
                tools["errors"] = sorted(set(tools["errors"]))
                row["tools"] = tools
            # free generation, as many new tokens as the layout (or 64)
            n = min(row["layout_tokens"] or 64, lm.max_len - len(tok.encode("JSON:\n")))
            free = {"answered": 0, "parses": 0, "validates": 0, "seconds": []}
            for seed in range(samples):
                r, dt = timed("/v1/completions", {"prompt": "JSON:\n", "max_tokens": n, "steps": n,
                                                  "block_length": n, "seed": seed, "temperature": 0.8})
                if r.status_code != 200:
                    raise SystemExit(f"free generation failed: {r.text}")
                p, v = valid(r.json()["choices"][0]["text"], schema, free=True)
                free["answered"] += 1
                free["parses"] += p
                free["validates"] += v
                free["seconds"].append(dt)
            row["free"] = free
            rows.append(row)
            s = row["structured"]
            print(f"{k:2d} {level:16s} layout {row['layout_tokens']}: structured {s['validates']}/{s['answered']} "
                  f"(refused {s['refused']}), tools {row.get('tools', {}).get('validates', '-')}/"
                  f"{row.get('tools', {}).get('answered', '-')}, free {free['validates']}/{free['answered']}",
                  flush=True)

    def total(mode: str, key: str) -> int:
        return sum(r[mode][key] for r in rows if mode in r)

    def seconds(mode: str) -> list[float]:
        return [t for r in rows if mode in r for t in r[mode]["seconds"]]

    summary = {}
    for mode in ("structured", "tools", "free"):
        answered, secs = total(mode, "answered"), seconds(mode)
        summary[mode] = {
            "requests": answered + (total(mode, "refused") if mode != "free" else 0),
            "answered": answered,
            "refused_400": total(mode, "refused") if mode != "free" else 0,
            "parse_rate": (total(mode, "parses") / answered if answered else None) if mode != "tools" else None,
            "valid_rate": total(mode, "validates") / answered if answered else None,
            "seconds_median": statistics.median(secs) if secs else None,
            "seconds_mean": statistics.fmean(secs) if secs else None,
        }
    by_level = {}
    for level in dict.fromkeys(r["level"] for r in rows):
        mine = [r for r in rows if r["level"] == level]
        secs = [t for r in mine for t in r["structured"]["seconds"]]
        by_level[level] = {
            "structured_valid": f"{sum(r['structured']['validates'] for r in mine)}/"
                                f"{sum(r['structured']['answered'] for r in mine)}",
            "structured_refused": sum(r["structured"]["refused"] for r in mine),
            "free_valid": f"{sum(r['free']['validates'] for r in mine)}/{sum(r['free']['answered'] for r in mine)}",
            "structured_seconds_median": statistics.median(secs) if secs else None,
        }
    result = {
        "benchmark": "structured outputs through the API (benchmarks/structured.py)",
        "model": args.model, "tools_model": args.tools_model, "samples_per_schema": samples, "schemas": len(rows),
        "temperature": 0.8,
        "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": 1,
        "python": platform.python_version(), "torch": torch.__version__,
        "summary": summary, "by_level": by_level, "rows": rows,
    }
    print(json.dumps({"summary": summary, "by_level": by_level}, indent=1))
    if not args.quick:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
