"""The continual-pretraining packing experiment of keel issue 3: CT (concat) vs BFD vs SP.

1. pack: tokenize the standard library's test files (``stdlib:tests`` train split) once and pack them
   with every method (``tools/pack.py --compare``), and build the fixed validation set from the
   ``stdlib:tests`` val split (see ``pack_split_val``); the packed sets land in ``runs/cpt_data/``.
2. pretrain: one small GPT on ``stdlib:code`` (``+experiment=cpt_pretrain``, into ``runs/cpt_pretrain``).
3. cpt: continue it on ``stdlib:tests`` with each method and seed (``+experiment=cpt_packing``), plus
   one near-zero-LR run (``init``) that only measures the pretrained model on the validation set.
4. report: aggregate every run's ``metrics.jsonl`` into JSON and a PNG.

    python tools/cpt_experiment.py                       # everything; finished runs are skipped
    python tools/cpt_experiment.py --dry-run             # print the exact commands only
    python tools/cpt_experiment.py --stage report        # re-aggregate existing runs

Equal training tokens: every continual run takes max_steps x global_batch_size rows of seq_len
tokens, whatever the method (rows x L, padding and SP's duplicated tokens included).
Run from the repository root (the experiment's paths are relative to it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pretrain.callbacks import pyplot, read_metrics, write_json  # noqa: E402

METHODS = ("concat", "bfd", "sp")
SEEDS = (1, 2, 3)
SEQ_LEN = 256  # must match conf/experiment/cpt_*.yaml
VAL_ROWS = 256  # = trainer.eval_batches x trainer.global_batch_size of cpt_packing.yaml
DATA_DIR = Path("runs/cpt_data")
PRETRAIN_DIR = Path("runs/cpt_pretrain")
CPT_DIR = Path("runs/cpt_packing")
INIT_RUN = "init"  # the pretrained model's validation loss, before continual pretraining


def train_prefix(method: str, seq_len: int = SEQ_LEN) -> Path:
    return DATA_DIR / f"tests-train-L{seq_len}.{method}"  # as cpt_packing.yaml's data.path


def val_prefix(seq_len: int = SEQ_LEN) -> Path:
    return DATA_DIR / f"tests-val-L{seq_len}.split"  # as cpt_packing.yaml's data.val_path


# --- Planning -----------------------------------------------------------------------------------
@dataclass
class Run:
    name: str  # concat-seed1, ..., init
    method: str
    seed: int
    run_dir: Path
    argv: list[str] = field(default_factory=list)

    def command(self) -> str:
        return " ".join(["python", *self.argv])


def plan_runs(methods=METHODS, seeds=SEEDS, extra: tuple[str, ...] = ()) -> list[Run]:
    """The continual runs, ``init`` first: one per (method, seed), all from the same pretrained weights."""
    runs = [Run(INIT_RUN, "concat", SEEDS[0], CPT_DIR / INIT_RUN,
                ["pretrain/main.py", "+experiment=cpt_packing", f"run_dir={CPT_DIR / INIT_RUN}",
                 # one step at a negligible learning rate: the pretrained weights, evaluated
                 "trainer.max_steps=1", "lr.warmup_steps=0", "optim.lr=1e-12", "optim.weight_decay=0", *extra])]
    for method in methods:
        for seed in seeds:
            name = f"{method}-seed{seed}"
            runs.append(Run(name, method, seed, CPT_DIR / name,
                            ["pretrain/main.py", "+experiment=cpt_packing", f"data.pack_method={method}",
                             f"seed={seed}", *extra]))
    return runs


def pretrain_argv(extra: tuple[str, ...] = ()) -> list[str]:
    return ["pretrain/main.py", "+experiment=cpt_pretrain", *extra]


def pack_argv(tokenizer: str, seq_len: int = SEQ_LEN) -> list[str]:
    return ["tools/pack.py", "--input", "stdlib:tests:train", "--tokenizer", tokenizer, "--seq-len", str(seq_len),
            "--compare", "--output", str(DATA_DIR / f"tests-train-L{seq_len}"), "--overwrite", "--no-progress"]


def completed(run_dir: Path) -> bool:
    p = run_dir / "result.json"
    return p.exists() and json.loads(p.read_text()).get("status") == "completed"


# --- The fixed validation set ---------------------------------------------------------------------
def split_pieces(offsets: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every document cut into consecutive seq_len-token pieces, the last one shorter (padded in its row).

    Returns (src, length, doc): no piece mixes documents and every token appears exactly once.
    """
    offsets = np.asarray(offsets, np.int64)
    lengths = np.diff(offsets)
    counts = -(-lengths // seq_len)
    doc = np.repeat(np.arange(lengths.size, dtype=np.int64), counts)
    first = np.concatenate([[0], np.cumsum(counts)])[:-1]
    k = np.arange(doc.size, dtype=np.int64) - first[doc]  # piece index within its document
    src = offsets[doc] + k * seq_len
    length = np.minimum(seq_len, offsets[doc + 1] - src)
    return src, length, doc


def sample_rows(n: int, rows: int, seed: int = 0) -> np.ndarray:
    """A fixed random subset of ``rows`` row indices out of ``n`` (all of them when n <= rows), sorted."""
    if n <= rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=rows, replace=False))


