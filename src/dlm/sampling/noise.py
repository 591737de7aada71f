"""Sampling noise with one random generator per row, so that a row's draws never depend on its neighbours.

A batched call decodes several rows at once: the samples of one prompt (`num_samples`), several prompts, or, in
the server, several requests. With a single torch.Generator for the batch, row r's noise is whatever the stream
holds after the draws of rows 0..r-1, so a seeded row changes when its neighbours change. `RowGenerators` holds one
torch.Generator per row, and every random draw of the samplers goes through `uniform` / `randint` below, which
draw row by row from each row's own generator.

The row-seed rule (`row_seed`): row i of a request seeded with `seed` gets the generator seeded `row_seed(seed,
i)`, where i counts the request's rows in order (prompt p's sample j is row p * num_samples + j): `seed` itself for
row 0, and for i >= 1 a SplitMix64 hash of (seed, i). So row 0 of a seeded call is exactly the one-generator
stream of that seed, `num_samples = n` gives n different reproducible samples, a request batched with other
requests (the server) gives the text it gives alone, and the rows of nearby seeds do not overlap (with `seed + i`,
seeds 0 and 1 at n = 4 would share three of their four samples; here they share none, up to hash collisions in
2**63). Unseeded (`seed=None`): a fresh random base seed, then the same rule, so rows differ.

The draws are laid out per candidate, never per canvas position: a step draws only at the positions it may change
(its candidates, in row-major order), and only in the rows that may change, so a row's stream is the same whether
it is left-padded in a wider batch or not, and whether its neighbours still take steps after it has finished.
A plain torch.Generator (or None: the global RNG) still works wherever a RowGenerators does: it draws the whole
batch from the one stream, as before.

    g = RowGenerators.seeded(seed=0, rows=4)                     # rows seeded row_seed(0, 0..3): 0, then hashes
    u = uniform(g.for_items(candidate.sum(1)), (N, V))           # N = candidate.sum(): row r draws its (n_r, V)
    kept = g.subset(torch.tensor([True, False, True, True]))     # rows leave the batch with their generators
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

SEED_SPACE = 2**63  # base seeds drawn for unseeded calls stay in the seed rule's range [0, 2**63)
_MASK64 = 2**64 - 1


def row_seed(seed: int, i: int) -> int:
    """The seed of row i of a request seeded `seed`: `seed` for row 0; else SplitMix64's finaliser of
    seed + i * golden ratio (Steele et al. 2014), in [0, 2**63)."""
    if i == 0:
        return seed
    z = (seed + i * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) % SEED_SPACE


class RowGenerators:
    """One torch.Generator per row of a batch; `counts` (B,) is how the next draw's items are split over rows
    (None: one leading-dimension slice per row)."""

    def __init__(self, generators: Sequence[torch.Generator], counts: torch.Tensor | None = None) -> None:
        self.generators = list(generators)
        self.counts = counts

    @classmethod
    def seeded(cls, seed: int | None, rows: int, device: torch.device | str = "cpu") -> RowGenerators:
        """Row i seeded `row_seed(seed, i)`; `seed=None` draws a fresh base seed (fresh noise, every row
        different)."""
        base = secrets.randbelow(SEED_SPACE) if seed is None else seed  # the global RNG is left alone
        return cls.from_seeds([row_seed(base, i) for i in range(rows)], device)

    @classmethod
    def from_seeds(cls, seeds: Sequence[int], device: torch.device | str = "cpu") -> RowGenerators:
        return cls([torch.Generator(device=device).manual_seed(int(s)) for s in seeds])

    def __len__(self) -> int:
        return len(self.generators)

    def for_items(self, counts: torch.Tensor) -> RowGenerators:
        """The same generators for draws over items in row-major order, counts[r] (B,) of them in row r."""
        if counts.shape != (len(self),):
            raise ValueError(f"counts must have one entry per row ({len(self)}), got shape {tuple(counts.shape)}")
        return RowGenerators(self.generators, counts)

    def subset(self, keep: torch.Tensor) -> RowGenerators:
        """The rows `keep` selects ((B,) bool, or indices): their generators, whose streams carry on."""
        idx = keep.nonzero()[:, 0] if keep.dtype == torch.bool else keep
        return RowGenerators([self.generators[i] for i in idx.tolist()])


Noise = torch.Generator | RowGenerators | None  # what every sampler's `generator` argument may be


def for_items(generator: Noise, counts: torch.Tensor) -> Noise:
    """`generator.for_items(counts)` for RowGenerators; a single generator (or None) is returned as it is."""
    return generator.for_items(counts) if isinstance(generator, RowGenerators) else generator


def subset(generator: Noise, keep: torch.Tensor) -> Noise:
    """The generators of the kept rows; a single generator (or None) is shared by every row and kept as it is."""
    return generator.subset(keep) if isinstance(generator, RowGenerators) else generator


def _row_sizes(generator: RowGenerators, shape: Sequence[int]) -> list[int]:
    """How many of the flattened elements of a draw of `shape` each row owns (consecutive, in row order)."""
    numel = 1
    for d in shape:
        numel *= int(d)
    if generator.counts is None:
        if not shape or int(shape[0]) != len(generator):
            raise ValueError(f"a draw of shape {tuple(shape)} for {len(generator)} rows needs counts "
                             "(RowGenerators.for_items)")
        return [numel // len(generator)] * len(generator)
    counts = generator.counts.tolist()
    items = sum(counts)
    if items == 0:
        if numel:
            raise ValueError(f"a draw of shape {tuple(shape)} for rows that own no items")
        return [0] * len(counts)
    if numel % items:
        raise ValueError(f"a draw of shape {tuple(shape)} does not split over {items} items")
    per_item = numel // items
    return [c * per_item for c in counts]


def uniform(generator: Noise, shape: Sequence[int], dtype: torch.dtype = torch.float64,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """U[0, 1) of `shape`; with RowGenerators each row draws its own consecutive elements from its generator."""
    if not isinstance(generator, RowGenerators):
        return torch.rand(tuple(shape), generator=generator, dtype=dtype, device=device)
    parts = [torch.rand(n, generator=g, dtype=dtype, device=device)
             for g, n in zip(generator.generators, _row_sizes(generator, shape), strict=True) if n]
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)
    return flat.view(tuple(shape))


def randint(generator: Noise, high: int, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Integers uniform in [0, high) of `shape`, row by row as `uniform`."""
    if not isinstance(generator, RowGenerators):
        return torch.randint(0, high, tuple(shape), generator=generator, device=device)
    parts = [torch.randint(0, high, (n,), generator=g, device=device)
             for g, n in zip(generator.generators, _row_sizes(generator, shape), strict=True) if n]
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)
    return flat.view(tuple(shape))


def as_noise(generator: Noise | Sequence[torch.Generator]) -> Noise:
    """A list of torch.Generators (one per row, diffusers' convention) -> RowGenerators; others unchanged."""
    if isinstance(generator, (list, tuple)):
        return RowGenerators(generator)
    return generator
