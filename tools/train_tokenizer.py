"""Train a sentencepiece BPE tokenizer on a corpus.

    python tools/train_tokenizer.py --input stdlib:all:train --vocab-size 8192 --output tok.model
    python tools/train_tokenizer.py --input 'data/*.jsonl' --text-field text --vocab-size 32000 --output tok.model

Inputs are read exactly as `tools/pack.py` reads them (local files, globs, or the named stdlib
corpus). Whitespace is kept and unknown bytes fall back to byte tokens, so code round-trips.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.sources import InputError, DocumentSource


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", nargs="+", required=True, help="files, globs, or stdlib[:SUBSET[:SPLIT]]")
    ap.add_argument("--output", required=True, help="path of the .model file to write")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--text-mode", default="file", choices=["file", "line"])
    ap.add_argument("--max-lines", type=int, default=400_000, help="lines sampled for training")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.vocab_size < 260:
            raise InputError(f"--vocab-size {args.vocab_size} is too small: byte fallback alone needs 256 ids plus "
                             "specials; use at least 260")
        out = Path(args.output)
        if out.exists() and not args.overwrite:
            raise InputError(f"{out} already exists; pass --overwrite or choose another --output")
        source = DocumentSource(args.input, text_field=args.text_field, text_mode=args.text_mode)
        from data.tokenizer import load_tokenizer, train_tokenizer

        train_tokenizer((d.text for d in source), out, args.vocab_size, max_lines=args.max_lines)
    except (InputError, RuntimeError) as e:
        print(f"train_tokenizer: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    tok = load_tokenizer(out)
    print(f"wrote {out}: {tok.vocab_size} tokens (eod={tok.eod}, pad={tok.pad})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
