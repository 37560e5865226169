"""Benchmark: one DMAP training step vs the bare backbone step, and evaluation with a reused support.

Usage::

    python bench/train_step.py [--size 256] [--threads 2] [--n 5] [--mode learned] [--backbone resnet101]
                               [--device cpu] [--amp off|bf16|fp16] [--channels-last] [--batch-size 1]
                               [--eval-batch 8]

Measurements (the peak memory of each in a fresh subprocess, ``ru_maxrss``, so that one does not hide
in another's):

* ``step`` (memory: a fresh process, two steps): forward + focal loss + backward + SGD step of
  ``batch-size`` 1-shot episodes (support, mask, query; random images, an elliptic organ-like mask)
  with :class:`models.fewshot.FewShotSeg`.
* ``backbone`` (memory likewise): the bare dilated torchvision ResNet (conv1..fc) forward + backward +
  SGD step of the same images -- the floor the full step is compared with.
* ``eval``: ``full_forward_s`` (support + query forward under ``torch.no_grad`` in eval mode) vs
  ``eval_slice_s`` (one query slice with the support encoded once by ``encode_support``).

Timings come from one more process that alternates the full step and the backbone step (and, in
``eval``, the three evaluation calls) so that load from other processes on a shared machine affects
both alike; each is the median of ``--n`` rounds after one warm-up, ratios are medians of the
per-round ratios. The last printed line is one JSON object with all figures. ``import_torch_rss_mb``
is the resident memory right after importing torch (the CUDA build maps most of a GB), included in
every peak figure. Random weights (no checkpoint needed): speed does not depend on the values.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=5, help="timed repetitions (after one warm-up)")
    p.add_argument("--mode", default="learned", choices=["learned", "fixed", "off"])
    p.add_argument("--backbone", default="resnet101", choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--batch-size", type=int, default=1, help="episodes per step (5-D batched inputs)")
    p.add_argument("--eval-batch", type=int, default=8,
                   help="query slices per segment() call with one encoded support (evaluation throughput)")
    p.add_argument("--worker", choices=["timing", "step", "backbone", "eval"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- worker side
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(args, device):
    """Support images [B,1,3,H,W], masks [B,1,H,W], query images [B,1,3,H,W], query masks [B,1,H,W]."""
    import torch
    g = torch.Generator().manual_seed(0)
    b, s = args.batch_size, args.size
    si = torch.randn(b, 1, 3, s, s, generator=g)
    qi = torch.randn(b, 1, 3, s, s, generator=g)
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32),
                            indexing="ij")
    ellipse = (((yy - 0.45 * s) / (0.14 * s)) ** 2 + ((xx - 0.40 * s) / (0.11 * s)) ** 2 <= 1).float()
    sm = ellipse.expand(b, 1, s, s).clone()
    qm = torch.roll(ellipse, shifts=(s // 32, s // 40), dims=(0, 1)).expand(b, 1, s, s).long().clone()
    return si.to(device), sm.to(device), qi.to(device), qm.to(device)


def _time(fn, n, device):
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _time_interleaved(fns, n, device):
    """One warm-up call of each function, then n rounds calling each once; returns per-function times."""
    for fn in fns:
        fn()
    _sync(device)
    times = [[] for _ in fns]
    for _ in range(n):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - t0)
    return times


def run_worker(args) -> dict:
    import torch

    import_rss_mb = _peak_rss_mb()  # the (CUDA) torch build alone maps most of a GB
    from models.encoder import build_dilated_resnet
    from models.fewshot import FewShotSeg
    from models.losses import focal_loss
    from util.amp import autocast

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    si, sm, qi, qm = _inputs(args, device)
    if args.channels_last:
        si = si.flatten(0, 1).contiguous(memory_format=fmt).unflatten(0, si.shape[:2])
        qi = qi.flatten(0, 1).contiguous(memory_format=fmt).unflatten(0, qi.shape[:2])
    scaler = torch.amp.GradScaler(device.type) if (args.amp == "fp16" and device.type == "cuda") else None
    result = {}

    if args.worker in ("timing", "step", "eval"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = FewShotSeg(backbone=args.backbone, dmap_mode=args.mode).to(device, memory_format=fmt)
    if args.worker in ("timing", "step"):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        losses = []

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast(device, args.amp):
                probs, aux = model(si, sm, qi)
                loss = focal_loss(probs.flatten(0, 1), qm.flatten(0, 1))
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            losses.append(float(loss.detach()))

    if args.worker in ("timing", "backbone"):
        net = build_dilated_resnet(args.backbone).to(device, memory_format=fmt).train()
        bb_opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        images = torch.cat([si.flatten(0, 1), qi.flatten(0, 1)])

        def bb_step():
            bb_opt.zero_grad(set_to_none=True)
            with autocast(device, args.amp):
                loss = net(images).float().mean()
            loss.backward()
            bb_opt.step()

    if args.worker == "timing":
        # Interleaved (step, backbone, step, backbone, ...) so that load from other processes on a shared
        # machine hits both alike; the ratio is the median of the per-round ratios.
        times = _time_interleaved([step, bb_step], args.n, device)
        result.update(step_s=times[0], backbone_step_s=times[1],
                      ratios=[a / b for a, b in zip(times[0], times[1])],
                      loss_finite=all(v == v and abs(v) != float("inf") for v in losses))
    elif args.worker == "step":      # memory only: a fresh process, two steps (momentum buffers exist)
        step(); step()
    elif args.worker == "backbone":
        bb_step(); bb_step()
    else:
        model.eval()
        with torch.no_grad(), autocast(device, args.amp):
            encode = lambda: model.encode_support(si, sm)  # noqa: E731
            encoding = encode()
            full, enc_times, seg = _time_interleaved(
                [lambda: model(si, sm, qi), encode, lambda: model.segment(encoding, qi)], args.n, device)
            # a chunk of query slices segmented with one support, as test.py does (eval_batch)
            chunk_encoding = model.encode_support(si[0], sm[0])
            chunk = qi[0].repeat(args.eval_batch, 1, 1, 1)
            (chunk_times,) = _time_interleaved([lambda: model.segment(chunk_encoding, chunk)], args.n, device)
        result.update(full_forward_s=full, encode_support_s=enc_times, eval_slice_s=seg,
                      ratios=[a / b for a, b in zip(seg, full)],
                      eval_slices_per_s=[args.eval_batch / t for t in chunk_times])
    result["peak_rss_mb"] = _peak_rss_mb()
    result["import_rss_mb"] = import_rss_mb
    if device.type == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return result


# ----------------------------------------------------------------------------- driver side
def _spawn(args, worker: str) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--size", str(args.size),
            "--threads", str(args.threads), "--n", str(args.n), "--mode", args.mode, "--backbone", args.backbone,
            "--device", args.device, "--amp", args.amp, "--batch-size", str(args.batch_size),
            "--eval-batch", str(args.eval_batch)]
    if args.channels_last:
        argv.append("--channels-last")
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"benchmark worker {worker!r} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(REPO))
        print(json.dumps(run_worker(args)))
        return
    med = statistics.median
    timing = _spawn(args, "timing")
    print(f"step      : median {med(timing['step_s']):.3f} s  ({', '.join(f'{t:.2f}' for t in timing['step_s'])})",
          flush=True)
    print(f"backbone  : median {med(timing['backbone_step_s']):.3f} s  "
          f"({', '.join(f'{t:.2f}' for t in timing['backbone_step_s'])}); per-round ratios "
          f"{', '.join(f'{r:.3f}' for r in timing['ratios'])}", flush=True)
    step = _spawn(args, "step")
    bb = _spawn(args, "backbone")
    print(f"peak RSS  : step {step['peak_rss_mb']:.0f} MB, backbone {bb['peak_rss_mb']:.0f} MB "
          f"(torch import alone {step['import_rss_mb']:.0f} MB)", flush=True)
    ev = _spawn(args, "eval")
    print(f"eval      : full forward {med(ev['full_forward_s']):.3f} s, encode_support "
          f"{med(ev['encode_support_s']):.3f} s, per query slice {med(ev['eval_slice_s']):.3f} s, "
          f"{med(ev['eval_slices_per_s']):.2f} slices/s in chunks of {args.eval_batch}  "
          f"peak RSS {ev['peak_rss_mb']:.0f} MB", flush=True)
    import torch
    summary = {
        "size": args.size, "threads": args.threads, "n": args.n, "mode": args.mode, "backbone": args.backbone,
        "device": args.device, "amp": args.amp, "channels_last": args.channels_last,
        "batch_size": args.batch_size, "torch": torch.__version__, "machine": platform.machine(),
        "step_s_median": med(timing["step_s"]), "step_s_all": timing["step_s"],
        "backbone_step_s_median": med(timing["backbone_step_s"]), "backbone_step_s_all": timing["backbone_step_s"],
        "step_over_backbone": med(timing["ratios"]),
        "episodes_per_s": args.batch_size / med(timing["step_s"]),
        "loss_finite": timing["loss_finite"],
        "peak_rss_mb": step["peak_rss_mb"], "backbone_peak_rss_mb": bb["peak_rss_mb"],
        "import_torch_rss_mb": step["import_rss_mb"],
        "full_forward_s": med(ev["full_forward_s"]), "encode_support_s": med(ev["encode_support_s"]),
        "eval_slice_s": med(ev["eval_slice_s"]), "eval_slice_over_full": med(ev["ratios"]),
        "eval_slices_per_s": med(ev["eval_slices_per_s"]), "eval_batch": args.eval_batch,
        "eval_peak_rss_mb": ev["peak_rss_mb"],
    }
    for key in ("cuda_max_allocated_mb",):
        if key in step:
            summary["step_" + key] = step[key]
            summary["backbone_" + key] = bb[key]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
