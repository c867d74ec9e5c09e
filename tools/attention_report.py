"""Aggregate attention-quality runs: validation loss against KV-cache bytes per token, per type.

    python tools/attention_report.py runs/attention_quality [MORE_ROOTS ...] --out docs/results --name attention_quality

Every completed run folder below the ROOTs (`+experiment=attention_quality attention=TYPE seed=S ...`) is
grouped by attention type and learning rate. For each group the report gives the final validation
loss per seed, its mean and standard deviation, the parameter count (the model is rebuilt from the
run's config) and the KV cache per token per layer at TP=1 (the formula of tools/kv_cache.py, which
its tests check against the real cache tensors). It prints a markdown table and writes NAME.json and
NAME.png (validation loss against KV bytes per token per layer, bf16) into --out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain import cpu_compat  # noqa: E402,F401  (silences megatron's import warnings)
from pretrain.callbacks import completed_runs, pyplot, write_json  # noqa: E402

TYPES = ("mha", "gqa", "mqa", "gta", "gla", "mla")
BF16_BYTES = 2


def load_runs(roots: list[Path]) -> list[dict]:
    """{type, lr, seed, val_loss, val_by_step, max_grad_norm, config} of each completed run."""
    runs = []
    for _, config, rows in completed_runs(*roots):
        val = {r["step"]: r["val_loss"] for r in rows if isinstance(r.get("val_loss"), float)}
        runs.append({"type": config["attention"]["type"], "lr": config["optim"]["lr"], "seed": config["seed"],
                     "val_loss": val[max(val)], "val_by_step": val, "config": config,
                     "max_grad_norm": max((r["grad_norm"] for r in rows if isinstance(r.get("grad_norm"), float)),
                                          default=None)})
    if not runs:
        raise SystemExit(f"no completed runs (result.json with status completed) below {', '.join(map(str, roots))}; "
                         "run the experiment first")
    return runs


def model_facts(config: dict) -> dict:
    """Parameters and KV-cache elements/bytes per token per layer of a run's model, at TP=1."""
    from kv_cache import formula
    from models.inference import build_for_decode
    from pretrain.config import config_from_dict

    cfg = config_from_dict(config)
    gpt = build_for_decode(cfg, cfg.data.vocab_size)
    elements = formula(cfg, 1)
    return {"params": sum(p.numel() for p in gpt.parameters()), "ffn": cfg.model.ffn_size,
            "kv_elements": elements, "kv_bytes_bf16": elements * BF16_BYTES}


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (type, lr), in TYPES order: seeds, losses, mean, std and the model's facts."""
    from pretrain import distributed
    from pretrain.config import ParallelConfig

    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["type"], r["lr"]), []).append(r)
    distributed.init(ParallelConfig(backend="gloo"))
    try:
        rows = []
        for (t, lr), members in sorted(groups.items(), key=lambda kv: (TYPES.index(kv[0][0]), kv[0][1])):
            members.sort(key=lambda r: r["seed"])
            losses = [r["val_loss"] for r in members]
            rows.append({"attention": t, "lr": lr, "seeds": [r["seed"] for r in members], "val_loss": losses,
                         "mean": statistics.mean(losses), "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                         "max_grad_norm": [r["max_grad_norm"] for r in members], **model_facts(members[0]["config"])})
        return rows
    finally:
        distributed.shutdown()


def markdown_table(rows: list[dict]) -> str:
    lines = ["| attention | lr | FFN | params | KV elements/token/layer | KV bytes (bf16) | val loss per seed | mean ± std |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        per_seed = ", ".join(f"{v:.4f}" for v in r["val_loss"])
        lines.append(f"| {r['attention']} | {r['lr']:g} | {r['ffn']} | {r['params']:,} | {r['kv_elements']} | "
                     f"{r['kv_bytes_bf16']} | {per_seed} | {r['mean']:.4f} ± {r['std']:.4f} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lrs = sorted({r["lr"] for r in rows})
    for r in rows:
        x = r["kv_bytes_bf16"] * (1 + 0.04 * lrs.index(r["lr"]))  # nudge LRs apart on the log axis
        ax.scatter([x] * len(r["val_loss"]), r["val_loss"], s=12, alpha=0.45, color="gray")
        marker = "os^D"[lrs.index(r["lr"]) % 4]
        ax.errorbar(x, r["mean"], yerr=r["std"], fmt=marker, capsize=3,
                    label=f"{r['attention']} (lr {r['lr']:g})" if len(lrs) > 1 else r["attention"])
        ax.annotate(r["attention"], (x, r["mean"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set(xscale="log", xlabel="KV cache bytes per token per layer (bf16, TP=1)",
           ylabel="final validation loss (mean ± std over seeds)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", type=Path, nargs="+", help="folders holding the run folders (any depth)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default="attention_quality", help="stem of the JSON and PNG written into --out")
    args = p.parse_args(argv)
    rows = summarize(load_runs(args.roots))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", {"roots": [str(r) for r in args.roots], "rows": rows})
    plot(rows, args.out / f"{args.name}.png", f"attention quality: {args.name}")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
