"""Learning-rate range test (Smith 2015; fastai's lr_find): train the config's first phase for a
few hundred steps while the learning rate grows exponentially, and suggest a rate.

    python -m kfine.lr_find --config FILE [key=value ...] [--steps 200] [--start-lr 1e-7] [--end-lr 10]

The model, optimizer and data are the run's own (kfine.fit.build_training, the first phase's
freeze spec and per-stage multipliers), with the schedule replaced by an exponential ramp from
``start_lr`` to ``end_lr`` over ``steps`` optimizer steps. The loss of each step is smoothed
(exponential moving average with bias correction, beta 0.98); the test stops early once the
smoothed loss exceeds 4x its minimum (divergence) or turns NaN. The suggestion is the rate at the
smoothed minimum divided by 10 (fastai's ``lr_min``), the last rate where the loss was still
clearly falling. The model and optimizer are thrown away: nothing of the test is kept but its
plot and CSV ({runs_dir}/lr_find/{name}.png, .csv). The last line printed is the override:

    train.schedule.learning_rate=3.16e-04
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from kfine import cli
from kfine.checks import check_config
from kfine.config import load_config
from kfine.schema import Config, ConfigError

BETA = 0.98          # loss smoothing
DIVERGE = 4.0        # stop when the smoothed loss exceeds this multiple of its minimum


@dataclass
class LRFind:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    diverged_at: int | None      # the step at which the test stopped, None if it ran to the end


def range_config(cfg: Config, start_lr: float, end_lr: float, steps: int) -> Config:
    """The config's first phase with an exponential ramp: lr(step) = start_lr * gamma**step,
    reaching end_lr at the last step (one schedule 'epoch' per step)."""
    if not 0 < start_lr < end_lr:
        raise ConfigError(f"lr_find: need 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    if steps < 2:
        raise ConfigError(f"lr_find: steps must be >= 2, got {steps}")
    gamma = (end_lr / start_lr) ** (1.0 / (steps - 1))
    schedule = dataclasses.replace(cfg.train.schedule, name="exponential", learning_rate=start_lr,
                                   gamma=gamma, warmup_epochs=0.0)
    first = dataclasses.replace(cfg.train.phases[0], start_epoch=0)
    train = dataclasses.replace(cfg.train, schedule=schedule, phases=(first,), epochs=steps, steps_per_epoch=1)
    return dataclasses.replace(cfg, train=train)


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    """Bias-corrected exponential moving average."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> float:
    """The rate at the smoothed loss's minimum / 10, kept inside the tested range."""
    finite = [(s, lr) for s, lr in zip(smoothed, lrs) if math.isfinite(s)]
    if not finite:
        raise ValueError("lr_find: every loss was NaN or infinite; check the data and the model")
    best_lr = min(finite)[1]
    return min(max(best_lr / 10.0, lrs[0]), lrs[-1])


def find_lr(cfg: Config, datasets=None, model=None, start_lr: float = 1e-7, end_lr: float = 10.0,
            steps: int = 200) -> LRFind:
    """Run the range test. ``model``: start from its weights (it must be the model the config
    builds); it is copied, never trained or changed. Without it, the config's model is built
    (its ``model.weights``, e.g. ImageNet)."""
    from kfine.fit import build_training, compile_model, setup_backend

    rcfg = range_config(cfg, start_lr, end_lr, steps)
    setup_backend(rcfg)
    if datasets is None:
        from kfine import data as kdata
        datasets = kdata.make_datasets(rcfg.data, rcfg.seed)
    if model is not None:    # its weights are copied below: do not load any others
        rcfg = dataclasses.replace(rcfg, model=dataclasses.replace(rcfg.model, weights=None))
    net, optimizer, schedule = build_training(rcfg, datasets)
    if model is not None:
        _copy_weights(model, net)
    compile_model(net, optimizer, rcfg, len(datasets.class_names))
    lrs, losses, smoothed = [], [], []
    diverged = None
    batches = iter(datasets.train.repeat())
    for step in range(steps):
        x, y = next(batches)
        lrs.append(float(schedule(step)))
        net.reset_metrics()      # the step's own loss, not a running mean
        losses.append(float(net.train_on_batch(x, y, return_dict=True)["loss"]))
        smoothed = smooth(losses)
        best = min(s for s in smoothed if math.isfinite(s)) if any(map(math.isfinite, smoothed)) else math.inf
        if not math.isfinite(smoothed[-1]) or (step > 0 and smoothed[-1] > DIVERGE * best):
            diverged = step
            break
    return LRFind(lrs, losses, smoothed, suggest(lrs, smoothed), diverged)


def _copy_weights(source, target) -> None:
    src, dst = source.weights, target.weights
    if [tuple(v.shape) for v in src] != [tuple(v.shape) for v in dst]:
        raise ValueError("lr_find: the model passed in is not the model this config builds "
                         f"({len(src)} weights vs {len(dst)})")
    for s, d in zip(src, dst):
        d.assign(s.value)


def write_outputs(result: LRFind, out_base: Path) -> tuple[Path, Path]:
    """The plot (PNG) and the curve (CSV: step, lr, loss, smoothed) beside it."""
    from kfine.plots import plot_lr_find
    from kfine.rundir import atomic_write_text
    out_base.parent.mkdir(parents=True, exist_ok=True)
    png = plot_lr_find(result.lrs, result.losses, result.smoothed, result.suggestion, out_base.with_suffix(".png"))
    rows = ["step,lr,loss,smoothed"] + [f"{i},{lr!r},{l!r},{s!r}" for i, (lr, l, s)
                                        in enumerate(zip(result.lrs, result.losses, result.smoothed))]
    csv_path = out_base.with_suffix(".csv")
    atomic_write_text(csv_path, "\n".join(rows) + "\n")
    return png, csv_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kfine.lr_find", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the run's YAML config")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps of the ramp (default 200)")
    ap.add_argument("--start-lr", type=float, default=1e-7)
    ap.add_argument("--end-lr", type=float, default=10.0)
    ap.add_argument("--out", help="plot path without suffix (default {runs_dir}/lr_find/{name})")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    return cli.run_command(lambda: _main(args))


def _main(args) -> int:
    cfg = check_config(load_config(cli.find_config(args.config), args.overrides))
    result = find_lr(cfg, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps)
    png, csv_path = write_outputs(result, Path(args.out) if args.out else Path(cfg.runs_dir) / "lr_find" / cfg.name)
    stop = (f"stopped at step {result.diverged_at} (lr {result.lrs[-1]:.2e}): the loss diverged"
            if result.diverged_at is not None else f"ran all {len(result.lrs)} steps")
    print(f"kfine: LR range test {result.lrs[0]:.1e} .. {args.end_lr:.1e}, {stop}; "
          f"suggested rate {result.suggestion:.2e} (the smoothed minimum / 10)\n"
          f"kfine: wrote {png} and {csv_path}", flush=True)
    print(f"train.schedule.learning_rate={result.suggestion:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    from kfine.cli import exit_main
    exit_main(main)
