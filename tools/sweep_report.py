"""Aggregate an LR x width sweep: optimal LR per width, its width exponent with a bootstrap CI, the
maximal stable LR per width, plots, and a JSON summary (docs/sweeps.md).

    python tools/sweep_report.py runs/width_sweep [--out DIR] [--bootstrap 2000]

Method after Haas et al. 2025 (arXiv 2505.22491): the optimal LR at width n scales as n^exponent;
the paper measures -0.42 for Adam with trainable LayerNorm on GPT. Each run folder (any depth below
SWEEP_DIR) holds result.json and metrics.jsonl as written by pretrain/run.py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.rundir import pyplot, read_metrics, read_run_info, runs_provenance, write_json

PAPER = {"adam_optimal": -0.42, "adam_max_stable": -0.60, "sgd_clipped_optimal": -0.38}
LOGIT_KEYS = ("stability/logit_norm", "stability/logit_max")  # logged by the stability monitors


@dataclass
class Run:
    width: int
    lr: float
    seed: int
    status: str
    val_loss: float | None
    first_loss: float | None = None  # the step-1 training loss: a stable run ends below it
    logits: dict | None = None  # last logged LOGIT_KEYS, when the monitors ran
    path: str = ""
    optimizer: str = "adamw"
    lr_rule: str = "global"  # optim.lr_rule: a transfer run under sp_width is told apart from a searched one
    width_exponent: float | None = None  # optim.width_exponent (None: the rule's default)

    @property
    def stable(self) -> bool:
        """Completed with a finite validation loss below the loss it started from.

        A run that finishes with finite but worse-than-initial loss has diverged in all but name.
        """
        if self.status != "completed" or self.val_loss is None or not math.isfinite(self.val_loss):
            return False
        return self.first_loss is None or self.val_loss < self.first_loss


# ---- reading ------------------------------------------------------------------------------------
def peak_lr(config: dict, result: dict) -> float:
    """The run's peak LR: `optim.lr`, or under a width rule the hidden group's peak (from the run's
    saved config), so that runs with and without a rule sit on one LR axis."""
    optim = config.get("optim", {})
    if optim.get("lr_rule", "global") == "global":
        return float(result["lr"])
    from pretrain import cpu_compat  # noqa: F401  (silences megatron's import-time warnings)
    from optim.lr_rules import peak_lrs  # imports megatron: only for runs under a width rule
    from optim.config import LayerwiseConfig, OptimConfig, SpectralConfig
    from models.config import ModelConfig

    model = config["model"]
    cfg = _make(OptimConfig, {**optim, "layerwise": _make(LayerwiseConfig, optim.get("layerwise", {})),
                              "spectral": _make(SpectralConfig, optim.get("spectral", {}))})
    return peak_lrs(cfg, _make(ModelConfig, {k: v for k, v in model.items() if k != "moe"}))["hidden"]


def _make(cls, values: dict):
    """A config dataclass from a saved dict, ignoring fields this version does not know."""
    from dataclasses import fields

    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def load_run(result_path: Path) -> Run:
    r = json.loads(result_path.read_text())
    rows = read_metrics(result_path.parent)
    losses = [m["loss"] for m in rows if isinstance(m.get("loss"), float)]
    logits = {k: [m[k] for m in rows if isinstance(m.get(k), float)] for k in LOGIT_KEYS}
    val = r.get("final_val_loss")
    info = result_path.parent / "run_info.json"
    config = json.loads(info.read_text())["config"] if info.exists() else {}
    optim = config.get("optim", {})
    return Run(width=int(r["hidden_size"]), lr=peak_lr(config, r), seed=int(r.get("seed", 0)), status=r["status"],
               val_loss=float(val) if isinstance(val, (int, float)) else None,
               first_loss=losses[0] if losses else None,
               logits={k: v[-1] for k, v in logits.items() if v} or None, path=str(result_path.parent),
               optimizer=optim.get("name", "adamw"), lr_rule=optim.get("lr_rule", "global"),
               width_exponent=optim.get("width_exponent"))


def load_runs(sweep_dir: Path) -> list[Run]:
    return [load_run(p) for p in sorted(Path(sweep_dir).rglob("result.json"))]


# ---- fitting ------------------------------------------------------------------------------------
def cell_losses(runs: list[Run]) -> dict[int, dict[float, list[float]]]:
    """width -> lr -> validation losses of its stable runs (one per seed); unstable cells are empty."""
    cells: dict[int, dict[float, list[float]]] = {}
    for r in runs:
        cell = cells.setdefault(r.width, {}).setdefault(r.lr, [])
        if r.stable:
            cell.append(r.val_loss)
    return cells


def optimal_lr(curve: dict[float, float]) -> tuple[float, bool]:
    """Best LR of one width's loss-vs-LR curve, refined by a parabola in log-LR.

    1. take the grid minimum; 2. fit a parabola through it and its two neighbours in log(lr); only the
    nearest points, since loss-vs-LR curves rise far more steeply above the optimum than below and a
    wider least-squares window drags the vertex to lower LRs; 3. use the vertex if the parabola opens
    upward, clamped to the window.
    Returns (lr, at_edge): at_edge means the minimum sits at the end of the stable grid, so the true
    optimum may lie outside it.
    """
    lrs = sorted(curve)
    i = int(np.argmin([curve[x] for x in lrs]))
    at_edge = i in (0, len(lrs) - 1)
    window = lrs[max(0, i - 1): i + 2]
    if len(window) < 3:
        return lrs[i], at_edge
    x, y = np.log(window), np.array([curve[w] for w in window])
    a, b, _ = np.polyfit(x, y, 2)
    if a <= 0:
        return lrs[i], at_edge
    return float(np.exp(np.clip(-b / (2 * a), x[0], x[-1]))), at_edge


def fit_exponent(widths, lrs) -> float:
    """Slope of log(lr) against log(width): the exponent in lr ~ width^slope."""
    return float(np.polyfit(np.log(widths), np.log(lrs), 1)[0])


def fitted_lr(summary: dict, width, exponent: float | None = None):
    """The fitted line's LR at `width` (a number or an array). A least-squares line in log-log passes
    through the geometric means of the widths and their optima, so those and the slope fix it; another
    `exponent` draws a reference line through the same point."""
    optima = [(int(w), e["opt_lr"]) for w, e in summary["widths"].items() if "opt_lr" in e]
    anchor_n = np.exp(np.mean(np.log([w for w, _ in optima])))
    anchor_lr = np.exp(np.mean(np.log([lr for _, lr in optima])))
    slope = summary["exponent"] if exponent is None else exponent
    return anchor_lr * (np.asarray(width, dtype=float) / anchor_n) ** slope


def seed_curves(runs: list[Run]) -> dict[int, dict[int, dict[float, float]]]:
    """width -> seed -> lr -> validation loss of its stable runs."""
    curves: dict[int, dict[int, dict[float, float]]] = {}
    for r in runs:
        if r.stable:
            curves.setdefault(r.width, {}).setdefault(r.seed, {})[r.lr] = r.val_loss
    return curves


def width_optimum(by_seed: dict[int, dict[float, float]], seeds=None) -> tuple[float, bool]:
    """Geometric mean over seeds of each seed's own refined optimum, and whether any sat at an edge.

    Each seed's curve is fitted on its own: seed-to-seed offsets in loss (data order) are as large as
    the differences between neighbouring LRs, so averaging losses over seeds that were run at
    different LRs (extra seeds only near the optimum) would bend the curve.
    """
    fits = [optimal_lr(by_seed[s]) for s in (by_seed if seeds is None else seeds)]
    return float(np.exp(np.mean(np.log([lr for lr, _ in fits])))), any(edge for _, edge in fits)


def bootstrap_ci(curves: dict, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[list[float], str]:
    """Percentile CI of the exponent: seeds resampled within each width, then widths resampled with
    replacement (pairs bootstrap of the log-log regression)."""
    rng = np.random.default_rng(seed)
    slopes = []
    for _ in range(n):
        opt = {w: width_optimum(by_seed, rng.choice(list(by_seed), size=len(by_seed)))[0]
               for w, by_seed in curves.items()}
        widths = rng.choice(sorted(opt), size=len(opt))
        if len(set(widths)) < 2:
            continue  # one distinct width has no slope
        slopes.append(fit_exponent(widths, [opt[w] for w in widths]))
    multi_seed = any(len(by_seed) > 1 for by_seed in curves.values())
    method = "seeds within widths + widths" if multi_seed else "widths (one seed per width)"
    if not slopes:
        return [float("nan"), float("nan")], method
    lo, hi = np.percentile(slopes, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)], method


def max_stable_lrs(runs: list[Run]) -> dict[int, tuple[float, bool]]:
    """Largest LR per width at which every run was stable; True if it is the top of the grid
    (the true maximum is then only bounded from below)."""
    out = {}
    for width in sorted({r.width for r in runs}):
        mine = [r for r in runs if r.width == width]
        ok = [lr for lr in {r.lr for r in mine} if all(r.stable for r in mine if r.lr == lr)]
        if ok:
            out[width] = (max(ok), max(ok) == max(r.lr for r in mine))
    return out


def analyze(runs: list[Run], n_boot: int = 2000) -> dict:
    """Everything the report shows, as plain data (what the JSON holds)."""
    cells, curves = cell_losses(runs), seed_curves(runs)
    per_width = {}
    for width, by_lr in sorted(cells.items()):
        curve = {lr: float(np.mean(v)) for lr, v in by_lr.items() if v}  # the table and plot: seed means
        entry = {"losses": {repr(lr): curve.get(lr) for lr in sorted(by_lr)},
                 "seeds": {repr(lr): len(v) for lr, v in sorted(by_lr.items())}}
        if width in curves:
            opt, at_edge = width_optimum(curves[width])
            grid_best = min(curve, key=curve.get)
            seed_fits = {s: optimal_lr(c) for s, c in curves[width].items()}
            entry.update(opt_lr=opt, grid_opt_lr=grid_best, best_val_loss=curve[grid_best], at_edge=at_edge,
                         seed_opt_lrs={s: lr for s, (lr, _) in seed_fits.items()},
                         seed_at_edge={s: edge for s, (_, edge) in seed_fits.items()},
                         logits=_logits_at(runs, width, grid_best))
        per_width[str(width)] = entry
    optima = {int(w): e["opt_lr"] for w, e in per_width.items() if "opt_lr" in e}
    exponent = fit_exponent(list(optima), list(optima.values())) if len(optima) >= 2 else float("nan")
    ci, method = bootstrap_ci(curves, n_boot) if len(optima) >= 2 else ([float("nan")] * 2, "none")
    stable = max_stable_lrs(runs)
    for w, (lr, censored) in stable.items():
        per_width.setdefault(str(w), {}).update(max_stable_lr=lr, max_stable_censored=censored)
    ms = fit_exponent(list(stable), [v[0] for v in stable.values()]) if len(stable) >= 2 else float("nan")
    optimizers = sorted({r.optimizer for r in runs})
    paper_key = "sgd_clipped_optimal" if optimizers == ["sgd"] else "adam_optimal"
    return {"exponent": exponent, "exponent_ci": ci, "ci_method": method, "alpha": -exponent,
            "optimizer": ",".join(optimizers), "paper_reference": paper_key,
            "max_stable_exponent": ms, "max_stable_censored": any(c for _, c in stable.values()),
            "n_runs": len(runs), "n_unstable": sum(not r.stable for r in runs), "paper": PAPER,
            "widths": per_width}


def _logits_at(runs: list[Run], width: int, lr: float) -> dict | None:
    """Mean of the last logged logit statistics over the seeds at (width, lr); None if not logged."""
    vals = [r.logits for r in runs if r.width == width and r.lr == lr and r.stable and r.logits]
    if not vals:
        return None
    return {k: float(np.mean([v[k] for v in vals if k in v])) for k in LOGIT_KEYS if any(k in v for v in vals)}


# ---- plots and output ---------------------------------------------------------------------------
def _save(fig, ax, out: Path) -> None:
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    pyplot().close(fig)


def plot_loss_vs_lr(runs: list[Run], summary: dict, out: Path) -> None:
    """Validation loss against LR, one line per width (the seed mean, shaded from the lowest to the highest
    seed where more than one ran); unstable runs as crosses on the top edge."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    finite = [r.val_loss for r in runs if r.stable]
    top = max(finite) if finite else 1.0
    cells = cell_losses(runs)
    for width, entry in sorted(summary["widths"].items(), key=lambda kv: int(kv[0])):
        pts = sorted((float(lr), v) for lr, v in entry["losses"].items() if v is not None)
        if pts:
            line, = ax.plot(*zip(*pts), "o-", label=f"n={width}")
            band = sorted((lr, min(v), max(v)) for lr, v in cells[int(width)].items() if len(v) > 1)
            if band:
                ax.fill_between(*zip(*band), color=line.get_color(), alpha=0.2, lw=0)
            if "opt_lr" in entry:
                ax.axvline(entry["opt_lr"], color=line.get_color(), ls=":", lw=1)
            bad = [r.lr for r in runs if r.width == int(width) and not r.stable]
            ax.plot(bad, [top] * len(bad), "x", color=line.get_color(), ms=8)
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss",
           title="loss vs LR per width (x: unstable; dotted: fitted optimum)")
    _save(fig, ax, out)


