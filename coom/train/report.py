"""``coom report``: plots and a short summary of a run directory."""
import json
from pathlib import Path

import matplotlib
import yaml

from coom.errors import UserError
from coom.train.metrics import read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (needs the backend first)


def _plot(path: Path, title: str, ylabel: str, series: dict) -> None:
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, (steps, values) in series.items():
        if steps:
            axes.plot(steps, values, label=label,
                      marker="o" if len(steps) < 30 else None)
    axes.set(title=title, xlabel="step", ylabel=ylabel)
    axes.grid(alpha=0.3)
    if len(series) > 1:
        # Many languages: small print, in columns of twenty.
        axes.legend(fontsize="small" if len(series) > 6 else None,
                    ncols=-(-len(series) // 20))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _series(records: list[dict], key: str) -> tuple[list, list]:
    chosen = [r for r in records if r.get(key) is not None]
    return [r["step"] for r in chosen], [r[key] for r in chosen]


def _plot_energy(out: Path, records: list[dict]) -> None:
    """Energy plots, for runs that metered it."""
    if not _series(records, "energy_kwh")[0]:
        return
    _plot(out / "joules_per_token.png", "Energy per token",
          "J/token (training steps, all processes)",
          {"J/token": _series(records, "joules_per_token")})
    sources = {"total": _series(records, "energy_kwh")}
    sources |= {name: _series(records, f"energy_{name}_kwh")
                for name in ("gpu", "cpu")}
    _plot(out / "energy_kwh.png", "Energy used", "kWh (cumulative)",
          {name: series for name, series in sources.items()
           if series[0]})


def _plot_languages(out: Path, records: list[dict]) -> None:
    """For runs whose sources name languages: each language's validation
    bits per byte, and the mixture plan's shares."""
    languages = sorted({key.removeprefix("val_bpb/") for record in records
                        for key in record if key.startswith("val_bpb/")})
    if languages:
        _plot(out / "val_bpb_by_language.png", "Validation by language",
              "bits per byte",
              {language: _series(records, f"val_bpb/{language}")
               for language in languages})
    plan = out.parent / "mixture.json"
    if plan.is_file():
        _plot_mixture(out / "mixture.png",
                      json.loads(plan.read_text())["phases"])


def _plot_mixture(path: Path, phases: list[dict]) -> None:
    """Each language's share of the tokens, a bar per phase of the plan,
    the languages in order of their first phase's share."""
    first = phases[0]["languages"]
    ordered = sorted(first, key=lambda name: -first[name]["share"])
    figure, axes = plt.subplots(figsize=(max(6, len(ordered) / 6), 4))
    width = 0.8 / len(phases)
    for index, phase in enumerate(phases):
        steps = f"steps {phase['step'] + 1}-{phase['step'] + phase['steps']}"
        axes.bar([position + index * width
                  for position in range(len(ordered))],
                 [100 * phase["languages"][name]["share"]
                  for name in ordered],
                 width, label=f"{phase['plan']}, {steps}")
    axes.set_xticks([position + 0.4 - width / 2
                     for position in range(len(ordered))], ordered)
    axes.set(title="Language mixture", ylabel="share of tokens (%)")
    axes.tick_params(axis="x", labelrotation=90, labelsize="small")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _energy_line(records: list[dict], config: dict) -> str:
    kwh = _series(records, "energy_kwh")[1]
    if not kwh:
        return "- energy: not measured"
    grid = config.get("energy", {}).get("grid_gco2_per_kwh")
    at = f" at {grid} g/kWh" if grid is not None else ""
    co2e = _series(records, "co2e_kg")[1][-1]
    line = f"- energy: {kwh[-1]:.4g} kWh, {co2e:.4g} kg CO2e{at}"
    steps, step_kwh = _series(records, "energy_step_kwh")
    train, data = config.get("train", {}), config.get("data", {})
    if step_kwh and train.get("global_batch_size") and \
            data.get("seq_length"):
        # The training steps' energy over their tokens, earlier attempts
        # included: a mean weighted by steps, unlike one of the records.
        tokens = steps[-1] * train["global_batch_size"] * data["seq_length"]
        line += f", {step_kwh[-1] * 3.6e6 / tokens:.4g} J/token in steps"
    return line


def write_report(run_dir: Path) -> Path:
    """Write report/*.png and report/summary.md; returns the summary."""
    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"{run_dir} is not a run directory (no "
                        "metrics.jsonl); give the folder `coom train` wrote")
    records = read_metrics(run_dir)
    if not records:
        raise UserError(f"{run_dir}/metrics.jsonl holds no records yet")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    out = run_dir / "report"
    try:
        out.mkdir(exist_ok=True)
        return _write(out, records, config)
    except OSError as error:
        raise UserError(f"cannot write the report in {out} "
                        f"({error.strerror or error}); make {run_dir} "
                        "writable, or report on a copy of it") from None


def _write(out: Path, records: list[dict], config: dict) -> Path:
    """The report's files in out, the run's report folder."""
    run_dir = out.parent
    _plot(out / "loss.png", "Loss", "cross-entropy (nats)",
          {"train": _series(records, "loss"),
           "validation": _series(records, "val_loss"),
           "MTP (train, mean of depths)": _series(records, "mtp_loss")})
    _plot(out / "tokens_per_s.png", "Throughput", "tokens/s",
          {"train": _series(records, "tokens_per_s")})
    _plot(out / "lr.png", "Learning rate", "lr",
          {"lr": _series(records, "lr")})
    if _series(records, "moe_max_vio")[0]:
        _plot(out / "max_vio.png", "Expert load imbalance", "MaxVio",
              {"mean over MoE layers": _series(records, "moe_max_vio")})
    _plot_energy(out, records)
    _plot_languages(out, records)
    valid = _series(records, "val_loss")[1]
    growth = [record for record in records if "growth" in record]
    speeds = _series(records, "tokens_per_s")[1]
    lines = [
        f"# Run {run_dir.name}", "",
        f"- steps: {records[-1]['step']} of {config['train']['steps']}",
        f"- final training loss: {records[-1]['loss']:.4f}",
        f"- validation loss: first {valid[0]:.4f}, last {valid[-1]:.4f}, "
        f"best {min(valid):.4f}" if valid else "- validation loss: none",
        f"- mean tokens/s: {sum(speeds) / len(speeds):,.0f}",
        f"- model{' before growth' if growth else ''}: "
        f"{config['model']['num_layers']} layers, hidden "
        f"{config['model']['hidden_size']}, vocabulary "
        f"{config['model']['vocab_size']}",
        _energy_line(records, config),
        *(f"- grown after step {r['step']}: {'; '.join(r['growth'])}"
          for r in growth), "",
        "![loss](loss.png)", "![tokens/s](tokens_per_s.png)",
        "![learning rate](lr.png)", ""]
    for name in ("max_vio", "joules_per_token", "energy_kwh",
                 "val_bpb_by_language", "mixture"):
        if (out / f"{name}.png").exists():
            lines.insert(-1, f"![{name}]({name}.png)")
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    return summary
