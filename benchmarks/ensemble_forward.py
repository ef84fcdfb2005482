"""Images/s of a 4-checkpoint teacher ensemble: M forwards one by one vs one vmapped EnsembleForward.

    python benchmarks/ensemble_forward.py [--device cpu|cuda] [--threads 2] [--json]

Run it on an otherwise idle machine: other load on the cores makes the numbers noisy.
"""

import argparse
import json
import time

import torch

from ckptkd.teachers.forward import EnsembleForward
from ckptkd.models import create


def seconds_per_call(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_images_per_second(variants: dict, x, *, warmup: int, iters: int) -> dict[str, float]:
    """Images/s of each variant, best of `iters` rounds.

    The variants take turns within each round, so a burst of load from other processes hits them
    alike rather than whichever happens to be running; the best round is the least disturbed one.
    """
    for _ in range(warmup):
        for fn in variants.values():
            seconds_per_call(fn, x)
    best = {name: float("inf") for name in variants}
    for _ in range(iters):
        for name, fn in variants.items():
            best[name] = min(best[name], seconds_per_call(fn, x))
    return {name: x.shape[0] / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    rows = []
    for name in args.models:
        models = [create(name, num_classes=10).to(device) for _ in range(args.checkpoints)]
        variants = {"loop": EnsembleForward(models, batched=False), "batched": EnsembleForward(models, batched=True)}
        ips = best_images_per_second(variants, x, warmup=args.warmup, iters=args.iters)
        loop_ips, batched_ips = ips["loop"], ips["batched"]
        loop_out = variants["loop"](x)
        # relative to the largest logit: random deep nets (resnet56) give logits in the thousands
        max_rel_diff = ((loop_out - variants["batched"](x)).abs().max() / loop_out.abs().max()).item()
        rows.append({"model": name, "loop_images_per_s": round(loop_ips, 1),
                     "batched_images_per_s": round(batched_ips, 1), "speedup": round(batched_ips / loop_ips, 3),
                     "max_rel_diff": float(f"{max_rel_diff:.3g}")})

    setup = {"device": str(device), "threads": args.threads, "checkpoints": args.checkpoints,
             "batch_size": args.batch_size, "torch": torch.__version__}
    if args.json:
        print(json.dumps({**setup, "results": rows}))
        return
    print(f"{args.checkpoints} checkpoints, batch {args.batch_size}x3x32x32, {device}, "
          f"{args.threads} threads, torch {torch.__version__}; images/s (each image through all checkpoints)")
    print(f"{'model':<12}{'loop':>10}{'batched':>10}{'speedup':>9}{'max rel diff':>14}")
    for r in rows:
        print(f"{r['model']:<12}{r['loop_images_per_s']:>10.1f}{r['batched_images_per_s']:>10.1f}{r['speedup']:>8.2f}x"
              f"{r['max_rel_diff']:>14.3g}")


if __name__ == "__main__":
    main()