def plot_optimal_lr(summary: dict, out: Path) -> None:
    """Optimal (and maximal stable) LR against width on log-log axes, with the fit and references."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    ws = sorted((int(w), e) for w, e in summary["widths"].items() if "opt_lr" in e)
    n = np.array([w for w, _ in ws], dtype=float)
    opt = np.array([e["opt_lr"] for _, e in ws])
    ax.plot(n, opt, "o", color="C0", label="optimal LR (parabola in log-LR)")
    seeds = [(w, lr) for w, e in ws for lr in e.get("seed_opt_lrs", {}).values()]
    if len(seeds) > len(ws):  # more than one seed somewhere: each seed's own optimum, the spread behind the mean
        ax.plot(*zip(*seeds), ".", color="C0", alpha=0.4, label="one seed's optimum")
    grid = np.geomspace(n.min(), n.max(), 50)
    lo, hi = summary["exponent_ci"]
    ax.plot(grid, fitted_lr(summary, grid), "-", color="C0",
            label=f"fit: n^{summary['exponent']:.2f} (95% CI {lo:.2f}..{hi:.2f})")
    for slope, style in ((-1.0, "--"), (-0.5, "-.")):
        ax.plot(grid, fitted_lr(summary, grid, slope), style, color="gray", label=f"reference n^{slope:g}")
    stable = sorted((int(w), e["max_stable_lr"]) for w, e in summary["widths"].items() if "max_stable_lr" in e)
    if stable:
        ax.plot(*zip(*stable), "^", color="C3", label="max stable LR on the grid")
    ax.set(xscale="log", yscale="log", xlabel="width n (hidden size)", ylabel="learning rate",
           title="optimal LR vs width")
    _save(fig, ax, out)


def plot_logits(summary: dict, out: Path) -> bool:
    """Output-logit norm at the optimal LR against width; False (no file) if nothing was logged."""
    pts = sorted((int(w), e["logits"]) for w, e in summary["widths"].items() if e.get("logits"))
    if not pts:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for key, marker in zip(LOGIT_KEYS, "os"):
        xy = [(w, v[key]) for w, v in pts if key in v]
        if xy:
            ax.plot(*zip(*xy), marker + "-", label=key)
    # the paper's regime: logits grow as n^(1-alpha) at LR ~ n^-alpha; drawn from the first norm
    first = [(w, v[LOGIT_KEYS[0]]) for w, v in pts if LOGIT_KEYS[0] in v]
    if first and summary.get("alpha") is not None:
        (w0, v0), ws = first[0], [w for w, _ in first]
        for alpha, style in ((summary["alpha"], "k--"), (-PAPER[summary.get("paper_reference", "adam_optimal")], "k:")):
            ax.plot(ws, [v0 * (w / w0) ** (1 - alpha) for w in ws], style, lw=1,
                    label=f"n^(1-{alpha:.2f}){' (paper)' if style == 'k:' else ' (fitted alpha)'}")
    ax.set(xscale="log", yscale="log", xlabel="width n", ylabel="value at the end of training",
           title="output logits at the grid-best LR")
    _save(fig, ax, out)
    return True


def markdown_table(summary: dict) -> str:
    lines = ["| width | optimal LR (fit) | grid best LR | best val loss | max stable LR | logit norm |",
             "|---|---|---|---|---|---|"]
    for w, e in sorted(summary["widths"].items(), key=lambda kv: int(kv[0])):
        logit = (e.get("logits") or {}).get(LOGIT_KEYS[0])
        ms = e.get("max_stable_lr")
        lines.append(f"| {w} | {_fmt(e.get('opt_lr'))}{' (edge)' if e.get('at_edge') else ''} | "
                     f"{_fmt(e.get('grid_opt_lr'))} | {_fmt(e.get('best_val_loss'), '.4f')} | "
                     f"{_fmt(ms)}{' (top of grid)' if e.get('max_stable_censored') else ''} | {_fmt(logit, '.3g')} |")
    lo, hi = summary["exponent_ci"]
    lines.append(f"\nfitted exponent {summary['exponent']:.3f} (95% bootstrap CI {lo:.3f}..{hi:.3f}, "
                 f"{summary['ci_method']}); paper ({summary['paper_reference']}): {PAPER[summary['paper_reference']]}. "
                 f"max-stable exponent {summary['max_stable_exponent']:.3f}"
                 f"{' (a bound: some widths stable at the top of the grid)' if summary['max_stable_censored'] else ''}"
                 ".")
    return "\n".join(lines)


def _fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def report(sweep_dir: Path, out: Path | None = None, n_boot: int = 2000) -> dict:
    """Read the sweep, write sweep_report.json and the PNGs into `out`; return the summary."""
    out = Path(out or Path(sweep_dir) / "report")
    runs = load_runs(Path(sweep_dir))
    if not runs:
        raise FileNotFoundError(f"no result.json below {sweep_dir}")
    summary = analyze(runs, n_boot)
    out.mkdir(parents=True, exist_ok=True)
    plot_loss_vs_lr(runs, summary, out / "loss_vs_lr.png")
    if sum("opt_lr" in e for e in summary["widths"].values()) >= 2:
        plot_optimal_lr(summary, out / "optimal_lr_vs_width.png")
    summary["logit_plot"] = plot_logits(summary, out / "logit_norm_vs_width.png")
    summary["provenance"] = runs_provenance([read_run_info(r.path) for r in runs if (Path(r.path) / "run_info.json").exists()])
    write_json(out / "sweep_report.json", summary, default=_json_default)
    return summary


def _json_default(x):
    return float(x) if isinstance(x, np.floating) else str(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default SWEEP_DIR/report)")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates for the CI")
    args = ap.parse_args(argv)
    try:
        summary = report(args.sweep_dir, args.out, args.bootstrap)
    except FileNotFoundError as e:
        print(f"sweep_report: error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(summary))
    if not summary["logit_plot"]:
        print("(no stability/logit_norm in metrics.jsonl: enable logging.monitors.interval for the logit plot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
