"""Summarise the spike-recovery runs: does skipping or rewinding save a run that a fault would spoil, what does
it cost, and how often does it fire without a fault?

    python tools/experiments/spike_report.py runs/spikes/planted runs/spikes/high_lr runs/spikes/clean \\
        runs/spikes/tuning --out docs/results
    python tools/experiments/spike_report.py runs/spikes_ramp/high_lr runs/spikes_ramp/tuning \\
        --design spikes_ramp --out docs/results

The runs (docs/results/spikes.md, registered as preregistration.SPIKES) are Hydra multiruns of the presets
spikes_none (log only), spikes_skip and spikes_rewind. A run's fault design comes from its config: "planted"
(data.path, a copy with planted rows), "high rate" (optim.lr above the presets') or "no fault". On the tuning
seeds the log arm tries the high-rate grid; the rate chosen is the lowest at which it flagged a loss spike on
every tuning seed. On the reported seeds, per fault design and policy: the final validation loss (the clean
set every run scores), paired seed by seed against log only (95% interval, TOST at the registered margin);
the steps lost (dropped updates, and the steps a rewind recomputes); the time lost (those steps at the run's
median step time: the recomputed steps' own rows are discarded by the rewind, so this is an estimate); the
training time measured (every kept step's step_time_s plus that estimate), paired against log only; and the
events (loss spikes the host detector flagged, dropped updates, rewinds, data rows skipped). On the no-fault
runs, every event is a false fire. Writes NAME.json and NAME.png into --out and prints the tables and the
page's verdict line; runs without a result.json are still going and left out.

--design spikes_ramp (preregistration.SPIKES_RAMP) reports the second high-rate design alone: the same presets
with lr.warmup_steps, its rate chosen the same way, its fault saved when skip or rewind ends lower than log only
(SPIKES's no-fault runs showed they cost nothing). NAME defaults to the design's name.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from pretrain.rundir import pyplot, write_json
from tools.experiments import ExperimentError
from tools.experiments.cli import guarded, report_parser
from tools.experiments.preregistration import SPIKES, SPIKES_RAMP, SpikeDesign, SpikeRampDesign
from tools.experiments.provenance import results_provenance
from tools.experiments.runs import FINISHED, Run, is_number, load_runs
from tools.experiments.seeds import reported_runs, tuning_runs
from tools.experiments.stats import paired, summarize
from tools.experiments.tables import MISSING, fmt, markdown_table

PLANTED, HIGH_LR, CLEAN = "planted rows", "high rate", "no fault"  # the fault designs
FAULTS = (PLANTED, HIGH_LR, CLEAN)
NONE, SKIP, REWIND = "none", "skip", "rewind"  # the policies (none: logging.monitors.spike.action=log)
POLICIES = (NONE, SKIP, REWIND)
DESIGNS = {d.name: d for d in (SPIKES, SPIKES_RAMP)}
Design = SpikeDesign | SpikeRampDesign


def faults(design: Design) -> tuple[str, ...]:
    """The fault designs `design` runs: the ramp only its high rate (its no-fault evidence is SPIKES's)."""
    return (HIGH_LR,) if isinstance(design, SpikeRampDesign) else FAULTS


def warmup(config: dict) -> int:
    return int(config["lr"]["warmup_steps"])


def design_warmup(design: Design) -> int:
    """lr.warmup_steps of every run of `design`: SPIKES trains as its presets do, without warmup."""
    return design.warmup_steps if isinstance(design, SpikeRampDesign) else 0


def policy(config: dict) -> str:
    action = config["logging"]["monitors"]["spike"]["action"]
    return NONE if action == "log" else action


def fault(config: dict, design: SpikeDesign = SPIKES) -> str:
    if config["data"].get("path"):
        return PLANTED
    return HIGH_LR if config["optim"]["lr"] != design.base_lr else CLEAN


# 1. One run: its score, its events and what they cost
def outcome(run: Run) -> dict:
    """A run's final validation loss and events. Rows a rewind discarded are gone from metrics.jsonl (its event
    row names them), so dropped updates are the final skipped_total plus the spike steps of each rewind, and
    the steps lost are the final trajectory's dropped updates plus every step a rewind went back over."""
    rewinds = [r for r in run.rows if r.get("event") == "rewind"]
    times = run.values("step_time_s")
    dropped_kept = int(next(reversed(run.values("skipped_total")), 0))
    recomputed = sum(int(r["at_step"]) - int(r["to_step"]) for r in rewinds)
    median = statistics.median(times) if times else 0.0
    lost = dropped_kept + recomputed
    return {"run": run.name, "preset": run.config["name"], "fault": fault(run.config), "policy": policy(run.config),
            "seed": run.seed, "lr": run.config["optim"]["lr"], "status": run.status,
            "final_val_loss": run.last("val_loss") if run.status == "completed" else None,  # a stopped run: none
            "flagged": sum(int(r["spike"]) for r in run.rows if is_number(r.get("spike"))),
            "dropped": dropped_kept + sum(len(r.get("spike_steps", [])) for r in rewinds), "rewinds": len(rewinds),
            "data_rows_skipped": sum(int(r["data_rows_skipped"]) for r in rewinds), "recomputed_steps": recomputed,
            "steps_lost": lost, "time_lost_s": lost * median, "train_time_s": sum(times) + recomputed * median,
            "rewind_events": [{k: r.get(k) for k in ("at_step", "to_step", "reason", "spike_steps",
                                                     "data_rows_skipped")} for r in rewinds]}


def losses(run: Run) -> dict[int, float]:
    """step -> training loss of the final trajectory (a rewind's event row carries the spike's loss at the step it
    went back to, so event rows are left out)."""
    return {int(r["step"]): float(r["loss"]) for r in run.rows if "event" not in r and is_number(r.get("loss"))}


def fires(o: dict) -> int:
    """What a policy did: a flag for log only (it changes nothing), dropped updates and rewinds for the others."""
    return o["flagged"] if o["policy"] == NONE else o["dropped"] + o["rewinds"]


# 2. Tuning seeds: the high rate
def choose_lr(outcomes: list[dict], design: Design = SPIKES) -> dict:
    """The lowest rate of `design.lrs` at which the log arm flagged a loss spike (or a non-finite loss) on every
    tuning seed; None when no rate did. `settled` once every tuning run of the grid finished."""
    flags = {lr: {o["seed"]: o["flagged"] for o in outcomes if o["policy"] == NONE and o["lr"] == lr
                  and o["seed"] in design.tuning_seeds} for lr in design.lrs}
    settled = all(set(design.tuning_seeds) <= set(by_seed) for by_seed in flags.values())
    spiking = [lr for lr, by_seed in flags.items() if by_seed and all(v > 0 for v in by_seed.values())]
    return {"lrs": {f"{lr:g}": {str(s): v for s, v in by_seed.items()} for lr, by_seed in flags.items()},
            "seeds": list(design.tuning_seeds), "chosen": min(spiking) if settled and spiking else None,
            "settled": settled}


# 3. Reported seeds: each policy against log only, per fault design
def arms(outcomes: list[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    """(fault, policy) -> seed -> outcome, one run per seed."""
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for o in outcomes:
        by_seed = out.setdefault((o["fault"], o["policy"]), {})
        if o["seed"] in by_seed:
            raise ExperimentError(f"{by_seed[o['seed']]['run']} and {o['run']} are both seed {o['seed']} of "
                                  f"{o['policy']} on {o['fault']}; remove one, or report them from separate roots")
        by_seed[o["seed"]] = o
    return out


def compare(outcomes: list[dict], design: Design = SPIKES) -> dict[str, dict[str, dict]]:
    """fault -> policy -> its runs summarised, and (skip, rewind) minus log only seed by seed."""
    grouped = arms(outcomes)
    out: dict[str, dict[str, dict]] = {}
    for f in FAULTS:
        losses = {p: {s: o["final_val_loss"] for s, o in grouped.get((f, p), {}).items()
                      if o["final_val_loss"] is not None} for p in POLICIES}
        times = {p: {s: o["train_time_s"] for s, o in grouped.get((f, p), {}).items()} for p in POLICIES}
        for p in POLICIES:
            runs = grouped.get((f, p))
            if not runs:
                continue
            values = list(runs.values())
            row = {"seeds": sorted(runs), "n": len(values), "diverged": sum(o["status"] != "completed" for o in values),
                   "val_loss": summarize(losses[p].values()) if losses[p] else None,
                   **{k: statistics.fmean(o[k] for o in values) for k in
                      ("steps_lost", "time_lost_s", "train_time_s", "dropped", "rewinds", "flagged",
                       "data_rows_skipped")},
                   "fired": sum(fires(o) > 0 for o in values), "fires": sum(fires(o) for o in values)}
            if p != NONE and losses[NONE].keys() & losses[p].keys():
                row["minus_none"] = paired(losses[NONE], losses[p]).as_dict(design.margin)
            if p != NONE and times[NONE].keys() & times[p].keys():
                row["time_minus_none"] = paired(times[NONE], times[p]).as_dict()
            out.setdefault(f, {})[p] = row
    return out


def verdict(compared: dict, chosen: dict, design: Design = SPIKES) -> dict:
    """The registered rule (docs/results/spikes.md): a fault design is saved when skip or rewind ends lower than
    log only (95% interval below 0) and the same policy's no-fault runs are equivalent to log only's within
    ±margin (TOST): reproduced when both fault designs are saved, partly when one is, not reproduced when
    neither; inconclusive while a design has no runs to judge."""
    clean = compared.get(CLEAN, {})

    def costless(p: str) -> bool:
        pair = clean.get(p, {}).get("minus_none")
        return bool(pair and pair["equivalence"] and pair["equivalence"]["equivalent"])

    saved, parts = {}, []
    for f in (PLANTED, HIGH_LR):
        rows = compared.get(f, {})
        by = [p for p in (SKIP, REWIND) if rows.get(p, {}).get("minus_none", {}).get("verdict", "").startswith("lower")
              and costless(p)]
        if by:
            saved[f] = by
        pairs = [f"{p} {pair['mean']:+.3f} [{pair['interval95'][0]:+.3f}, {pair['interval95'][1]:+.3f}]"
                 for p in (SKIP, REWIND) if (pair := rows.get(p, {}).get("minus_none")) and pair["interval95"]]
        if f == HIGH_LR and chosen["settled"] and chosen["chosen"] is None:
            parts.append(f"high rate: no rate of {', '.join(f'{lr:g}' for lr in design.lrs)} made plain AdamW spike "
                         "on every tuning seed, so it was not run")
        elif pairs:
            parts.append(f"{f} (lr {_lr(compared, f)}): final val loss minus log only {', '.join(pairs)} nats")
        else:
            parts.append(f"{f}: {'no pair of seeds with log only' if rows else 'not run'}")
    false = [f"{p} {clean[p]['fired']}/{clean[p]['n']}" for p in POLICIES if p in clean]
    parts.append(f"runs without a fault that fired: {', '.join(false) if false else 'not run'}")
    missing = [f for f in (PLANTED, HIGH_LR, CLEAN) if f not in compared
               and not (f == HIGH_LR and chosen["settled"] and chosen["chosen"] is None)]
    label = ("inconclusive" if missing and not saved else
             "reproduced" if len(saved) == 2 else "partly reproduced" if saved else "not reproduced")
    seeds = sorted({s for rows in compared.values() for r in rows.values() for s in r["seeds"]})
    if saved:
        what = "; ".join(f"{' and '.join(by)} saved {f}" for f, by in saved.items())
    else:
        what = f"{' and '.join(missing)} not run yet" if missing else "neither skip nor rewind saved a faulted run"
    head = f"{label} (CPU, {len(seeds)} seed{'s' if len(seeds) != 1 else ''} paired): {what}"
    return {"label": label, "saved": saved, "missing": missing, "headline": head,
            "line": f"> **Verdict: {head}.** {'; '.join(parts)}."}


def ramp_verdict(compared: dict, chosen: dict, design: SpikeRampDesign = SPIKES_RAMP) -> dict:
    """The ramp's rule (docs/results/spikes.md): its high rate is saved when skip or rewind ends lower than log only
    (95% interval below 0); not run when no rate of the grid spiked on every tuning seed; inconclusive while the
    tuning or the runs at the chosen rate are missing. That neither policy costs anything without a fault is
    SPIKES's no-fault result, cited, not run again."""
    rows = compared.get(HIGH_LR, {})
    saved = [p for p in (SKIP, REWIND) if rows.get(p, {}).get("minus_none", {}).get("verdict", "").startswith("lower")]
    pairs = [f"{p} {pair['mean']:+.3f} [{pair['interval95'][0]:+.3f}, {pair['interval95'][1]:+.3f}]"
             for p in (SKIP, REWIND) if (pair := rows.get(p, {}).get("minus_none")) and pair["interval95"]]
    ramp = f"after {design.warmup_steps} steps of warmup"
    if chosen["settled"] and chosen["chosen"] is None:
        label, what = "not run", (f"no peak rate of {', '.join(f'{lr:g}' for lr in design.lrs)} {ramp} made plain "
                                  "AdamW spike on every tuning seed")
    elif not pairs:
        label, what = "inconclusive", "the high rate has no pair of seeds with log only yet"
    else:
        label = "saved" if saved else "not saved"
        what = (f"high rate (peak lr {_lr(compared, HIGH_LR)} {ramp}): final val loss minus log only "
                f"{', '.join(pairs)} nats")
    seeds = sorted({s for r in rows.values() for s in r["seeds"]})
    head = f"{label} (CPU, {len(seeds)} seed{'s' if len(seeds) != 1 else ''} paired)" + (
        f": {' and '.join(saved)} saved the high rate" if saved else "")
    return {"label": label, "saved": {HIGH_LR: saved} if saved else {}, "headline": head,
            "line": f"> **{design.name}: {head}.** {what}; the no-fault cost of skip and rewind is SPIKES's "
                    "no-fault runs' (docs/results/spikes.md), not run again."}


def _lr(compared: dict, f: str) -> str:
    lrs = {r.get("lr") for r in compared.get(f, {}).values()}
    return ", ".join(f"{lr:g}" for lr in sorted(lr for lr in lrs if lr is not None)) or MISSING


# 4. Tables and the plot
def interval(p: dict | None) -> str:
    if not p or not p.get("interval95"):
        return MISSING
    return f"{p['mean']:+.4f} [{p['interval95'][0]:+.4f}, {p['interval95'][1]:+.4f}]"


def tables(compared: dict, chosen: dict, outcomes: list[dict], design: Design = SPIKES) -> str:
    tuning = markdown_table(["lr", "loss spikes flagged per tuning seed"],
                            [[lr, ", ".join(f"seed {s}: {v}" for s, v in by_seed.items()) or MISSING]
                             for lr, by_seed in chosen["lrs"].items()], align="ll")
    rows = [[f, p, f"{r['n'] - r['diverged']}/{r['n']}",
             f"{r['val_loss']['mean']:.4f} ± {r['val_loss']['std']:.4f}" if r["val_loss"] else MISSING,
             interval(r.get("minus_none")), r.get("minus_none", {}).get("verdict", MISSING),
             f"{r['steps_lost']:.1f}", f"{r['time_lost_s']:.1f}", interval(r.get("time_minus_none")),
             f"{r['flagged']:.1f}", f"{r['dropped']:.1f}", f"{r['rewinds']:.1f}", f"{r['data_rows_skipped']:.0f}",
             f"{r['fired']}/{r['n']}"]
            for f, by_policy in compared.items() for p, r in by_policy.items()]
    summary = markdown_table(["fault", "policy", "completed", "final val loss", "minus none (95% CI)", "verdict",
                              "steps lost", "time lost (s)", "train time minus none (s, 95% CI)", "flagged",
                              "dropped", "rewinds", "rows skipped", "runs that fired"], rows, align="lllrrlrrrrrrrr")
    per_run = markdown_table(["run", "status", "final val", "flagged", "dropped", "rewinds", "steps lost"],
                             [[o["run"], o["status"], fmt(o["final_val_loss"], ".4f"), o["flagged"], o["dropped"],
                               o["rewinds"], o["steps_lost"]] for o in outcomes if o["seed"] in design.seeds],
                             align="llrrrrr")
    return (f"high rate: {fmt(chosen['chosen'], 'g')} (chosen on tuning seeds {chosen['seeds']})\n\n{tuning}\n\n"
            f"{summary}\n\n{per_run}")


def plot(runs: list[Run], path, shown: tuple[str, ...] = FAULTS) -> None:
    """Per fault design `shown`, the training loss of each policy: mean and min..max band over the reported seeds."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, f in zip(axes, shown):
        for p in POLICIES:
            mine = [r for r in reported_runs(runs) if fault(r.config) == f and policy(r.config) == p]
            series = [losses(r) for r in mine]
            if not series:
                continue
            steps = sorted(set.intersection(*(set(s) for s in series)))
            values = [[s[t] for s in series] for t in steps]
            ax.plot(steps, [sum(v) / len(v) for v in values], lw=1, label=f"{p} ({len(series)} seeds)")
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
        ax.set(title=f, xlabel="step", yscale="log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("training loss (mean; band: min..max over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(roots: list[Path], out: Path, name: str, design: Design = SPIKES) -> dict:
    """Read the runs below `roots`, write NAME.json and NAME.png into `out`, print the tables and the verdict."""
    runs = [r for r in load_runs(*roots, statuses=FINISHED) if r.config["name"] in design.arms]
    if not runs:
        raise ExperimentError(f"no run of {', '.join(design.arms)} below {', '.join(map(str, roots))}")
    if stray := next((r for r in runs if warmup(r.config) != design_warmup(design)), None):
        raise ExperimentError(f"{stray.name} ran lr.warmup_steps={warmup(stray.config)}, not {design.name}'s "
                              f"{design_warmup(design)}; report each design from its own roots (--design)")
    origin = results_provenance(runs)  # refused before any file is written
    outcomes = [outcome(r) for r in runs]
    chosen = choose_lr([outcome(r) for r in tuning_runs(runs)], design)
    reported = [o for o in outcomes if o["seed"] in design.seeds]
    compared = compare(reported, design)
    for f, by_policy in compared.items():
        for p, row in by_policy.items():
            row["lr"] = next(o["lr"] for o in reported if o["fault"] == f and o["policy"] == p)
    judged = (ramp_verdict if isinstance(design, SpikeRampDesign) else verdict)(compared, chosen, design)
    result = {**origin, "roots": [str(r) for r in roots], "design": design.name, "margin": design.margin,
              "high_lr": chosen, "compared": compared, "verdict": judged, "runs": outcomes}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", result)
    plot(runs, out / f"{name}.png", faults(design))
    print(tables(compared, chosen, outcomes, design))
    print(f"\n{judged['line']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = report_parser(__doc__)
    parser.add_argument("--design", choices=DESIGNS, default=SPIKES.name, help="the registered design to judge by")
    parser.add_argument("--name", help="stem of the files written into --out (default: the design's name)")
    args = parser.parse_args(argv)
    design = DESIGNS[args.design]
    return guarded(lambda: report(args.roots, args.out, args.name or design.name, design))


if __name__ == "__main__":
    raise SystemExit(main())
