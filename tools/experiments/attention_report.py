"""Aggregate attention-quality runs: validation loss against KV-cache bytes per token, per type.

    python tools/experiments/attention_report.py runs/attention_d128 [MORE_ROOTS ...] --out docs/results \
        --name attention_d128

The runs (docs/results/attention.md): tools/experiments/attention_experiment.py's multiruns of
conf/experiment/attention_d128.yaml (head dimension 128: three learning rates per type on a tuning seed,
then each type at its chosen rate on seeds 1, 2, 3), or the earlier one multirun per type of
conf/experiment/attention_quality.yaml. Every type has the same parameter count (its FFN is widened).

An arm is a type, marked "+qk-norm" when it ran with attention.qk_norm. Seeds split the work
(tools/experiments/seeds.py and stats.py): on TUNING_SEEDS each arm's learning rate is chosen (`choose_lrs`:
seeds.select, the lowest final validation loss; a diverged run never wins) and flagged when it sits
on the edge of the grid; on REPORTED_SEEDS every (arm, rate) gets its final validation loss per seed,
mean and standard deviation, largest gradient norm per seed, the parameter count (the model is rebuilt
from the run's config) and the KV cache per token per layer at TP=1 (the type's `cache_elements`,
which its tests check against the real cache tensors). Each arm at its chosen rate (its only rate
when nothing was tuned) is then paired seed by seed with GQA, MLA without QK-norm with MLA with it, and GLA
with the better MLA (the paper's two claims: GTA matches GQA with less cache, GLA matches MLA): per-seed
differences, their mean and 95% interval; for runs of a design registered with a margin
(tools/experiments/preregistration.py: conf/experiment/attention_d128_long.yaml), the two claims also get
TOST at that margin, and the verdict says "equivalent within ±margin" only when TOST shows it.
Writes NAME.json (with the runs' provenance) and NAME.png (tuning curves; per-seed losses with 95%
intervals against KV bytes; paired differences) into --out and prints markdown tables.
"""

from __future__ import annotations

import math
import statistics

from pretrain import cpu_compat  # noqa: F401  (silences megatron's import warnings)
from models.attention import attention_names
from pretrain.rundir import pyplot, write_json
from tools.experiments import ExperimentError
from tools.experiments.cli import guarded, report_parser
from tools.experiments.preregistration import ATTENTION_LONG, at_edge
from tools.experiments.provenance import results_provenance
from tools.experiments.runs import FINISHED, Run, by_arm, load_runs, per_seed
from tools.experiments.seeds import reported_runs, select, tuning_runs
from tools.experiments.stats import paired, summarize, t_quantile
from tools.experiments.tables import MISSING, fmt, markdown_table, mean_std

BF16_BYTES = 2
QK_NORM = "+qk-norm"
BASELINE = "gqa"  # every arm is paired with GQA; GLA also with MLA
PAIRS_BESIDE_BASELINE = (("mla", "gla"),)  # (a, b): b - a, a and b the types, whatever their qk-norm
EQUIVALENCE_CLAIMS = {("gqa", "gta"), ("mla", "gla")}  # the paper's "matches" claims, TOST'd at a registered margin
REGISTERED = {ATTENTION_LONG.preset: ATTENTION_LONG}  # preset -> the design registered before its runs


def attention_arm(config: dict) -> str:
    """The type, marked when it ran with QK-norm (runs from before the option have no qk_norm key)."""
    attention = config["attention"]
    return attention["type"] + (QK_NORM if attention.get("qk_norm") else "")


def arm_type(arm: str) -> str:
    return arm.removesuffix(QK_NORM)


def arm_of(run: Run) -> tuple[str, float]:
    return attention_arm(run.config), run.config["optim"]["lr"]


def final_val(run: Run) -> float | None:
    """The last evaluation's validation loss; none for a diverged run."""
    return run.last("val_loss") if run.status == "completed" else None


def max_grad_norm(run: Run) -> float | None:
    return max(run.values("grad_norm"), default=None)


def model_facts(config: dict) -> dict:
    """Parameters and KV-cache elements/bytes per token per layer of a run's model, at TP=1."""
    from models.inference import build_for_decode
    from pretrain.config import config_from_dict
    cfg = config_from_dict(config)
    gpt = build_for_decode(cfg.model, cfg.attention, cfg.data.vocab_size, cfg.seed)
    elements = cfg.attention.cache_elements(cfg.model)
    return {"params": sum(p.numel() for p in gpt.parameters()), "ffn": cfg.model.ffn_size,
            "kv_elements": elements, "kv_bytes_bf16": elements * BF16_BYTES}


def _arm_order(arm: str) -> tuple[int, str]:
    return attention_names().index(arm_type(arm)), arm