def pack_split_val(tokenizer, seq_len: int, output: Path, rows: int = VAL_ROWS, split: str = "val") -> dict:
    """The validation set every method is scored on: ``stdlib:tests`` val, one document piece per row.

    Documents are cut into seq_len-token pieces (tails padded, padding masked out of the loss), so no
    row mixes documents and none depends on how the training data was packed; a fixed random sample
    of ``rows`` pieces is kept so one evaluation stays cheap on a CPU.
    """
    from data.corpus import stdlib_documents
    from data.format import PackedWriter
    from data.packing import Plan, plan_stats
    from data.pipeline import tokenized

    with tokenized(stdlib_documents("tests", split), tokenizer, output, progress=False) as corpus:
        src, length, doc = split_pieces(corpus.offsets, seq_len)
        keep = sample_rows(src.size, rows)
        plan = Plan.single(src[keep], length[keep], doc[keep])
        stats = {**corpus.stats, **plan_stats(plan, corpus.offsets, seq_len), "pieces_before_sampling": int(src.size)}
        stats.pop("tokenize_seconds", None)
        stream = corpus.stream()
        writer = PackedWriter(output, seq_len, tokenizer.vocab_size)
        buf = np.empty(seq_len, dtype=stream.dtype)
        for s, k in zip(plan.src, plan.length):
            buf[:k] = stream[s:s + k]
            buf[k:] = tokenizer.pad
            writer.add_row(buf, [0], int(k))
        meta = {"tokenizer": tokenizer.describe(), "method": "split",
                "settings": {"seq_len": seq_len, "sampled_rows": rows, "sample_seed": 0,
                             "description": "each document cut into seq_len pieces, tails padded; "
                                            "fixed random sample of the pieces"},
                "stats": stats, "source": {"inputs": [f"stdlib:tests:{split}"]}}
        return writer.finalize(meta)


# --- Aggregation --------------------------------------------------------------------------------
def val_curve(rows: list[dict]) -> dict[int, float]:
    return {int(r["step"]): float(r["val_loss"]) for r in rows if isinstance(r.get("val_loss"), (int, float))}


