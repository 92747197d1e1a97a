"""Compare freezing strategies (or any named override sets) on the same data in one command.

    python -m kfine.compare --config FILE --strategies backbone,bn_and_head,stages:conv4,fraction:0.7 [key=value ...]
    python -m kfine.compare --config inaturalist_compare          # the config's compare.sets
    python -m kfine.compare --resume runs/NAME-compare            # after a kill or Ctrl-C

A comparison is big_vision's sweep beside a config: ``compare.sets`` names override sets
(``{dotted key: value}``, as on the command line) and ``compare.reference`` the published
accuracy of a set (``{val: 0.803, test: 0.8625}``). ``--strategies`` is a shorthand that makes
one set per freezing strategy, replacing the config's sets: ``backbone``, ``bn_and_head``,
``none``, ``stages:conv4``, ``fraction:0.7``, ``regex:PATTERN``; each is one phase over all
``train.epochs`` with that freeze spec and the BatchNorm mode of the config's first phase, named
``stages-conv4``, ``fraction-0.7``, ...

Each set is a normal kfine run (kfine.train.run) in ``runs/NAME-compare/<set>/``, run one after
another in this process, and every one gets:
- the same data and split: before the first run the data is indexed and decoded once and the
  split saved as ``splits.csv`` beside the runs; every run reads that split (``data.splits``) and
  finds the decoded images in this process's image cache (kfine.pipeline keeps the last ones), so
  nothing is decoded twice and decoding is in no run's wall time. (A tfds source is split by its
  split strings and the seed; it is decoded again per run unless ``data.cache: disk``.)
  Frozen-backbone features (kfine.features) are kept per process too, so a later run that needs
  the same features reuses them;
- the same seed, epochs and evaluation: a set may not change ``seed``, ``name``, ``runs_dir`` or
  the keys that choose the data and split (kfine.checks.COMPARE_FIXED); every set's run config is
  checked before the first run starts.

Outputs beside the runs: ``compare.csv`` and ``compare.md`` (one row per set: phases, trainable
parameters, epochs, wall time, best validation accuracy and its epoch, the epoch whose weights
were evaluated (train.restore_best), test accuracy, the published figures; compare.md and the
report count epochs from 1 as the training log does, compare.csv holds history.csv's 0-based
epoch indices), ``plots/compare.png``
(validation curves), ``report.html`` (the table, the plot, links to each run's own report),
``config.yaml`` (with the sets, so ``--resume`` needs nothing else) and ``progress.json``.

``--resume``: finished runs are kept, an interrupted one continues with kfine.train's own resume
(at its next epoch), the rest run. Wall time counts the time runs spent in this command's
processes (a run that stopped with an error counts what it ran; time lost to a SIGKILL is not
counted). A run that stops with a TrainingError (a NaN loss) is a row marked ``failed`` and the
comparison goes on; ``--resume`` tries it again.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

from kfine import cli
from kfine.checkpoint import TrainingError, best_epoch, read_history
from kfine.checks import check_config
from kfine.config import load_config, replace, save_config
from kfine.rundir import atomic_write_text, read_json, write_csv, write_json
from kfine.schema import Config, ConfigError

DEFAULT_CONFIG = "inaturalist_compare"     # the freezing-strategies project's comparison
ARGUMENT = {"fraction": "fraction", "stages": "trainable_from", "regex": "pattern"}   # strategy:ARG
COLUMNS = ["set", "phases", "trainable_params", "epochs", "wall_s", "best_val_accuracy", "best_epoch",
           "epoch_used", "test_accuracy", "published_val", "published_test", "status", "seconds_by_stage"]


# ----------------------------------------------------------------------------- sets
def strategy_sets(spec: str, bn: str = "train") -> dict[str, dict]:
    """``--strategies backbone,stages:conv4`` -> {name: overrides}: one phase per set."""
    sets = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        strategy, _, arg = item.partition(":")
        freeze = {"strategy": strategy}
        if arg:
            if strategy not in ARGUMENT:
                raise ConfigError(f"--strategies: {item!r}: only {sorted(ARGUMENT)} take an argument "
                                  f"(fraction:0.7, stages:conv4, regex:PATTERN)")
            freeze[ARGUMENT[strategy]] = yaml.safe_load(arg) if strategy == "fraction" else arg
        sets[f"{strategy}-{arg}" if arg else strategy] = {
            "train.phases": [{"start_epoch": 0, "freeze": freeze, "bn": bn}]}
    if not sets:
        raise ConfigError(f"--strategies {spec!r} names no strategy (e.g. backbone,bn_and_head,stages:conv4)")
    return sets


def with_strategies(cfg: Config, spec: str) -> Config:
    """``cfg`` whose compare.sets are the ``--strategies`` shorthand's (its reference figures kept)."""
    sets = strategy_sets(spec, cfg.train.phases[0].bn)
    return dataclasses.replace(cfg, compare=dataclasses.replace(cfg.compare, sets=sets))


