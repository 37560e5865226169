"""Benchmark: training-step and inference time of each method (DMAP learned, plain MAP, ADNet, Q-Net, ALPNet).

Usage::

    python bench/methods.py [--steps 10] [--warmup 2] [--threads 2] [--backbone resnet18] [--image-size 160]
                            [--methods dmap:learned dmap:off adnet qnet alpnet] [--clock wall|cpu] [--profile]

Every method is built as the ``cpu`` recipe builds it (``config.NAMED_CONFIGS['cpu']``: its ``model``
settings, fp32, its optimiser and class weights) with ``--backbone`` and ``--image-size`` in place of the
recipe's ResNet-18 and 160 px, from random weights (speed does not depend on the values; no data and no
weights file are read). One synthetic 1-shot episode (random images, an elliptic organ-like mask) is used
throughout:

* ``train step``: forward + the method's training loss (query loss, alignment, threshold loss) + backward
  + SGD update, in train mode with 5-D inputs (one episode per step), as ``trainer.loop`` runs it;
* ``inference / slice``: ``segment`` of one query slice against a support encoded once, in eval mode under
  ``torch.inference_mode``, as EP1 evaluation runs it on a CPU (``eval_batch`` 1); Q-Net's test-time
  prototype refinement is part of it. The support encoding (once per EP1 chunk, shared by its slices) is
  given apart.

Each measurement is the median over ``--steps`` rounds after ``--warmup`` rounds; a round calls every
method once, so that load from other processes on a shared machine hits all alike, and each ratio is the
median of the per-round ratios against the first method (DMAP learned by default). Times are wall-clock
seconds; ``--clock cpu`` measures the process's CPU seconds instead (summed over its threads), which other
processes on a shared machine do not inflate: with ``--threads 1`` the cost of the step itself. ``--profile`` adds,
per method, the operators with the most time over one training step (``torch.profiler``; its times are
wall-clock, so read the shares on a shared machine). The header
names the CPU and whether oneDNN has native bf16 on it (fp32 is used either way).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_METHODS = ("dmap:learned", "dmap:off", "adnet", "qnet", "alpnet")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed rounds (median), after the warm-up")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="dmap:<mode> or a method; the first is the reference of the ratios")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall-clock seconds, or the process's CPU seconds (not inflated by other processes)")
    p.add_argument("--profile", action="store_true", help="print the costliest operators of one training step")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--steps and --threads must be >= 1, --warmup >= 0")
    return args


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def method_config(arm: str, backbone: str, image_size: int) -> dict:
    """The resolved ``cpu`` config of an arm (``dmap:<mode>`` or a method), no data needed."""
    from config import build_config, resolve_config

    method, _, mode = arm.partition(":")
    model = {"method": method, "backbone": backbone, "weights_path": ""}
    if mode:
        model["dmap_mode"] = mode
    return resolve_config(build_config(["cpu"], {"model": model, "image_size": image_size}), need_data=False)


def synthetic_episode(size: int):
    """Support images [1, 1, 3, H, W], support mask [1, 1, H, W], query images and query mask alike."""
    import torch

    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(1, 1, 3, size, size, generator=g), torch.randn(1, 1, 3, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    ellipse = (((yy - 0.45 * size) / (0.14 * size)) ** 2 + ((xx - 0.40 * size) / (0.11 * size)) ** 2 <= 1).float()
    query_mask = torch.roll(ellipse, shifts=(size // 32, size // 40), dims=(0, 1))
    return support, ellipse[None, None].clone(), query, query_mask[None, None].long()


class Bench:
    """One method's model, optimiser and timed calls on the synthetic episode."""

    def __init__(self, arm: str, args: argparse.Namespace) -> None:
        import torch

        from models.fewshot import FewShotSeg, trainable_parameter_count

        self.arm = arm
        self.clock = time.process_time if args.clock == "cpu" else time.perf_counter
        cfg = method_config(arm, args.backbone, args.image_size)
        self.cfg = cfg
        torch.manual_seed(0)
        with warnings.catch_warnings():  # "randomly initialised": on purpose
            warnings.simplefilter("ignore")
            self.model = FewShotSeg.from_config(cfg["model"])
        self.params = trainable_parameter_count(self.model)
        optim = cfg["optim"]
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=optim["lr"], momentum=optim["momentum"],
                                         weight_decay=optim["weight_decay"])
        self.episode = synthetic_episode(args.image_size)

    def train_step(self) -> float:
        """One optimisation step; returns its wall time in seconds."""
        import torch

        support, mask, query, query_mask = self.episode
        loss_cfg = self.cfg["loss"]
        self.model.train()
        start = self.clock()
        probs, aux = self.model(support, mask, query)
        loss = self.model.training_loss(probs, aux, query_mask, loss_cfg["gamma"], loss_cfg["class_weights"],
                                        loss_cfg["normalize"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        elapsed = self.clock() - start
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.arm}: the loss is {loss.item()}")
        return elapsed

    def inference(self) -> tuple[float, float]:
        """(support encoding, one query slice's segmentation) in eval mode, wall times in seconds."""
        import torch

        support, mask, query, _ = self.episode
        self.model.eval()
        with torch.inference_mode():
            start = self.clock()
            encoding = self.model.encode_support(support[0], mask[0])
            encoded = self.clock()
            prob, _ = self.model.segment(encoding, query[0])
            done = self.clock()
        assert prob.shape[0] == 1
        return encoded - start, done - encoded


def rounds(benches, fn, warmup: int, steps: int) -> list[list[float]]:
    """``warmup`` untimed rounds, then ``steps`` rounds; per bench the list of its timed results."""
    for _ in range(warmup):
        for bench in benches:
            fn(bench)
    out = [[] for _ in benches]
    for _ in range(steps):
        for bench, times in zip(benches, out):
            times.append(fn(bench))
    return out


def ratio(times: list[float], reference: list[float]) -> float:
    """Median of the per-round ratios."""
    return statistics.median(t / r for t, r in zip(times, reference))


def profile(bench: Bench, rows: int = 8) -> str:
    """The operators with the most CPU time (self) over one training step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        bench.train_step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}; oneDNN native bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()} (fp32 used); "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    print(f"cpu recipe models: {args.backbone}, {args.image_size} x {args.image_size} px, random weights, 1-shot "
          f"episode; median of {args.steps} rounds after {args.warmup} warm-up round(s); "
          f"{'wall-clock' if args.clock == 'wall' else 'CPU (process)'} seconds", flush=True)
    benches = [Bench(arm, args) for arm in args.methods]
    train = rounds(benches, Bench.train_step, args.warmup, args.steps)
    infer = rounds(benches, Bench.inference, args.warmup, args.steps)
    encode = [[e for e, _ in times] for times in infer]
    segment = [[s for _, s in times] for times in infer]
    ref = args.methods[0]
    header = ["method", "params (M)", "train step (s)", "inference / slice (s)", "encode support (s)",
              f"train vs {ref}", f"inference vs {ref}"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for i, bench in enumerate(benches):
        print(f"| {bench.arm} | {bench.params / 1e6:.2f} | {statistics.median(train[i]):.3f} | "
              f"{statistics.median(segment[i]):.3f} | {statistics.median(encode[i]):.3f} | "
              f"{ratio(train[i], train[0]):.2f} | {ratio(segment[i], segment[0]):.2f} |")
    if args.profile:
        for bench in benches:
            print(f"\n{bench.arm}: one training step\n{profile(bench)}")


if __name__ == "__main__":
    main()