def _summary(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return {"mean": float(a.mean()), "std": std, "min": float(a.min()), "max": float(a.max()),
            "spread": float(a.max() - a.min()), "n": int(a.size), "values": [float(v) for v in a],
            "perplexity_of_mean": float(math.exp(a.mean()))}


def aggregate(curves: dict[str, dict[int, dict[int, float]]], init_loss: float | None = None) -> dict:
    """Per method: final validation loss over seeds, and the curve (mean/min/max at each step).

    ``curves[method][seed][step] = val_loss``. Only steps every seed of a method evaluated are kept.
    """
    out = {}
    for method, by_seed in curves.items():
        if not by_seed:
            continue
        steps = sorted(set.intersection(*(set(c) for c in by_seed.values())))
        if not steps:
            continue
        curve = {"step": steps, "mean": [], "min": [], "max": []}
        for s in steps:
            v = [c[s] for c in by_seed.values()]
            curve["mean"].append(float(np.mean(v)))
            curve["min"].append(float(np.min(v)))
            curve["max"].append(float(np.max(v)))
        final = _summary([by_seed[seed][steps[-1]] for seed in sorted(by_seed)])
        out[method] = {"seeds": sorted(by_seed), "final_step": steps[-1], "final_val_loss": final, "curve": curve}
    if init_loss is not None:
        for m in out.values():
            m["curve_with_init"] = {"step": [0] + m["curve"]["step"], "mean": [init_loss] + m["curve"]["mean"],
                                    "min": [init_loss] + m["curve"]["min"], "max": [init_loss] + m["curve"]["max"]}
    ranking = sorted(out, key=lambda m: out[m]["final_val_loss"]["mean"])
    return {"methods": out, "ranking_by_mean_final_val_loss": ranking}


def collect(methods=METHODS, seeds=SEEDS, root: Path = CPT_DIR) -> tuple[dict, float | None]:
    curves = {m: {} for m in methods}
    for m in methods:
        for s in seeds:
            c = val_curve(read_metrics(root / f"{m}-seed{s}"))
            if c and completed(root / f"{m}-seed{s}"):
                curves[m][s] = c
    init = val_curve(read_metrics(root / INIT_RUN))
    return curves, (init[max(init)] if init else None)


def packing_stats(methods=METHODS, seq_len: int = SEQ_LEN) -> dict:
    keys = ("rows", "corpus_tokens", "content_tokens", "padding_share", "duplicated_share", "truncated_share",
            "split_share", "pieces_per_row", "documents")
    out = {}
    for m in (*methods, "val"):
        p = Path(f"{val_prefix(seq_len) if m == 'val' else train_prefix(m, seq_len)}.json")
        if p.exists():
            s = json.loads(p.read_text())["stats"]
            out[m] = {k: s[k] for k in (*keys, "pieces_before_sampling") if k in s}
    return out


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    colors = {"concat": "tab:blue", "bfd": "tab:orange", "sp": "tab:green"}
    labels = {"concat": "CT (concat)", "bfd": "BFD", "sp": "SP"}
    fig, (ax, zoom, dots) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.1, 1.1, 0.8]})
    for i, (method, m) in enumerate(report["methods"].items()):
        c, color = m.get("curve_with_init", m["curve"]), colors.get(method)
        f = m["final_val_loss"]
        label = f"{labels.get(method, method)}: {f['mean']:.4f} ± {f['std']:.4f} (n={f['n']})"
        ax.plot(c["step"], c["mean"], marker="o", ms=3, color=color, label=label)
        ax.fill_between(c["step"], c["min"], c["max"], color=color, alpha=0.2)
        late = range(min(1, len(m["curve"]["step"]) - 1), len(m["curve"]["step"]))  # from the 2nd evaluation
        z = {k: [m["curve"][k][j] for j in late] for k in ("step", "mean", "min", "max")}
        zoom.plot(z["step"], z["mean"], marker="o", ms=3, color=color, label=label)
        zoom.fill_between(z["step"], z["min"], z["max"], color=color, alpha=0.2)
        dots.scatter([i] * f["n"], f["values"], color=color, s=18, zorder=3)
        dots.errorbar([i + 0.15], [f["mean"]], yerr=[f["std"]], fmt="s", color=color, capsize=4)
    ax.set_title("new-domain validation loss (stdlib:tests val)")
    zoom.set_title("zoom from the 2nd evaluation; band = min..max over seeds")
    for a in (ax, zoom):
        a.set_xlabel("continual-pretraining step (step 0: pretrained model)")
        a.set_ylabel("validation loss (nats/token)")
        a.grid(alpha=0.3)
    zoom.legend(fontsize=8)
    names = list(report["methods"])
    dots.set_xticks(range(len(names)), [labels.get(n, n) for n in names])
    dots.set_xlim(-0.5, len(names) - 0.5)
    dots.set_title("final validation loss: seeds, mean ± std")
    dots.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- Execution ----------------------------------------------------------------------------------
def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _launch(argv: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] python {' '.join(argv)}  (log: {log})", flush=True)
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=_env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def run_all(runs: list[Run], jobs: int) -> list[str]:
    """Run at most ``jobs`` at once; returns the names that failed."""
    pending, active, failed = list(runs), [], []
    while pending or active:
        while pending and len(active) < jobs:
            r = pending.pop(0)
            active.append((r, _launch(r.argv, Path(f"{r.run_dir}.log"))))
        time.sleep(2)
        for r, p in list(active):
            if p.poll() is not None:
                active.remove((r, p))
                print(f"[{time.strftime('%H:%M:%S')}] {r.name}: exit {p.returncode}", flush=True)
                if p.returncode != 0:
                    failed.append(r.name)
    return failed


