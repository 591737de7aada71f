"""Serving benchmark: throughput and latency of `dlm serve` at 1, 8 and 32 concurrent clients, batching on and off;
the same with batching on for requests of `n` samples (1, 4, 8), seeded and unseeded; and a soak mode that keeps
N clients busy for S seconds and reports 5xx answers and the server's memory over time.

    python benchmarks/serve.py                                  # default model -> benchmarks/results/serve.json
    python benchmarks/serve.py --samples --seconds 15           # n 1/4/8 x seeded/unseeded (key "samples")
    python benchmarks/serve.py --soak 60 --clients 16           # soak: 5xx count and RSS over time (same JSON)
    python benchmarks/serve.py --model tiny-random --quick      # smoke run on a random tiny model, seconds

The server runs as `dlm serve` in a subprocess (its RSS is measured from /proc); the clients are closed-loop
(each sends its next request when the last one is answered) asyncio tasks sending /v1/completions with prompts
of different lengths. "Batching off" is `--batch-size 1`; "on" is `--batch-size` = the most clients (32).
`--samples`: one server with batching on (`--batch-size` = the most clients, counted in rows, so a batch holds
32 / n requests of n samples); each request asks for `n` samples at `--sample-temperature`, with a seed of its own
(seeded: every request a different seed, as clients asking for reproducible samples do) or none (unseeded).
Seeded and unseeded requests batch alike (dlm.server.batching); the rows of the table show what n costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PROMPTS = ["ROMEO:\n", "HAMLET:\nTo be, or not to be,", "First Citizen:\nBefore we proceed any further, hear me.\n",
           "KING HENRY V:\nOnce more unto the breach,", "LADY MACBETH:\n", "JULIET:\nO Romeo, Romeo!",
           "PROSPERO:\nOur revels now are ended.", "OTHELLO:\n"]


def tiny_random_checkpoint(folder: Path) -> Path:
    """A random-weight tiny model saved like a trained one: for checking that the benchmark runs."""
    import torch

    from dlm.checkpoint import save_pretrained
    from dlm.config import CheckpointConfig, GenerationConfig, ModelConfig
    from dlm.models import build_model
    from dlm.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    mc = ModelConfig.preset("tiny", max_len=128)
    cfg = CheckpointConfig(model=mc, sampling=GenerationConfig(max_new_tokens=16, steps=8, block_length=8))
    save_pretrained(folder, build_model(mc), cfg, ByteTokenizer())
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


@contextmanager
def server(model: str, batch_size: int, args: argparse.Namespace, max_n: int = 8):
    """`dlm serve` in a subprocess on a free port -> (base URL, pid); terminated on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "dlm.cli", "serve", "--model", model, "--port", str(port), "--batch-size",
           str(batch_size), "--batch-wait-ms", str(args.batch_wait_ms), "--queue-size", "1024", "--timeout", "600",
           "--max-tokens", str(max(args.max_tokens, 512)), "--max-n", str(max_n), "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("DLM_API_KEY", None)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"dlm serve exited ({proc.returncode}):\n{log.read()[-3000:]}")
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("dlm serve did not answer /health within 120 s")
                time.sleep(0.2)
            yield url, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def scrape(url: str) -> dict[str, float]:
    """The unlabelled samples of /metrics (batch counters), by name."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def cpu_name() -> str:
    """The CPU's model name and torch's capability level (AVX2, AVX512, AMX...), for the results."""
    import torch

    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def load(url: str, clients: int, seconds: float, body: dict, on_sample=None, sample_every: float = 0.0,
               seeded: bool = False):
    """`clients` closed-loop clients for `seconds` -> (latencies of 200s, status counts, completion tokens).
    seeded: every request carries a seed of its own (client i's k-th request: seed 1000 i + k)."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    tokens = [0]
    stop_at = time.monotonic() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        k = i
        while time.monotonic() < stop_at:
            k += 1
            t0 = time.perf_counter()
            try:
                seed = {"seed": 1000 * i + k} if seeded else {}
                r = await http.post("/v1/completions", json={**body, **seed, "prompt": PROMPTS[k % len(PROMPTS)]})
                status = str(r.status_code)
            except httpx.HTTPError as e:
                r, status = None, type(e).__name__
            statuses[status] = statuses.get(status, 0) + 1
            if r is not None and r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
                tokens[0] += r.json()["usage"]["completion_tokens"]

    async def sampler() -> None:
        while time.monotonic() < stop_at:
            await asyncio.sleep(min(sample_every, max(0.0, stop_at - time.monotonic())))
            on_sample(dict(statuses))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        tasks = [client(i, http) for i in range(clients)]
        if on_sample is not None:
            tasks.append(sampler())
        await asyncio.gather(*tasks)
    return latencies, statuses, tokens[0]


def request_body(args: argparse.Namespace) -> dict:
    return {"max_tokens": args.max_tokens, "steps": args.steps, "block_length": args.block_length,
            "temperature": 0.0}


def throughput(model: str, args: argparse.Namespace) -> list[dict]:
    levels = [int(c) for c in args.levels.split(",")]
    rows = []
    for batching, batch_size in (("off", 1), ("on", max(levels))):
        with server(model, batch_size, args) as (url, pid):
            httpx.post(url + "/v1/completions", json={**request_body(args), "prompt": "warm up"}, timeout=600)
            for clients in levels:
                row = {"batching": batching, "batch_size": batch_size, **measure(url, pid, clients,
                                                                                request_body(args), args)}
                rows.append(row)
                print(f"  batching {batching:3} clients {clients:3}: {row['requests_per_s']:8.2f} req/s  "
                      f"p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  mean batch {row['mean_batch']}",
                      file=sys.stderr)
    return rows


def measure(url: str, pid: int, clients: int, body: dict, args: argparse.Namespace, seeded: bool = False) -> dict:
    """One cell: `clients` closed-loop clients for args.seconds -> req/s, tokens/s, p50/p99, mean batch."""
    before = scrape(url)
    t0 = time.perf_counter()
    lat, statuses, tokens = asyncio.run(load(url, clients, args.seconds, body, seeded=seeded))
    elapsed = time.perf_counter() - t0
    after = scrape(url)
    batches = after["dlm_batches_total"] - before["dlm_batches_total"]
    jobs = after["dlm_batched_requests_total"] - before["dlm_batched_requests_total"]
    return {"clients": clients, "requests": len(lat), "seconds": round(elapsed, 2),
            "requests_per_s": round(len(lat) / elapsed, 3), "tokens_per_s": round(tokens / elapsed, 1),
            "p50_ms": round(1000 * percentile(lat, 0.5), 1) if lat else None,
            "p99_ms": round(1000 * percentile(lat, 0.99), 1) if lat else None,
            "mean_batch": round(jobs / batches, 2) if batches else None, "statuses": statuses,
            "server_rss_mb": rss_mb(pid)}


def samples(model: str, args: argparse.Namespace) -> list[dict]:
    """Batching on; n 1/4/8 samples per request, seeded and unseeded, at each client level."""
    levels = [int(c) for c in args.levels.split(",")]
    ns = [int(n) for n in args.ns.split(",")]
    rows = []
    with server(model, max(levels), args, max_n=max(ns)) as (url, pid):
        base = {**request_body(args), "temperature": args.sample_temperature}
        httpx.post(url + "/v1/completions", json={**base, "n": max(ns), "prompt": "warm up"}, timeout=600)
        for n in ns:
            for seeded in (False, True):
                for clients in levels:
                    row = {"n": n, "seeded": seeded, "batch_size": max(levels),
                           **measure(url, pid, clients, {**base, "n": n}, args, seeded)}
                    rows.append(row)
                    print(f"  n {n} {'seeded  ' if seeded else 'unseeded'} clients {clients:3}: "
                          f"{row['requests_per_s']:8.2f} req/s  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  "
                          f"mean batch {row['mean_batch']}", file=sys.stderr)
    return rows


def soak(model: str, args: argparse.Namespace) -> dict:
    samples = []
    with server(model, args.batch_size or args.clients, args) as (url, pid):
        httpx.post(url + "/v1/completions", json={**request_body(args), "prompt": "warm up"}, timeout=600)
        t0 = time.monotonic()

        def on_sample(statuses: dict[str, int]) -> None:
            fivexx = sum(n for s, n in statuses.items() if s.startswith("5"))
            samples.append({"t": round(time.monotonic() - t0, 1), "rss_mb": rss_mb(pid),
                            "requests": sum(statuses.values()), "5xx": fivexx})
            print(f"  t={samples[-1]['t']:6.1f}s  rss {samples[-1]['rss_mb']} MB  requests {samples[-1]['requests']}"
                  f"  5xx {fivexx}", file=sys.stderr)

        on_sample({})
        lat, statuses, tokens = asyncio.run(load(url, args.clients, args.soak, request_body(args), on_sample,
                                                 args.sample_every))
        on_sample(statuses)
    rss = [s["rss_mb"] for s in samples if s["rss_mb"] is not None]
    return {"seconds": args.soak, "clients": args.clients, "requests": sum(statuses.values()), "statuses": statuses,
            "5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
            "non_200": sum(n for s, n in statuses.items() if s != "200"),
            "p50_ms": round(1000 * percentile(lat, 0.5), 1) if lat else None,
            "p99_ms": round(1000 * percentile(lat, 0.99), 1) if lat else None,
            "rss_mb_start": rss[0] if rss else None, "rss_mb_end": rss[-1] if rss else None,
            "rss_mb_max": max(rss) if rss else None, "samples": samples}


def markdown(result: dict) -> str:
    lines = []
    if result.get("throughput"):
        lines += ["| batching | clients | req/s | tokens/s | p50 ms | p99 ms | mean batch | non-200 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["throughput"]:
            bad = sum(n for s, n in r["statuses"].items() if s != "200")
            lines.append(f"| {r['batching']} | {r['clients']} | {r['requests_per_s']} | {r['tokens_per_s']} | "
                         f"{r['p50_ms']} | {r['p99_ms']} | {r['mean_batch']} | {bad} |")
    if result.get("samples"):
        lines += ["", "| n | seed | clients | req/s | samples/s | tokens/s | p50 ms | p99 ms | mean batch (requests) "
                      "| non-200 |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["samples"]:
            bad = sum(n for s, n in r["statuses"].items() if s != "200")
            lines.append(f"| {r['n']} | {'seeded' if r['seeded'] else 'unseeded'} | {r['clients']} | "
                         f"{r['requests_per_s']} | {round(r['requests_per_s'] * r['n'], 2)} | {r['tokens_per_s']} | "
                         f"{r['p50_ms']} | {r['p99_ms']} | {r['mean_batch']} | {bad} |")
    if result.get("soak"):
        s = result["soak"]
        lines += ["", f"Soak: {s['clients']} clients for {s['seconds']} s, {s['requests']} requests, {s['5xx']} 5xx, "
                      f"p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, RSS {s['rss_mb_start']} -> {s['rss_mb_end']} MB "
                      f"(max {s['rss_mb_max']})", "", "| t (s) | RSS (MB) | requests | 5xx |", "|---:|---:|---:|---:|"]
        lines += [f"| {p['t']} | {p['rss_mb']} | {p['requests']} | {p['5xx']} |" for p in s["samples"]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="shipped model, checkpoint folder, or tiny-random")
    ap.add_argument("--levels", default="1,8,32", help="concurrent clients, comma-separated")
    ap.add_argument("--seconds", type=float, default=30.0, help="load duration of each level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=0, help="server torch threads (0: torch's default)")
    ap.add_argument("--soak", type=float, default=0.0, help="soak mode: seconds of load (skips the throughput runs)")
    ap.add_argument("--clients", type=int, default=16, help="soak mode: concurrent clients")
    ap.add_argument("--batch-size", type=int, default=0, help="soak mode: server batch size (0: = clients)")
    ap.add_argument("--sample-every", type=float, default=5.0, help="soak mode: RSS sampling period (s)")
    ap.add_argument("--samples", action="store_true", help="n samples per request, seeded and unseeded, batching "
                    "on (key 'samples'; skips the other runs)")
    ap.add_argument("--ns", default="1,4,8", help="--samples: samples per request, comma-separated")
    ap.add_argument("--sample-temperature", type=float, default=0.7, help="--samples: temperature of the requests")
    ap.add_argument("--quick", action="store_true", help="2 s per level, 16 tokens in 8 steps: a smoke run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.max_tokens, args.steps, args.block_length = 2.0, 16, 8, 8
        args.sample_every = min(args.sample_every, 1.0)

    with tempfile.TemporaryDirectory() as tmp:
        model = str(tiny_random_checkpoint(Path(tmp) / "tiny-random")) if args.model == "tiny-random" else args.model
        out = Path(args.out)
        result = json.loads(out.read_text()) if out.exists() else {}
        key = "meta_soak" if args.soak else "meta_samples" if args.samples else "meta"
        result[key] = {
            "model": args.model, "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "max_tokens": args.max_tokens, "steps": args.steps,
            "block_length": args.block_length, "batch_wait_ms": args.batch_wait_ms, "threads": args.threads,
            "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cpu": cpu_name(), **({"seconds": args.seconds, "ns": args.ns, "temperature": args.sample_temperature}
                                  if args.samples else {})}
        if args.soak:
            result["soak"] = soak(model, args)
        elif args.samples:
            result["samples"] = samples(model, args)
        else:
            result["throughput"] = throughput(model, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
