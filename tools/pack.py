"""Pack a corpus into fixed-length rows for pretraining (see data/pipeline.py for the methods).

    python tools/pack.py --input stdlib --tokenizer tok.model --seq-len 2048 --method sp --output out/stdlib
    python tools/pack.py --input 'shards/*.jsonl' --text-field text ... --compare   # all four methods
    python tools/pack.py --verify out/stdlib.sp out/stdlib.bfd                      # re-check datasets
    python tools/pack.py ... --work-dir work/c --executor slurm --executor-option slurm_partition=cpu
        # in three restartable stages (tokenize shards, plan, write parts and merge): rerun to resume

With --work-dir the rows are byte-identical to a one-process pack of the same corpus, method and seed.

Exit codes: 0 done, 1 --verify found problems, 2 bad input or settings (one line on stderr).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from data.errors import DataError
from data.executors import EXECUTORS, STAGES
from data.packing import METHODS, UNDERFULL
from data.sources import TEXT_MODES, InputError, DocumentSource, check_settings
from data.tokenizer import Tokenizer, load_tokenizer

_TABLE_ROWS = [  # (stats key, label, format)
    ("documents", "documents", "{:,}"), ("empty_documents", "empty documents (skipped)", "{:,}"),
    ("corpus_tokens", "corpus tokens (incl. EOD)", "{:,}"), ("rows", "rows", "{:,}"),
    ("documents_per_row", "documents / row", "{:.3f}"), ("pieces_per_row", "document pieces / row", "{:.3f}"),
    ("truncated_tokens", "truncated tokens", "{:,}"), ("truncated_share", "  share of corpus", "{:.3%}"),
    ("padding_tokens", "padding tokens", "{:,}"), ("padding_share", "  share of output", "{:.3%}"),
    ("duplicated_tokens", "duplicated tokens", "{:,}"), ("duplicated_share", "  share of corpus", "{:.3%}"),
    ("split_documents", "split documents", "{:,}"), ("split_share", "  share of documents", "{:.2%}"),
    ("packer_tokens_per_s", "packer tokens/s", "{:,}"), ("tokens_per_s", "tool tokens/s", "{:,}"),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(2, f"pack.py: error: {message}; see --help\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", metavar="PATH", help="files, globs, or stdlib[:all|code|tests[:train|val]]")
    p.add_argument("--tokenizer", help="sentencepiece .model, tokenizer.json or a Hugging Face model folder")
    p.add_argument("--seq-len", type=int, help="row length L in tokens")
    p.add_argument("--method", choices=METHODS, default="sp")
    p.add_argument("--output", help="dataset prefix (with --compare: PREFIX.<method> for each method)")
    p.add_argument("--overlap-ratio", type=float, default=0.3, help="sp: max overlap per join, fraction of L")
    p.add_argument("--extra-capacity", type=int, default=50, help="sp: bin capacity beyond L, in tokens")
    p.add_argument("--underfull", choices=UNDERFULL, default="concat", help="sp: what to do with bins under L")
    p.add_argument("--text-field", default="text", help="field holding the text in JSON/Parquet/Arrow")
    p.add_argument("--text-mode", choices=TEXT_MODES, default="file", help="plain text: one document per file/line")
    p.add_argument("--skip-missing-field", action="store_true",
                   help="skip (and count) JSON/Parquet/Arrow rows without --text-field instead of stopping")
    p.add_argument("--val-percent", type=float, default=5.0,
                   help="stdlib:SUBSET:train|val: the share of files held out, as data.val_percent")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--seed", type=int, default=0, help="seeds the order rows are written in")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--compare", action="store_true", help="pack with all four methods and compare")
    p.add_argument("--verify", nargs="+", metavar="PREFIX", help="check existing packed datasets and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they go to stderr)")
    g = p.add_argument_group("staged packing, past one machine (data/staged.py; README: packing on a Slurm cluster)")
    g.add_argument("--work-dir", help="pack in stages that keep their files here; a rerun resumes where it stopped")
    g.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="run one stage, or all in order")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local processes, Slurm job arrays (submitit; submitit-local: its local processes), or Ray")
    g.add_argument("--executor-option", nargs="+", default=[], metavar="KEY=VALUE",
                   help="to submitit's update_parameters (slurm_partition=cpu cpus_per_task=8 timeout_min=240 "
                        "slurm_array_parallelism=64 mem_gb=32) or Ray (address=auto num_cpus=4)")
    g.add_argument("--jobs", type=int, default=0, help="local executor: tasks at once (0: one per CPU core)")
    g.add_argument("--files-per-shard", type=int, default=1, help="input files tokenized by one task")
    g.add_argument("--parts", type=int, default=0, help="output parts written in parallel (0: one per shard)")
    g.add_argument("--retries", type=int, default=2, help="times a failed task is run again")
    return p


def _options(pairs: list[str]) -> dict:
    """KEY=VALUE pairs, numbers as numbers."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--executor-option {pair!r} is not KEY=VALUE; e.g. --executor-option timeout_min=240")
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                pass
        options[key] = value
    return options


def _require(args: argparse.Namespace) -> None:
    missing = [f"--{k.replace('_', '-')}" for k in ("input", "tokenizer", "seq_len", "output")
               if getattr(args, k) is None]
    if missing:
        raise InputError(f"missing {', '.join(missing)}; see --help")