def stage_pack(tokenizer_path: str, dry: bool) -> None:
    cmd = pack_argv(tokenizer_path)
    print("python " + " ".join(cmd))
    print(f"(validation set) pack_split_val -> {val_prefix()}")
    if dry:
        return
    subprocess.run([sys.executable, *cmd], cwd=ROOT, env=_env(), check=True)
    from data.tokenizer import Tokenizer

    meta = pack_split_val(Tokenizer(tokenizer_path), SEQ_LEN, ROOT / val_prefix())
    print(f"wrote {val_prefix()} ({meta['rows']} rows of {meta['stats']['pieces_before_sampling']} pieces)")
    subprocess.run([sys.executable, "tools/pack.py", "--verify", *(str(train_prefix(m)) for m in METHODS),
                    str(val_prefix())], cwd=ROOT, env=_env(), check=True)


def stage_report(json_path: Path, png_path: Path) -> dict:
    curves, init = collect()
    report = aggregate(curves, init)
    report["init_val_loss"] = init
    report["packing"] = packing_stats()
    report["setup"] = {
        "pretrain": "python " + " ".join(pretrain_argv()), "continual": [r.command() for r in plan_runs()],
        "seq_len": SEQ_LEN, "validation_rows": VAL_ROWS,
        "equal_tokens": "every continual run: max_steps x global_batch_size rows of seq_len tokens "
                        "(rows x L, padding and SP duplicates included)"}
    for name in ("cpt_pretrain", "cpt_packing"):
        p = ROOT / "conf" / "experiment" / f"{name}.yaml"
        report["setup"][f"{name}.yaml"] = p.read_text() if p.exists() else None
    res = PRETRAIN_DIR / "result.json"
    report["pretrain_result"] = json.loads(res.read_text()) if res.exists() else None
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(json_path, report)
    if report["methods"]:
        plot(report, png_path)
    for method, m in report["methods"].items():
        f = m["final_val_loss"]
        print(f"{method:>7}: val loss {f['mean']:.4f} ± {f['std']:.4f} (min {f['min']:.4f}, max {f['max']:.4f}, "
              f"n={f['n']}), ppl {f['perplexity_of_mean']:.3f}")
    print(f"init: {init}; wrote {json_path} and {png_path}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("all", "pack", "pretrain", "cpt", "report"), default="all")
    p.add_argument("--jobs", type=int, default=2, help="training runs at once")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--force", action="store_true", help="rerun finished runs (their folders are removed)")
    p.add_argument("--json", default="docs/results/cpt_packing.json")
    p.add_argument("--png", default="docs/results/cpt_packing.png")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    stages = ("pack", "pretrain", "cpt", "report") if args.stage == "all" else (args.stage,)
    if "pack" in stages:
        from data.prepare import ensure_tokenizer, tokenizer_path
        from pretrain.config import DataConfig

        cfg = DataConfig()
        if not args.dry_run:
            ensure_tokenizer(cfg)
        stage_pack(str(tokenizer_path(cfg)), args.dry_run)
    if "pretrain" in stages:
        print("python " + " ".join(pretrain_argv()))
        if not args.dry_run and (args.force or not completed(PRETRAIN_DIR)):
            _clear(PRETRAIN_DIR, args.force)
            if run_all([Run("pretrain", "concat", 0, PRETRAIN_DIR, pretrain_argv())], 1):
                return 1
    if "cpt" in stages:
        runs = plan_runs()
        for r in runs:
            print(r.command())
        if not args.dry_run:
            todo = [r for r in runs if args.force or not completed(r.run_dir)]
            for r in todo:
                _clear(r.run_dir, True)  # a half-finished run would resume; start it afresh instead
            if failed := run_all(todo, args.jobs):
                print(f"failed: {', '.join(failed)} (see runs/cpt_packing/*.log)", file=sys.stderr)
    if "report" in stages and not args.dry_run:
        stage_report(Path(args.json), Path(args.png))
    return 0


def _clear(run_dir: Path, really: bool) -> None:
    import shutil

    if really and run_dir.exists():
        shutil.rmtree(run_dir)


if __name__ == "__main__":
    sys.exit(main())
