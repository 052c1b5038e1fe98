#!/usr/bin/env python3
"""Where one training step of a recipe goes, on random data: forward, loss, backward, optimizer.

    python tools/bench_step.py [--recipe jobs/demo.toml] [--set key=value ...] [--rounds 5] [--steps 4]
                               [--against key=value ...]

Builds the recipe's step as the trainer takes it (amodal/step.py: model, loss, optimizer, precision; on
the CPU, so fp32 unless the recipe says bf16), on one random batch of the recipe's input size and batch
(targets 128x128), and times each part of the step. The optimizer is timed twice per step, side by side
in this process: the fused AdamW kernel the trainer uses, and the for-each one (PyTorch's default
without `fused`) as the baseline; the ratio is baseline / fused. Rounds alternate which one goes
first. Medians over rounds (amodal/bench.py's rounds; the first, a warm-up, left out). Run it alone:
timings on a shared CPU move with the other jobs.

With --against, a second model is built from the recipe with those overrides on top (for example
`--against model.encoder_layers=4`: the whole ResNet against the demo's encoder without layer4) and
its whole step (forward, loss, backward, clip, fused AdamW) is timed in the same rounds, the two
models taking turns going first; the report adds its step time and the ratio against / recipe.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from amodal.bench import random_batch, time_rounds
from amodal.config import load_config
from amodal.step import build_step

CPU = torch.device("cpu")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="jobs/demo.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    p.add_argument("--against", action="append", default=[], metavar="KEY=VALUE",
                   help="also time the step of the recipe with these overrides on top, side by side")
    args = p.parse_args(argv)

    cfg = load_config(args.recipe, args.overrides)
    n, size = cfg.train.global_batch, cfg.data.input_size
    step = build_step(cfg, CPU)
    x, target = random_batch(n, size, CPU)
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in step.optimizer.param_groups]
    foreach = torch.optim.AdamW(groups, lr=cfg.optim.lr, foreach=True)  # the same groups, the other kernel
    assert not any(g["fused"] for g in foreach.param_groups)

    parts = ("forward", "loss", "backward", "clip", "AdamW fused", "AdamW for-each")
    times = {k: [] for k in parts}  # ms per step, a round each
    spent = dict.fromkeys(parts, 0.0)

    def timed(part: str, fn, *a):
        began = time.perf_counter()
        out = fn(*a)
        spent[part] += time.perf_counter() - began
        return out

    def recipe_step() -> None:
        loss = timed("loss", step.loss, timed("forward", step.forward, x), target)
        timed("backward", step.backward, loss)
        timed("clip", step.clip)
        order = [("AdamW fused", step.update), ("AdamW for-each", foreach.step)]
        for name, update in order if len(times["forward"]) % 2 == 0 else order[::-1]:  # turns by round
            timed(name, update)

    def round_done(r: int, name: str, _) -> None:
        if name == "recipe":
            for k in parts:
                times[k].append(1000 * spent[k] / args.steps)
                spent[k] = 0.0

    steps = {"recipe": recipe_step}
    if args.against:
        # Its own model, loss, optimizer and batch: an override of the input size, batch or loss counts.
        against = load_config(args.recipe, args.overrides + args.against)
        other = build_step(against, CPU)
        x_b, target_b = random_batch(against.train.global_batch, against.data.input_size, CPU)
        steps["against"] = lambda: other(x_b, target_b)
    # Round 0 warms up (allocator, oneDNN kernels, optimizer state) and is left out.
    rounds = time_rounds(steps, args.rounds + 1, args.steps, CPU, round_done)

    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    step_ms = sum(med[k] for k in parts[:-1])
    print(f"{args.recipe}: {cfg.model.name} (encoder depth {cfg.model.encoder_depth}, {cfg.model.encoder_layers} layers), "
          f"input {size}, batch {n}, "
          f"loss {cfg.loss.name}, {torch.get_num_threads()} torch threads; median of {args.rounds} rounds x {args.steps} steps")
    for k in parts:
        print(f"  {k:15s} {med[k]:7.1f} ms" + (f"  ({100 * med[k] / step_ms:.0f}% of the step)" if k != parts[-1] else ""))
    print(f"  step            {step_ms:7.1f} ms  ({n / step_ms * 1000:.1f} images/s without data loading)")
    print(f"optimizer: for-each / fused = {med['AdamW for-each'] / med['AdamW fused']:.2f}x")
    if args.against:
        theirs = 1000 * statistics.median(rounds["against"].wall[1:]) / args.steps
        print(f"against {' '.join(args.against)}: step {theirs:.1f} ms "
              f"({against.train.global_batch / theirs * 1000:.1f} images/s); against / recipe = {theirs / step_ms:.2f}x")


if __name__ == "__main__":
    main()
