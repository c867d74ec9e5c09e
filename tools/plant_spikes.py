"""Plant degenerate rows where a run will read them: a copy of a packed dataset whose rows read at steps
[start, start + steps) by a run of this seed and global batch hold one repeated token or random ids.

    python tools/plant_spikes.py --data PREFIX --output PREFIX --seed 1234 --global-batch 8 \\
        --start 40 --steps 5 [--kind repeat|random] [--token 7]

The loader permutes rows per epoch (`data.loader.PackedLoader`), so a contiguous block of the file would
be scattered over the run; this writes the rows the stream reaches at those steps (the first epoch's
or any later one's). Document boundaries are kept, so only the tokens change. The copy is written under
a temporary name and renamed; its JSON (written last) records what was planted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from data.errors import DataError
from data.format import PackedDataset, dataset_exists, dataset_files, temporary_name, token_dtype
from data.loader import PackedLoader

KINDS = ("repeat", "random")


def planted_rows(data: str | Path, seed: int, global_batch: int, start: int, steps: int) -> list[int]:
    """The dataset rows a run of `seed` and `global_batch` reads at steps [start, start + steps), sorted."""
    loader = PackedLoader(PackedDataset(data), global_batch, global_batch, 0, 1, seed)
    return sorted({row for _, row in loader.rows_of_steps(start, steps)})


def plant(data: str | Path, output: str | Path, seed: int, global_batch: int, start: int, steps: int,
          kind: str = "repeat", token: int = 7) -> dict:
    """Write the planted copy at `output`; returns what the JSON records under "planted"."""
    # 1. everything checked before anything is written
    if kind not in KINDS:
        raise DataError(f"--kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    if start < 1 or steps < 1 or global_batch < 1:
        raise DataError(f"--start, --steps and --global-batch must be >= 1, got {start}, {steps}, {global_batch}")
    if dataset_exists(output):
        raise DataError(f"{output} exists; choose a new --output prefix (a planted copy is never overwritten)")
    source = PackedDataset(data)
    vocab = source.vocab_size
    if not 0 <= token < vocab:
        raise DataError(f"--token {token} is outside the {vocab}-token vocabulary of {data}")
    rows = planted_rows(data, seed, global_batch, start, steps)
    # 2. the copy, its planted rows rewritten in place (every row is exactly seq_len tokens)
    out_files = dataset_files(output)
    tmp = [Path(temporary_name(f)) for f in out_files]
    try:
        for src, dst in zip(dataset_files(data)[:-1], tmp[:-1]):
            shutil.copyfile(src, dst)
        tokens = np.memmap(tmp[0], dtype=token_dtype(vocab), mode="r+").reshape(-1, source.seq_len)
        rng = np.random.default_rng([seed, start, steps])
        for row in rows:
            tokens[row] = token if kind == "repeat" else rng.integers(0, vocab, source.seq_len)
        tokens.flush()
        del tokens
        planted = {"seed": seed, "global_batch": global_batch, "start": start, "steps": steps, "kind": kind,
                   "token": token if kind == "repeat" else None, "rows": rows, "source": str(data)}
        meta = dict(source.meta, planted=planted)
        meta["max_token_id"] = vocab - 1 if kind == "random" else max(int(meta.get("max_token_id", token)), token)
        tmp[-1].write_text(json.dumps(meta, indent=2, sort_keys=True))
        for t, f in zip(tmp, out_files):  # the JSON last: without it the copy is incomplete by construction
            os.replace(t, f)
    finally:
        for t in tmp:
            t.unlink(missing_ok=True)
    return planted


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the packed dataset's prefix")
    ap.add_argument("--output", required=True, help="the planted copy's prefix (must not exist)")
    ap.add_argument("--seed", type=int, required=True, help="the run's seed (it fixes the row order)")
    ap.add_argument("--global-batch", type=int, required=True, help="the run's trainer.global_batch_size")
    ap.add_argument("--start", type=int, required=True, help="the first step (1-based) that reads planted rows")
    ap.add_argument("--steps", type=int, default=1, help="how many steps read them")
    ap.add_argument("--kind", default="repeat", choices=KINDS, help="one repeated token, or uniform random ids")
    ap.add_argument("--token", type=int, default=7, help="the repeated token (--kind repeat)")
    a = ap.parse_args(argv)
    try:
        planted = plant(a.data, a.output, a.seed, a.global_batch, a.start, a.steps, a.kind, a.token)
    except DataError as e:
        print(f"plant_spikes: error: {e}", file=sys.stderr)
        return 2
    print(f"planted {len(planted['rows'])} {a.kind} rows read at steps {a.start}..{a.start + a.steps - 1} "
          f"(seed {a.seed}) into {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
