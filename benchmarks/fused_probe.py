"""Aggregate training img/s of N students trained one after another vs as one fused model (ckptkd.training.fusion).

    python benchmarks/fused_probe.py [--members 8] [--threads 2] [--workloads fashion resnet20] [--json]

A training step is forward + loss + backward + SGD step (momentum 0.9, Nesterov, weight decay 5e-4, the study's
student recipe), batch 128 per member, each member its own batch. Sequential: N models, N optimizers, one step of
each in turn. Fused: one FusedModel over the same N models, one optimizer over its parameters, the loss the SUM of
the members' losses (so each member gets its own gradient). The loss is the KD loss of ckptkd.losses against fixed
random teacher logits (tau 5, alpha 0.5, as in configs/fashion_kd_student.yaml).

Workloads:
  fashion   the Fashion-MNIST KD study's CNN student (configs/fashion_kd_student.yaml: channels [8, 16, 32],
            hidden 176) on 1x28x28, 10 classes: small, overhead-bound.
  resnet20  resnet20 on 3x32x32, 100 classes: compute-bound on a CPU.

The modes take turns within each round (best round counts), so a burst of load from other processes hits both alike.
Run it on an otherwise idle machine.
"""

import argparse
import json
import time

import torch

from ckptkd.training.fusion import fuse
from ckptkd.losses import kd_loss
from ckptkd.models import create

WORKLOADS = {
    "fashion": dict(name="cnn", num_classes=10, in_channels=1, image_size=(28, 28), kwargs={"channels": [8, 16, 32],
                                                                                            "hidden": 176}),
    "resnet20": dict(name="resnet20", num_classes=100, in_channels=3, image_size=(32, 32), kwargs={}),
}
TAU, ALPHA = 5.0, 0.5


def optimizer(params):
    return torch.optim.SGD(params, lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4)


def build(spec, n):
    return [create(spec["name"], num_classes=spec["num_classes"], in_channels=spec["in_channels"],
                   image_size=spec["image_size"], **spec["kwargs"]) for _ in range(n)]


def probe(workload: str, n: int, batch: int, steps: int, rounds: int) -> dict:
    spec = WORKLOADS[workload]
    torch.manual_seed(0)
    models = build(spec, n)
    fused = fuse(models, channels_last=True)  # from the same initial weights, as the fused engine builds it on a CPU
    x = torch.randn(n, batch, spec["in_channels"], *spec["image_size"])
    y = torch.randint(spec["num_classes"], (n, batch))
    teacher = torch.randn(n, batch, spec["num_classes"])
    optimizers = [optimizer(m.parameters()) for m in models]
    fused_optimizer = optimizer(fused.parameters())
    for m in models:
        m.train()
    fused.train()

    def sequential_step():
        for i, (model, opt) in enumerate(zip(models, optimizers)):
            opt.zero_grad(set_to_none=True)
            kd_loss(model(x[i]), teacher[i], y[i], temperature=TAU, alpha=ALPHA).backward()
            opt.step()

    def fused_step():
        fused_optimizer.zero_grad(set_to_none=True)
        out = fused(x)  # [N, B, classes]
        # The sum over members of each member's batch-mean loss: N times the mean over all N*B samples.
        loss = n * kd_loss(out.flatten(0, 1), teacher.flatten(0, 1), y.flatten(), temperature=TAU, alpha=ALPHA)
        loss.backward()
        fused_optimizer.step()

    modes = {"sequential": sequential_step, "fused": fused_step}
    for fn in modes.values():  # warm-up: allocator, oneDNN primitive caches
        fn()
        fn()
    best = {name: float("inf") for name in modes}
    for _ in range(rounds):
        for name, fn in modes.items():
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    result = {f"{name}_img_s": n * batch / seconds for name, seconds in best.items()}
    result.update(workload=workload, members=n, batch=batch, ratio=result["fused_img_s"] / result["sequential_img_s"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--members", type=int, nargs="+", default=[8])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=0, help="timed steps per round (default: 10 fashion, 2 resnet20)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON line per measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for workload in args.workloads:
        for n in args.members:
            steps = args.steps or (10 if workload == "fashion" else 2)
            r = probe(workload, n, args.batch_size, steps, args.rounds)
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                print(f"{workload:9s} N={n:<3d} sequential {r['sequential_img_s']:8.0f} img/s   fused "
                      f"{r['fused_img_s']:8.0f} img/s   fused/sequential {r['ratio']:.2f}", flush=True)


if __name__ == "__main__":
    main()