# 1. Tuning seeds: each arm's learning rate
def choose_lrs(runs: list[Run]) -> dict[str, dict]:
    """arm -> the rate with the lowest mean final validation loss on tuning seeds (seeds.select), the grid
    (rate -> seed -> final loss, None when diverged), each run's largest gradient norm, and whether the
    choice is the grid's lowest or highest rate (then a wider grid could do better)."""
    tuned = tuning_runs(runs)
    out = {}
    for arm in sorted({attention_arm(r.config) for r in tuned}, key=_arm_order):
        candidates = by_arm((r for r in tuned if attention_arm(r.config) == arm), lambda r: r.config["optim"]["lr"])
        grid = sorted(candidates)
        chosen = select(candidates, final_val) if any(per_seed(c, final_val) for c in candidates.values()) else None
        out[arm] = {"chosen_lr": chosen, "lrs": grid, "seeds": sorted({s for c in candidates.values() for s in c}),
                    "val_loss": {lr: {s: final_val(r) for s, r in candidates[lr].items()} for lr in grid},
                    "max_grad_norm": {lr: {s: max_grad_norm(r) for s, r in candidates[lr].items()} for lr in grid},
                    "at_edge": at_edge(grid, chosen)}
    return out


# 2. Reported seeds: every (arm, rate); the comparison at each arm's chosen rate
def summarize_arms(runs: list[Run]) -> list[dict]:
    """One row per (arm, lr) of the completed runs on reported seeds, in the registry's order: seeds, final losses,
    mean, std, largest gradient norm per seed and the model's facts."""
    from pretrain.distributed import tool_world

    arms = by_arm((r for r in reported_runs(runs) if r.status == "completed"), arm_of)
    with tool_world():  # the model is rebuilt for its parameter count
        rows, facts = [], {}
        for (arm, lr), by_seed in sorted(arms.items(), key=lambda kv: (_arm_order(kv[0][0]), kv[0][1])):
            losses = per_seed(by_seed, final_val)
            if not losses:
                continue
            if arm not in facts:  # every rate of an arm has the same model
                facts[arm] = model_facts(next(iter(by_seed.values())).config)
            s = summarize(losses.values())
            rows.append({"arm": arm, "attention": arm_type(arm), "qk_norm": arm.endswith(QK_NORM), "lr": lr,
                         "seeds": list(losses), "val_loss": s["values"], "mean": s["mean"], "std": s["std"],
                         "interval95": interval95(s["values"]),
                         "max_grad_norm": [max_grad_norm(by_seed[seed]) for seed in losses], **facts[arm]})
        return rows


def interval95(values: list[float]) -> list[float] | None:
    """The 95% Student-t interval of the mean of `values`; None from one value."""
    if len(values) < 2:
        return None
    mean, half = statistics.fmean(values), t_quantile(0.95, len(values) - 1) * statistics.stdev(values)
    return [mean - half / math.sqrt(len(values)), mean + half / math.sqrt(len(values))]


def compared(rows: list[dict], chosen: dict[str, dict]) -> dict[str, dict]:
    """arm -> its row at the chosen rate, or at its only rate when it was not tuned."""
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = {r["lr"]: r for r in rows if r["arm"] == arm}
        lr = (chosen.get(arm) or {}).get("chosen_lr")
        if lr is None and len(mine) == 1:
            lr = next(iter(mine))
        if lr in mine:
            out[arm] = mine[lr]
    return out


def better_mla(arms: dict[str, dict], chosen: dict[str, dict]) -> str | None:
    """Of the MLA arms compared (with and without QK-norm), the one GLA is paired with: the only one, else the
    one with the lower mean tuning loss at its chosen rate (decided on tuning seeds, never on the reported
    ones), else, untuned, the one with QK-norm (the issue 16 setting)."""
    mlas = [arm for arm in arms if arm_type(arm) == "mla"]
    if len(mlas) < 2:
        return next(iter(mlas), None)

    def tuned(arm: str) -> float:
        c = chosen.get(arm) or {}
        losses = [v for v in (c.get("val_loss") or {}).get(c.get("chosen_lr"), {}).values() if v is not None]
        return statistics.fmean(losses) if losses else math.inf

    best = min(mlas, key=tuned)
    return best if tuned(best) < math.inf else next(a for a in mlas if a.endswith(QK_NORM))