def set_config(cfg: Config, name: str, compare_dir: Path) -> Config:
    """The run config of set ``name``: the comparison's config, the set's overrides, its place in
    ``compare_dir``, and the comparison's split."""
    pinned = [f"name={name}", f"runs_dir={compare_dir}", "compare={}"]
    if cfg.data.source != "tfds":
        pinned.append(f"data.splits={compare_dir / 'splits.csv'}")
    overrides = [f"{k}={json.dumps(v)}" for k, v in cfg.compare.sets[name].items()]
    try:
        return check_config(replace(cfg, overrides + pinned))
    except ConfigError as e:
        raise ConfigError(f"compare.sets.{name}: {e}") from None


# ----------------------------------------------------------------------------- running
def compare(cfg: Config, resume: Path | None = None, overwrite: bool = False) -> Path:
    """Run every set of ``cfg.compare.sets`` (see the module docstring); returns the comparison's
    directory. ``resume``: that directory, to continue."""
    from kfine import checkpoint
    check_config(cfg)
    if not cfg.compare.sets:
        raise ConfigError("nothing to compare: give --strategies (e.g. backbone,bn_and_head,stages:conv4) "
                          "or a compare.sets section in the config")
    compare_dir = (Path(resume) if resume else
                   checkpoint.prepare_run_dir(replace(cfg, [f"name={cfg.name}-compare"]), overwrite))
    lock = checkpoint.lock_run_dir(compare_dir)
    try:
        try:   # every run's config checked and the data read before the first run starts
            configs = {name: set_config(cfg, name, compare_dir) for name in cfg.compare.sets}
            if not resume:
                save_config(cfg, compare_dir / "config.yaml")
            print(f"kfine: comparing {len(configs)} runs in {compare_dir}: {', '.join(configs)}", flush=True)
            prepare_split(cfg, compare_dir)
        except BaseException:
            if not resume:   # a comparison that stops before its first run leaves no directory behind
                shutil.rmtree(compare_dir, ignore_errors=True)
            raise
        progress = read_json(compare_dir / "progress.json", {})
        for i, (name, sub) in enumerate(configs.items()):
            if progress.get(name, {}).get("status") == "done":
                print(f"kfine: compare: {name} finished before; kept", flush=True)
                continue
            print(f"\nkfine: compare: run {i + 1}/{len(configs)}: {name}", flush=True)
            _run_set(sub, compare_dir / name, progress, compare_dir)
            write_results(cfg, compare_dir, progress)
        rows = write_results(cfg, compare_dir, progress)
        print("\n" + markdown_table(rows), flush=True)
        print(f"kfine: done. Comparison in {compare_dir}/ (compare.csv, compare.md, plots/compare.png, report.html)",
              flush=True)
    finally:
        lock.release()
    return compare_dir


def prepare_split(cfg: Config, compare_dir: Path) -> None:
    """Index and decode the data once, before any run: the decoded images stay in this process's
    image cache for every run, and the split is written where every run reads it."""
    if cfg.data.source == "tfds":
        return
    from kfine import data as kdata
    from kfine.sources import write_splits
    saved = compare_dir / "splits.csv"
    datasets = kdata.make_datasets(cfg.data, cfg.seed, splits=saved if saved.exists() else None, verbose=True)
    if not saved.exists():
        write_json(compare_dir / "class_names.json", datasets.class_names)   # read_splits' class order
        write_splits(datasets.index, saved)


def _run_set(cfg: Config, run_dir: Path, progress: dict, compare_dir: Path) -> None:
    """One set's run: new, or continued with kfine.train's resume where it has started."""
    from kfine.train import run
    started = (run_dir / "config.yaml").exists()
    if run_dir.exists() and not started:   # created, then killed before its config was written
        shutil.rmtree(run_dir)
    entry = progress.setdefault(run_dir.name, {"wall_s": 0.0})
    entry.update(status="running", error=None)
    t = time.perf_counter()
    try:
        run(cfg, resume=run_dir if started else None)
        entry["status"] = "done"
    except TrainingError as e:   # a strategy that diverges is a result too: the others still run
        entry.update(status="failed", error=str(e))
        print(f"kfine: compare: {run_dir.name} failed: {e}", file=sys.stderr, flush=True)
    finally:
        entry["wall_s"] += time.perf_counter() - t
        write_json(compare_dir / "progress.json", progress)


