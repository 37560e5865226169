"""Batched episodes, two-process gloo training and CPU autocast (the scale-out semantics)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import training
from conftest import smoke_updates
from config import build_config, resolve_config
from models.fewshot import FewShotSeg
from models.losses import episode_loss
from trainer.loop import set_train_mode
from util.checkpoints import load_checkpoint


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _episodes(batch: int, size: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    support = torch.randn(batch, 1, 3, size, size, generator=gen)
    query = torch.randn(batch, 1, 3, size, size, generator=gen)
    support_masks = torch.zeros(batch, 1, size, size)
    query_masks = torch.zeros(batch, 1, size, size, dtype=torch.long)
    for b in range(batch):
        support_masks[b, 0, 10 + 4 * b:40, 12:44] = 1
        query_masks[b, 0, 14:44 - 3 * b, 10:40] = 1
    return support, support_masks, query, query_masks


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_batch_of_two_episodes_equals_the_average_of_two_single_episodes():
    torch.manual_seed(0)
    model = FewShotSeg(backbone="resnet18", weights_path=None, dmap_mode="learned")
    set_train_mode(model, freeze_bn=True)  # batch statistics would couple the episodes
    support, support_masks, query, query_masks = _episodes(2)

    probs, _ = model(support, support_masks, query)
    assert probs.shape == (2, 1, 2, 64, 64)
    batched_loss = episode_loss(probs, query_masks)
    batched_loss.backward()
    batched = _grads(model)

    model.zero_grad()
    losses = []
    for b in range(2):
        single, _ = model(support[b], support_masks[b], query[b])
        losses.append(episode_loss(single[None], query_masks[b:b + 1]))
    separate_loss = torch.stack(losses).mean()
    separate_loss.backward()
    separate = _grads(model)

    torch.testing.assert_close(batched_loss, separate_loss, rtol=1e-5, atol=1e-6)
    assert batched.keys() == separate.keys() and len(batched) > 0
    for name in batched:
        torch.testing.assert_close(batched[name], separate[name], rtol=1e-4, atol=1e-6, msg=name)


def _ddp_worker(rank: int, world_size: int, port: int, cfg: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)

    def record(step: int, model: torch.nn.Module) -> None:
        if step == cfg["n_steps"]:
            torch.save(model.state_dict(), Path(out_dir) / f"rank{rank}.pt")

    training.train(cfg, step_callback=record)


@pytest.mark.parametrize("method", ["dmap", "adnet", "qnet", "alpnet"])
def test_two_gloo_processes_match_one_process_with_the_same_episodes_per_step(synth_root, tmp_path, method):
    # every method's losses (alignment, threshold loss) must average over episodes the way DDP averages
    # gradients over ranks, and every parameter DDP expects a gradient for must get one
    common = {"n_steps": 2, "save_snapshot_every": 100,
              "model": {"freeze_bn": True, "backbone": "resnet18", "method": method}}
    ddp_cfg = resolve_config(build_config(["smoke"], smoke_updates(synth_root, tmp_path / "ddp", batch_size=1, **common)))
    mp.spawn(_ddp_worker, args=(2, _free_port(), ddp_cfg, str(tmp_path)), nprocs=2, join=True)

    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ at {key}"
    # only rank 0 writes: one final checkpoint, no step snapshots
    assert sorted(p.name for p in Path(ddp_cfg["snapshot_dir"]).iterdir()) == ["final.pth"]

    single_cfg = resolve_config(build_config(["smoke"], smoke_updates(synth_root, tmp_path / "single", batch_size=2, **common)))
    training.train(single_cfg)
    single = load_checkpoint(Path(single_cfg["snapshot_dir"]) / "final.pth")["model"]
    ddp = load_checkpoint(Path(ddp_cfg["snapshot_dir"]) / "final.pth")["model"]
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no native bf16")
@pytest.mark.parametrize("amp", ["bf16"])
def test_cpu_autocast_training_stays_finite(synth_root, tmp_path, amp):
    cfg = resolve_config(build_config(["smoke"], smoke_updates(synth_root, tmp_path, amp=amp, n_steps=2,
                                                                channels_last=True)))
    final = training.train(cfg)  # raises FloatingPointError on a non-finite loss
    weights = load_checkpoint(final)["model"]
    assert all(torch.isfinite(v.float()).all() for v in weights.values() if v.is_floating_point())