def comparisons(arms: dict[str, dict], chosen: dict[str, dict] | None = None,
                margin: float | None = None) -> list[dict]:
    """Every arm minus GQA, MLA without QK-norm minus MLA with it, and GLA minus the better MLA, seed by seed:
    (b - a) per seed, mean, 95% interval, verdict; with a registered `margin`, GTA - GQA and GLA - MLA (the
    paper's "matches" claims) also get TOST at ±margin ("equivalence")."""
    by_type = {}
    for arm in arms:  # a type's arm: its only one, else the one with QK-norm
        if arm_type(arm) not in by_type or arm.endswith(QK_NORM):
            by_type[arm_type(arm)] = arm
    if mla := better_mla(arms, chosen or {}):
        by_type["mla"] = mla
    pairs = [(by_type[BASELINE], b) for b in arms if BASELINE in by_type and b != by_type[BASELINE]]
    if "mla" + QK_NORM in arms and "mla" in arms:
        pairs.append(("mla" + QK_NORM, "mla"))
    pairs += [(by_type[a], by_type[b]) for a, b in PAIRS_BESIDE_BASELINE if a in by_type and b in by_type]
    out = []
    for a, b in pairs:
        losses = [dict(zip(arms[x]["seeds"], arms[x]["val_loss"])) for x in (a, b)]
        if not losses[0].keys() & losses[1].keys():
            continue
        judged = margin if (arm_type(a), arm_type(b)) in EQUIVALENCE_CLAIMS else None
        p = paired(*losses)
        out.append({"a": a, "b": b, "lr_a": arms[a]["lr"], "lr_b": arms[b]["lr"], **p.as_dict(judged)})
    return out


def registered_margin(runs: list[Run]) -> float | None:
    """The equivalence margin registered for the runs' design (preregistration: a design per preset), None
    for runs of a design without one; runs of several designs are one report's error."""
    presets = {r.config["name"] for r in runs}
    designs = {p: REGISTERED.get(p) for p in presets}
    if len(presets) > 1 and any(designs.values()):
        raise ExperimentError(f"the runs belong to several designs ({', '.join(sorted(presets))}); report each "
                              "design's runs from its own roots")
    design = next(iter(designs.values()), None)
    return design.margin if design else None


def edges(chosen: dict[str, dict]) -> list[str]:
    """The arms whose chosen rate is the lowest or highest of their grid (extensions included)."""
    return [arm for arm, c in chosen.items() if c["at_edge"]]


# 3. Tables and the plot
def table(rows: list[dict]) -> str:
    header = ["attention", "lr", "FFN", "params", "KV elements/token/layer", "KV bytes (bf16)", "val loss per seed",
              "mean ± std", "max grad norm per seed"]
    return markdown_table(header, [[r["arm"], f"{r['lr']:g}", r["ffn"], f"{r['params']:,}", r["kv_elements"],
                                    r["kv_bytes_bf16"], ", ".join(f"{v:.4f}" for v in r["val_loss"]),
                                    mean_std(r["mean"], r["std"]), ", ".join(fmt(g, ".1f") for g in r["max_grad_norm"])]
                                   for r in rows], align="llrrrrlll")


def tuning_table(chosen: dict[str, dict]) -> str:
    lrs = sorted({lr for c in chosen.values() for lr in c["lrs"]})

    def cell(c: dict, lr: float) -> str:
        if lr not in c["val_loss"]:
            return MISSING
        losses = [fmt(v, ".4f") if v is not None else "diverged" for v in c["val_loss"][lr].values()]
        grads = [fmt(g, ".1f") for g in c["max_grad_norm"][lr].values()]
        mark = " **chosen**" if lr == c["chosen_lr"] else ""
        return f"{', '.join(losses)} (max grad norm {', '.join(grads)}){mark}"

    return markdown_table(["attention", *(f"lr {lr:g}" for lr in lrs), "chosen on the grid's edge"],
                          [[arm, *(cell(c, lr) for lr in lrs), "yes" if c["at_edge"] else "no"]
                           for arm, c in chosen.items()])


def paired_table(pairs: list[dict]) -> str:
    def ci(p: dict) -> str:
        return f"[{p['interval95'][0]:+.4f}, {p['interval95'][1]:+.4f}]" if p["interval95"] else "no interval"

    def tost(p: dict) -> str:
        if not (e := p.get("equivalence")):
            return MISSING
        lo, hi = e["interval90"]
        return f"±{e['margin']:g}: [{lo:+.4f}, {hi:+.4f}], p = {e['p_value']:.3f}"

    return markdown_table(["comparison (b − a)", "seeds", "per-seed differences", "mean", "95% interval",
                           "TOST (90% interval, p)", "verdict"],
                          [[f"{p['b']} − {p['a']}", ", ".join(map(str, p["seeds"])),
                            ", ".join(f"{d:+.4f}" for d in p["diffs"]), f"{p['mean']:+.4f}", ci(p), tost(p),
                            p["verdict"]] for p in pairs], align="lllllll")