# ----------------------------------------------------------------------------- results
def result_row(name: str, run_dir: Path, progress: dict, reference: dict) -> dict:
    """One set's row of the table, from its run directory (history, phases, metrics)."""
    history = read_history(run_dir / "history.csv")
    phases, metrics = read_json(run_dir / "phases.json", []), read_json(run_dir / "metrics.json", {})
    best = best_epoch(history, "val_accuracy", "max")
    return {"set": name,
            "phases": " -> ".join(_describe_phase(p) for p in phases),
            "trainable_params": sum(r["trainable"] for r in phases[-1]["summary"]) if phases else None,
            "epochs": len(history),
            "wall_s": round(progress.get("wall_s", 0.0), 1),
            "best_val_accuracy": next((r["val_accuracy"] for r in history if r["epoch"] == best), None),
            "best_epoch": best,
            "epoch_used": (metrics.get("model") or {}).get("epoch"),
            "test_accuracy": (metrics.get("test") or {}).get("accuracy"),
            "published_val": reference.get("val"),
            "published_test": reference.get("test"),
            "status": progress.get("status", "not run"),
            "seconds_by_stage": _stage_split(run_dir)}


def _stage_split(run_dir: Path) -> str:
    """Where the run's time went (run_info.json's timings, kfine.log.stage_split), "" before it ends."""
    from kfine.log import stage_split
    timings = read_json(run_dir / "run_info.json", {}).get("timings")
    return stage_split(timings) if timings else ""


def _describe_phase(p: dict) -> str:
    from kfine.plots import phase_label
    return f"{phase_label(p).split(': ', 1)[-1]} (bn {p.get('bn', 'train')})"


def write_results(cfg: Config, compare_dir: Path, progress: dict) -> list[dict]:
    """compare.csv, compare.md, plots/compare.png and report.html from the runs so far."""
    from kfine import plots, report
    rows = [result_row(name, compare_dir / name, progress.get(name, {}), cfg.compare.reference.get(name, {}))
            for name in cfg.compare.sets]
    write_csv(compare_dir / "compare.csv", rows, COLUMNS)
    atomic_write_text(compare_dir / "compare.md", markdown_table(rows) + "\n")
    curves = {name: plots.read_history_csv(compare_dir / name / "history.csv")
              for name in cfg.compare.sets if (compare_dir / name / "history.csv").exists()}
    published = {name: ref["val"] for name, ref in cfg.compare.reference.items() if "val" in ref}
    plots.plot_compare(curves, compare_dir / "plots" / "compare.png", published)
    report.write_report(compare_dir)
    return rows


def _pct(v) -> str:
    return "" if v is None or v == "" else f"{100 * float(v):.2f}%"


def markdown_table(rows: list[dict]) -> str:
    head = ["set", "phases", "trainable params", "epochs", "wall time", "best val acc (epoch)", "epoch used",
            "test acc", "published val", "published test", "status", "seconds by stage"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        best = f"{_pct(r['best_val_accuracy'])} ({r['best_epoch'] + 1})" if r["best_epoch"] is not None else ""
        cells = [r["set"], r["phases"], f"{r['trainable_params']:,}" if r["trainable_params"] is not None else "",
                 r["epochs"], f"{r['wall_s']:.1f} s", best, "" if r["epoch_used"] is None else r["epoch_used"] + 1,
                 _pct(r["test_accuracy"]), _pct(r["published_val"]), _pct(r["published_test"]), r["status"],
                 r["seconds_by_stage"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kfine.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_arguments(ap, default=DEFAULT_CONFIG)
    ap.add_argument("--strategies", metavar="LIST",
                    help="comma-separated freezing strategies, one run each (replaces compare.sets): "
                         "backbone, bn_and_head, none, stages:conv4, fraction:0.7, regex:PATTERN")
    ap.add_argument("--resume", metavar="COMPARE_DIR", help="continue an interrupted comparison")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace runs/<name>-compare instead of runs/<name>-compare-2")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run, e.g. train.epochs=5")
    args = ap.parse_args(argv)
    if args.list_configs:
        print(cli.format_config_list())
        return 0
    return cli.run_command(lambda: _main(args), TrainingError)


def _main(args) -> None:
    if args.resume:
        compare_dir = Path(args.resume)
        if not (compare_dir / "config.yaml").exists():
            raise TrainingError(f"{compare_dir} is not a kfine comparison directory (no config.yaml)")
        if args.strategies:
            raise ConfigError("--strategies cannot change the runs of a comparison being resumed "
                              f"(they are in {compare_dir / 'config.yaml'})")
        compare(load_config(compare_dir / "config.yaml", args.overrides), resume=compare_dir)
        return
    cfg = load_config(cli.find_config(args.config or DEFAULT_CONFIG), args.overrides)
    if args.strategies:
        cfg = with_strategies(cfg, args.strategies)
    compare(cfg, overwrite=args.overwrite)


if __name__ == "__main__":
    from kfine.cli import exit_main
    exit_main(main)
