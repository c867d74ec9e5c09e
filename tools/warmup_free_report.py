"""Summarise warmup-free runs: final validation loss and the stability extremes per method, lr and seed.

    python tools/warmup_free_report.py runs/warmup_free [MORE_ROOTS ...] --out docs/results --name warmup_free

A run's method comes from its config: AdamW, AdamW with warmup, the spectral bound (with its τ) or
QuacK. Per run: status, final validation loss, the largest training loss after step 5, the smallest
attention entropy and the largest σ1(W_qᵀW_k) the monitors saw. Per method and learning rate: the
mean final validation loss and its change against AdamW with warmup at the same rate. Runs that
diverged are listed (their loss is the last one logged); runs without a result.json are still going
and left out. Prints markdown tables and writes NAME.json into --out; the curves come from
tools/plot.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.callbacks import read_metrics, write_json  # noqa: E402

WARMUP = "adamw + warmup"


def method(config: dict) -> str:
    optim = config["optim"]
    if optim.get("quack"):
        return "quack"
    if optim["spectral"]["enabled"]:
        return f"spectral τ={optim['spectral']['tau']:g}"
    return WARMUP if config["lr"]["warmup_steps"] > 0 else "adamw"


def summarize_run(folder: Path) -> dict:
    config = json.loads((folder / "run_info.json").read_text())["config"]
    rows = read_metrics(folder)

    def values(key: str, after: int = 0) -> list[float]:
        return [r[key] for r in rows if isinstance(r.get(key), float) and r["step"] > after]

    val = values("val_loss")
    return {"run": folder.name, "method": method(config), "lr": config["optim"]["lr"], "seed": config["seed"],
            "status": json.loads((folder / "result.json").read_text())["status"],
            "steps": max((r["step"] for r in rows), default=0), "final_val_loss": val[-1] if val else None,
            "max_train_loss_after_step5": max(values("loss", after=5), default=None),
            "min_attention_entropy": min(values("stability/attn_entropy_min"), default=None),
            "max_qk_sigma1": max(values("stability/qk_sigma1_max"), default=None)}


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (lr, method): the seeds' final validation losses, their mean, and the change
    against AdamW with warmup at the same lr."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["final_val_loss"] is not None:
            groups.setdefault((r["lr"], r["method"]), []).append(r)
    rows = []
    for (lr, name), members in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        losses = [r["final_val_loss"] for r in sorted(members, key=lambda r: r["seed"])]
        rows.append({"lr": lr, "method": name, "val_loss": losses, "mean": statistics.mean(losses)})
    base = {r["lr"]: r["mean"] for r in rows if r["method"] == WARMUP}
    for r in rows:
        r["vs_warmup"] = r["mean"] / base[r["lr"]] - 1 if r["lr"] in base else None
    return rows


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(runs: list[dict], rows: list[dict]) -> str:
    lines = ["| lr | method | final val loss per seed | mean | vs warmup |", "|---|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['lr']:g} | {r['method']} | {', '.join(f'{v:.3f}' for v in r['val_loss'])} | "
                     f"{r['mean']:.3f} | {_fmt(r['vs_warmup'], '+.1%')} |")
    lines += ["", "| run | status | final val | max train loss after step 5 | min attention entropy | max σ1(W_qᵀW_k) |",
              "|---|---|---:|---:|---:|---:|"]
    for r in sorted(runs, key=lambda r: (-r["lr"], r["method"], r["seed"])):
        lines.append(f"| {r['run']} | {r['status']} | {_fmt(r['final_val_loss'])} | {_fmt(r['max_train_loss_after_step5'], '.2f')}"
                     f" | {_fmt(r['min_attention_entropy'], '.2f')} | {_fmt(r['max_qk_sigma1'], '.2f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", type=Path, nargs="+", help="folders holding the run folders (any depth)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default="warmup_free", help="stem of the JSON written into --out")
    args = p.parse_args(argv)
    folders = sorted(i.parent for root in args.roots for i in root.rglob("run_info.json") if (i.parent / "result.json").exists())
    if not folders:
        raise SystemExit(f"no finished runs (run_info.json and result.json) below {', '.join(map(str, args.roots))}; "
                         "run tools/warmup_free_experiment.sh first")
    runs = [summarize_run(f) for f in folders]
    rows = summarize(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", {"roots": [str(r) for r in args.roots], "summary": rows, "runs": runs})
    print(markdown(runs, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
