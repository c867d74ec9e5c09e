"""Summarise warmup-free runs: final validation loss and the stability extremes per method, lr and seed.

    python tools/experiments/warmup_free_report.py runs/warmup_free [MORE_ROOTS ...] --out docs/results \
        --name warmup_free

The runs (docs/results/warmup_free.md): three Hydra multiruns into runs/warmup_free (the presets set
hydra.sweep.dir and name each folder by preset and overrides; the first names the folder too, since it
sweeps the preset itself). hydra/launcher=local runs hydra.launcher.n_jobs points at once:

    python pretrain/main.py -m hydra/launcher=local hydra.launcher.n_jobs=4 hydra.sweep.dir=runs/warmup_free \
        +experiment=warmup_free_adamw,warmup_free_adamw_warmup,warmup_free_spectral,warmup_free_quack \
        optim.lr=3e-3,1e-2 seed=1,2 trainer.progress=false logging.tensorboard=false
    python pretrain/main.py -m +experiment=warmup_free_adamw optim.lr=3e-2 seed=1 \
        trainer.progress=false logging.tensorboard=false                        # where AdamW breaks
    python pretrain/main.py -m hydra/launcher=local hydra.launcher.n_jobs=4 +experiment=warmup_free_spectral \
        optim.lr=1e-2 optim.spectral.tau=0.01,0.02,0.1,0.2 seed=1 \
        trainer.progress=false logging.tensorboard=false                        # the tau ablation

A run's method comes from its config: AdamW, AdamW with warmup, the spectral bound (with its τ) or
QuacK. Per run: status, final validation loss, the largest training loss after step 5, the smallest
attention entropy and the largest σ1(W_qᵀW_k) the monitors saw. Per method and learning rate: the
mean final validation loss and its change against AdamW with warmup at the same rate. Runs that
diverged are listed (their loss is the last one logged); runs without a result.json are still going
and left out. Prints markdown tables and writes NAME.json into --out; the curves come from
tools/plot.py.
"""

from __future__ import annotations

from pretrain.rundir import runs_provenance, write_json
from tools.experiments.common import (Run, by_arm, fmt, guarded, load_runs, markdown_table, per_seed, report_parser,
                                      summarize)

WARMUP = "adamw + warmup"
FINISHED = ("completed", "diverged")


def method(config: dict) -> str:
    optim = config["optim"]
    if optim.get("quack"):
        return "quack"
    if optim["spectral"]["enabled"]:
        return f"spectral τ={optim['spectral']['tau']:g}"
    return WARMUP if config["lr"]["warmup_steps"] > 0 else "adamw"


def arm_of(run: Run) -> tuple[float, str]:
    return run.config["optim"]["lr"], method(run.config)


def summarize_run(run: Run) -> dict:
    return {"run": run.name, "method": method(run.config), "lr": run.config["optim"]["lr"], "seed": run.seed,
            "status": run.status, "steps": max((r["step"] for r in run.rows), default=0),
            "final_val_loss": run.last("val_loss"),
            "max_train_loss_after_step5": max(run.values("loss", after=5), default=None),
            "min_attention_entropy": min(run.values("stability/attn_entropy_min"), default=None),
            "max_qk_sigma1": max(run.values("stability/qk_sigma1_max"), default=None)}


def summarize_arms(runs: list[Run]) -> list[dict]:
    """One row per (lr, method), highest lr first: the seeds' final validation losses, their mean,
    and the relative change against AdamW with warmup at the same lr."""
    rows = []
    for (lr, name), by_seed in sorted(by_arm(runs, arm_of).items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        if losses := per_seed(by_seed, lambda run: run.last("val_loss")):
            rows.append({"lr": lr, "method": name, "val_loss": list(losses.values()),
                         "mean": summarize(losses.values())["mean"]})
    base = {r["lr"]: r["mean"] for r in rows if r["method"] == WARMUP}
    for r in rows:
        r["vs_warmup"] = r["mean"] / base[r["lr"]] - 1 if r["lr"] in base else None
    return rows


def tables(runs: list[dict], rows: list[dict]) -> str:
    summary = markdown_table(["lr", "method", "final val loss per seed", "mean", "vs warmup"],
                             [[f"{r['lr']:g}", r["method"], ", ".join(f"{v:.3f}" for v in r["val_loss"]),
                               f"{r['mean']:.3f}", fmt(r["vs_warmup"], "+.1%")] for r in rows], align="lllrr")
    per_run = markdown_table(
        ["run", "status", "final val", "max train loss after step 5", "min attention entropy", "max σ1(W_qᵀW_k)"],
        [[r["run"], r["status"], fmt(r["final_val_loss"]), fmt(r["max_train_loss_after_step5"], ".2f"),
          fmt(r["min_attention_entropy"], ".2f"), fmt(r["max_qk_sigma1"], ".2f")]
         for r in sorted(runs, key=lambda r: (-r["lr"], r["method"], r["seed"]))], align="llrrrr")
    return f"{summary}\n\n{per_run}"


def main(argv: list[str] | None = None) -> int:
    args = report_parser(__doc__, name="warmup_free").parse_args(argv)

    def report() -> None:
        runs = load_runs(*args.roots, statuses=FINISHED)
        per_run = [summarize_run(run) for run in runs]
        rows = summarize_arms(runs)
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / f"{args.name}.json", {"provenance": runs_provenance([r.info for r in runs]),
                                                    "roots": [str(r) for r in args.roots], "summary": rows,
                                                    "runs": per_run})
        print(tables(per_run, rows))

    return guarded(report)


if __name__ == "__main__":
    raise SystemExit(main())