def plot(chosen: dict[str, dict], arms: dict[str, dict], pairs: list[dict], out, title: str) -> None:
    plt = pyplot()
    fig, (tune, loss, diff) = plt.subplots(1, 3, figsize=(17, 4.4))
    colors = dict(zip(sorted({*chosen, *arms}, key=_arm_order), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for arm, c in chosen.items():  # tuning seeds: loss against rate, the choice starred
        values = {lr: [v for v in c["val_loss"][lr].values() if v is not None] for lr in c["lrs"]}
        means = {lr: statistics.fmean(v) for lr, v in values.items() if v}  # a diverged rate has no point
        if means:
            tune.plot(list(means), list(means.values()), marker="o", color=colors[arm], label=arm)
        if c["chosen_lr"] is not None:
            best = statistics.fmean(v for v in c["val_loss"][c["chosen_lr"]].values() if v is not None)
            tune.scatter([c["chosen_lr"]], [best], marker="*", s=160, color=colors[arm], zorder=3)
    tune.set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss (tuning seeds)",
             title="tuning: the chosen rate starred")
    shared: dict[int, list[str]] = {}  # arms of one cache size (GLA-2 and MLA) are drawn side by side
    for arm, r in arms.items():
        shared.setdefault(r["kv_bytes_bf16"], []).append(arm)
    for arm, r in arms.items():  # reported seeds: every seed, the mean and its 95% interval, against cache size
        x = r["kv_bytes_bf16"] * 1.05 ** shared[r["kv_bytes_bf16"]].index(arm)
        loss.scatter([x] * len(r["val_loss"]), r["val_loss"], s=14, alpha=0.5, color=colors[arm])
        ci = r["interval95"]
        yerr = [[r["mean"] - ci[0]], [ci[1] - r["mean"]]] if ci else None
        loss.errorbar([x], [r["mean"]], yerr=yerr, fmt="s", capsize=4, color=colors[arm],
                      label=f"{arm} (lr {r['lr']:g})")
    loss.set(xscale="log", xlabel="KV cache bytes per token per layer (bf16, TP=1)",
             ylabel="final validation loss: seeds, mean, 95% interval", title="reported seeds at the chosen rates")
    for i, p in enumerate(pairs):  # seed by seed, with the mean's 95% interval
        diff.scatter([i] * len(p["diffs"]), p["diffs"], s=18, color=colors.get(p["b"]), zorder=3)
        if p["interval95"]:
            lo, hi = p["interval95"]
            diff.errorbar([i + 0.15], [p["mean"]], yerr=[[p["mean"] - lo], [hi - p["mean"]]], fmt="s", capsize=4,
                          color=colors.get(p["b"]))
    diff.axhline(0.0, color="gray", lw=1)
    diff.set_xticks(range(len(pairs)), [f"{p['b']}\n− {p['a']}" for p in pairs], fontsize=8)
    diff.set(ylabel="final validation loss difference", title="paired by seed; mean and 95% interval")
    for ax in (tune, loss, diff):
        ax.grid(alpha=0.3)
    for ax in (tune, loss):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def report(roots, out, name: str) -> dict:
    """Read the runs below `roots`, write NAME.json and NAME.png into `out`, print the tables; the report's dict."""
    runs = load_runs(*roots, statuses=FINISHED)
    origin = results_provenance(runs)  # refused before any file is written
    margin = registered_margin(runs)
    chosen = choose_lrs(runs)
    rows = summarize_arms(runs)
    arms = compared(rows, chosen)
    pairs = comparisons(arms, chosen, margin)
    missing = [arm for arm in chosen if arm not in arms]  # tuned, but no reported run at the chosen rate yet
    result = {**origin, "roots": [str(r) for r in roots], "equivalence_margin": margin, "tuning": chosen,
              "on_edge": edges(chosen), "rows": rows, "compared": arms, "paired": pairs, "not_compared": missing,
              "diverged": sorted(r.name for r in runs if r.status == "diverged")}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", result)
    plot(chosen, arms, pairs, out / f"{name}.png", f"attention quality: {name}")
    if chosen:
        print(f"learning rate per arm, chosen on tuning seeds:\n\n{tuning_table(chosen)}\n")
    if result["on_edge"]:
        print(f"chosen on the grid's edge (a better rate may lie beyond it): {', '.join(result['on_edge'])}\n")
    print(table(rows))
    if pairs:
        print(f"\npaired by seed, each arm at its chosen rate:\n\n{paired_table(pairs)}")
    if missing:
        print(f"\nno completed run on reported seeds at the chosen rate of: {', '.join(missing)}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = report_parser(__doc__, name="attention_quality").parse_args(argv)
    return guarded(lambda: report(args.roots, args.out, args.name))


if __name__ == "__main__":
    raise SystemExit(main())
