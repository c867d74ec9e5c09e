"""Aggregate attention-quality runs: validation loss against KV-cache bytes per token, per type.

    python tools/experiments/attention_report.py runs/attention_quality [MORE_ROOTS ...] --out docs/results \
        --name attention_quality

The runs (docs/results/attention.md), one Hydra multirun per attention type, with F the type's FFN
width from the table there, so that every type has the same parameter count; the preset sets
hydra.sweep.dir=runs/attention_quality (add hydra/launcher=local hydra.launcher.n_jobs=N for N at once):

    python pretrain/main.py -m +experiment=attention_quality attention=TYPE model.ffn_hidden_size=F seed=1,2

Every completed run folder below the ROOTs is grouped by attention type and learning rate. For each
group the report gives the final validation loss per seed, its mean and standard deviation, the
parameter count (the model is rebuilt from the run's config) and the KV cache per token per layer at
TP=1 (the formula of tools/kv_cache.py, which its tests check against the real cache tensors). It
prints a markdown table and writes NAME.json and NAME.png (validation loss against KV bytes per token
per layer, bf16) into --out.
"""

from __future__ import annotations

from pretrain import cpu_compat  # noqa: F401  (silences megatron's import warnings)
from pretrain.rundir import pyplot, runs_provenance, write_json
from tools.experiments.common import (Run, by_arm, guarded, load_runs, markdown_table, mean_std, per_seed,
                                      report_parser, summarize)

TYPES = ("mha", "gqa", "mqa", "gta", "gla", "mla")
BF16_BYTES = 2


def arm_of(run: Run) -> tuple[str, float]:
    return run.config["attention"]["type"], run.config["optim"]["lr"]


def max_grad_norm(run: Run) -> float | None:
    return max(run.values("grad_norm"), default=None)


def model_facts(config: dict) -> dict:
    """Parameters and KV-cache elements/bytes per token per layer of a run's model, at TP=1."""
    from models.inference import build_for_decode
    from pretrain.config import config_from_dict
    from tools.kv_cache import formula

    cfg = config_from_dict(config)
    gpt = build_for_decode(cfg.model, cfg.attention, cfg.data.vocab_size, cfg.seed)
    elements = formula(cfg, 1)
    return {"params": sum(p.numel() for p in gpt.parameters()), "ffn": cfg.model.ffn_size,
            "kv_elements": elements, "kv_bytes_bf16": elements * BF16_BYTES}


def summarize_arms(runs: list[Run]) -> list[dict]:
    """One row per (type, lr), in TYPES order: seeds, final losses, mean, std and the model's facts."""
    from pretrain import distributed
    from pretrain.config import ParallelConfig

    arms = by_arm(runs, arm_of)
    distributed.init(ParallelConfig(backend="gloo"))  # the model is rebuilt for its parameter count
    try:
        rows = []
        for (t, lr), by_seed in sorted(arms.items(), key=lambda kv: (TYPES.index(kv[0][0]), kv[0][1])):
            losses = per_seed(by_seed, lambda run: run.last("val_loss"))
            s = summarize(losses.values())
            rows.append({"attention": t, "lr": lr, "seeds": list(losses), "val_loss": s["values"],
                         "mean": s["mean"], "std": s["std"],
                         "max_grad_norm": [max_grad_norm(by_seed[seed]) for seed in losses],
                         **model_facts(next(iter(by_seed.values())).config)})
        return rows
    finally:
        distributed.shutdown()


def table(rows: list[dict]) -> str:
    header = ["attention", "lr", "FFN", "params", "KV elements/token/layer", "KV bytes (bf16)", "val loss per seed",
              "mean ± std"]
    return markdown_table(header, [[r["attention"], f"{r['lr']:g}", r["ffn"], f"{r['params']:,}", r["kv_elements"],
                                    r["kv_bytes_bf16"], ", ".join(f"{v:.4f}" for v in r["val_loss"]),
                                    mean_std(r["mean"], r["std"])] for r in rows], align="llrrrrll")


def plot(rows: list[dict], out, title: str) -> None:
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


def main(argv: list[str] | None = None) -> int:
    args = report_parser(__doc__, name="attention_quality").parse_args(argv)

    def report() -> None:
        runs = load_runs(*args.roots)
        rows = summarize_arms(runs)
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / f"{args.name}.json", {"provenance": runs_provenance([r.info for r in runs]),
                                                    "roots": [str(r) for r in args.roots], "rows": rows})
        plot(rows, args.out / f"{args.name}.png", f"attention quality: {args.name}")
        print(table(rows))

    return guarded(report)


if __name__ == "__main__":
    raise SystemExit(main())