def _load_tokenizer(path: str) -> Tokenizer:
    try:
        tok = load_tokenizer(path)
        from data.format import token_dtype

        token_dtype(tok.vocab_size)
    except DataError as e:  # a tokenizer keel cannot use, or a vocabulary the format cannot hold
        raise InputError(str(e)) from None
    return tok


def _print_table(metas: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"packing, L={next(iter(metas.values()))['seq_len']}")
    table.add_column("")
    for method in metas:
        table.add_column(method, justify="right")
    for key, label, fmt in _TABLE_ROWS:
        table.add_row(label, *(fmt.format(m["stats"][key]) if key in m["stats"] else "-" for m in metas.values()))
    Console(width=max(Console().width, 100)).print(table)  # pipes default to 80 columns


def _pack(args: argparse.Namespace) -> None:
    _require(args)
    settings = dict(overlap_ratio=args.overlap_ratio, extra_capacity=args.extra_capacity, underfull=args.underfull)
    methods = METHODS if args.compare else (args.method,)
    # 1. Everything cheap first, lightest first: settings, tokenizer, inputs, outputs.
    for method in methods:
        check_settings(args.seq_len, method, workers=args.workers, **settings)
    tok = _load_tokenizer(args.tokenizer)
    source = DocumentSource(args.input, text_field=args.text_field, text_mode=args.text_mode,
                    skip_missing_field=args.skip_missing_field, val_percent=args.val_percent)
    from data import pipeline  # imports torch and megatron-core: only once the cheap checks passed

    if args.work_dir:
        return _pack_staged(args, tok, source, settings)
    outputs = pipeline.compare_outputs(args.output, methods) if args.compare else {args.method: args.output}
    for out in outputs.values():
        pipeline.check_output(out, args.overwrite)
    # 2. Then the work.
    common = dict(workers=args.workers, seed=args.seed, overwrite=args.overwrite, progress=not args.no_progress,
                  metadata={"source": source.describe()}, **settings)
    if args.compare:
        metas = pipeline.pack_compare(source, tok, args.seq_len, args.output, **common)
    else:
        metas = {args.method: pipeline.pack_documents(source, tok, args.seq_len, args.method, args.output, **common)}
    _print_table(metas)
    if source.skipped:
        print(f"skipped {len(source.skipped):,} rows without the field {args.text_field!r} "
              f"(--skip-missing-field; first: {source.skipped[0]})")
    for method, out in outputs.items():
        print(f"wrote {out}.{{bin,idx,bounds.bin,bounds.idx,json}} ({metas[method]['rows']:,} rows)")


def _pack_staged(args: argparse.Namespace, tok: Tokenizer, source: DocumentSource, settings: dict) -> None:
    from data import executors, staged

    if args.compare:
        raise InputError("--compare and --work-dir: pack one --method per run; the tokenized shards are reused")
    if args.jobs < 0 or args.parts < 0 or args.retries < 0:
        raise InputError("--jobs, --parts and --retries must be >= 0")
    stages = STAGES if args.stage == "all" else (args.stage,)
    if "write" in stages:
        staged.check_staged_output(args.output, args.work_dir, args.overwrite)
    executor = executors.make_executor(args.executor, jobs=args.jobs or os.cpu_count() or 1,
                                       folder=Path(args.work_dir) / "logs", options=_options(args.executor_option))
    try:
        record = staged.pack_staged(
            source, tok, args.seq_len, args.method, args.output, args.work_dir, executor, stages=stages,
            files_per_shard=args.files_per_shard, parts=args.parts, workers=args.workers, seed=args.seed,
            retries=args.retries, progress=not args.no_progress, metadata={"source": source.describe()}, **settings)
    finally:
        executor.close()
    if "meta" in record:
        _print_table({args.method: record["meta"]})
        print(f"wrote {args.output}.{{bin,idx,bounds.bin,bounds.idx,json}} ({record['meta']['rows']:,} rows)")
    elif "plan" in stages:
        _print_table({args.method: record})
        print(f"planned {record['stats']['rows']:,} rows in {len(record['part_bounds']) - 1} parts: "
              f"{Path(args.work_dir) / 'plans' / record['key']}")
    else:
        print(f"tokenized into {Path(args.work_dir) / 'shards'}")
    if record.get("rows_missing_text_field"):
        print(f"skipped {record['rows_missing_text_field']:,} rows without the field {args.text_field!r} "
              "(--skip-missing-field)")


def _verify(prefixes: list[str]) -> int:
    from data.verify import verify_dataset

    failed = 0
    for prefix in prefixes:
        try:
            problems = verify_dataset(prefix)
        except OSError as e:  # unreadable files: reported like any other problem, never a traceback
            problems = [f"cannot read {e.filename or prefix}: {e.strerror or e}"]
        for p in problems:
            print(f"pack.py: verify: {p}", file=sys.stderr)
        print(f"{prefix}: {'FAILED' if problems else 'OK'}")
        failed += bool(problems)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.verify:
            return _verify(args.verify)
        _pack(args)
        return 0
    except DataError as e:  # bad input or settings, or a staged task that failed on every attempt
        print(f"pack.py: error: {e}", file=sys.stderr)
    except OSError as e:
        what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or type(e).__name__)
        print(f"pack.py: error: {what} ({e.filename or args.output}); nothing was written: free space or "
              "choose another --output, then rerun", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
