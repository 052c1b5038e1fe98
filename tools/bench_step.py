#!/usr/bin/env python3
"""Where one training step of a recipe goes, on random data: forward, loss, backward, optimizer.

    python tools/bench_step.py [--recipe jobs/demo.toml] [--set key=value ...] [--rounds 5] [--steps 4]
                               [--against key=value ...]

Builds the recipe's model, loss and optimizer as the trainer does (fp32, the recipe's input size and
batch, targets 128x128) and times each part of the step. The optimizer is timed twice per round, side
by side in this process: the fused AdamW kernel the trainer uses, and the for-each one (PyTorch's
default without `fused`) as the baseline; the ratio is baseline / fused. Rounds alternate which one goes
first. Medians over rounds. Run it alone: timings on a shared CPU move with the other jobs.

With --against, a second model is built from the recipe with those overrides on top (for example
`--against model.encoder_layers=4`: the whole ResNet against the demo's encoder without layer4) and
its whole step (forward, loss, backward, fused AdamW) is timed in the same rounds, the two models
taking turns going first; the report adds its step time and the ratio against / recipe.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from amodal.config import load_config
from amodal.labels import NUM_CLASSES
from amodal.losses import build_loss
from amodal.models import build_model
from amodal.optim import make_optimizer


def step_parts(cfg):
    """A recipe's model (seed 0), loss, fused optimizer as the trainer builds them, and one random batch
    of its input size (targets 128x128)."""
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    n, size = cfg.train.global_batch, cfg.data.input_size
    return (model, build_loss(cfg.loss), make_optimizer(model, cfg.optim),
            torch.rand(n, 3, size, size), torch.randint(0, NUM_CLASSES, (n, 2, 128, 128)))


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
    model, loss_fn, fused, x, target = step_parts(cfg)
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in fused.param_groups]
    foreach = torch.optim.AdamW(groups, lr=cfg.optim.lr, foreach=True)  # the same groups, the other kernel
    assert not any(g["fused"] for g in foreach.param_groups)
    n, size = cfg.train.global_batch, cfg.data.input_size

    other = None
    if args.against:
        # Its own model, loss, optimizer and batch: an override of the input size, batch or loss counts.
        other = step_parts(load_config(args.recipe, args.overrides + args.against))

    def other_step() -> float:
        model_b, loss_b, opt_b, x_b, target_b = other
        t = time.perf_counter()
        loss_b(model_b(x_b), target_b).backward()
        opt_b.step()
        opt_b.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    parts = ("forward", "loss", "backward", "AdamW fused", "AdamW for-each")
    times = {k: [] for k in parts}
    against_times = []
    for r in range(args.rounds + 1):  # round 0 warms up: allocator, oneDNN kernels, optimizer state
        spent = dict.fromkeys(parts, 0.0)
        against = 0.0
        for _ in range(args.steps):
            if other is not None and r % 2 == 1:  # the two models take turns going first
                against += other_step()
            t0 = time.perf_counter()
            logits = model(x)
            t1 = time.perf_counter()
            loss = loss_fn(logits, target)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            spent["forward"] += t1 - t0
            spent["loss"] += t2 - t1
            spent["backward"] += t3 - t2
            order = [("AdamW fused", fused), ("AdamW for-each", foreach)]
            for name, opt in order if r % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                opt.step()
                spent[name] += time.perf_counter() - t
            fused.zero_grad(set_to_none=True)
            if other is not None and r % 2 == 0:
                against += other_step()
        if r:
            for k in parts:
                times[k].append(1000 * spent[k] / args.steps)
            against_times.append(1000 * against / args.steps)

    med = {k: statistics.median(v) for k, v in times.items()}
    step = sum(med[k] for k in parts[:4])
    print(f"{args.recipe}: {cfg.model.name} (encoder depth {cfg.model.encoder_depth}, {cfg.model.encoder_layers} layers), "
          f"input {size}, batch {n}, "
          f"loss {cfg.loss.name}, {torch.get_num_threads()} torch threads; median of {args.rounds} rounds x {args.steps} steps")
    for k in parts:
        print(f"  {k:15s} {med[k]:7.1f} ms" + (f"  ({100 * med[k] / step:.0f}% of the step)" if k != parts[4] else ""))
    print(f"  step            {step:7.1f} ms  ({n / step * 1000:.1f} images/s without data loading)")
    print(f"optimizer: for-each / fused = {med['AdamW for-each'] / med['AdamW fused']:.2f}x")
    if other is not None:
        theirs = statistics.median(against_times)
        n_b = other[3].shape[0]
        print(f"against {' '.join(args.against)}: step {theirs:.1f} ms ({n_b / theirs * 1000:.1f} images/s); "
              f"against / recipe = {theirs / step:.2f}x")


if __name__ == "__main__":
    main()
