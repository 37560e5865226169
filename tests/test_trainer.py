"""The training library without Sacred: episode numbering per rank, snapshot pruning, save and resume."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from trainer.episode_sampler import EpisodeIndexSampler
from trainer.loop import prune_snapshots
from trainer.state import OptimSettings, build_training_state, resume_training_state, save_training_state
from util.distributed import DistributedContext

MODEL = {"backbone": "resnet18", "weights_path": "", "dmap_mode": "learned", "temperature": 0.05,
         "fixed_threshold": 0.9, "alpha": 10.0}
OPTIM = OptimSettings(lr=0.1, momentum=0.9, weight_decay=5e-4, lr_step_size=2, lr_gamma=0.5)


def test_each_rank_draws_its_own_slice_of_each_step():
    # 2 ranks x batch 2 = 4 episodes per step; rank 1 takes the 3rd and 4th of each step, from step 1 on
    sampler = EpisodeIndexSampler(start_step=1, n_steps=3, batch_size=2, rank=1, world_size=2)
    assert list(sampler) == [6, 7, 10, 11] and len(sampler) == 4
    rank0 = EpisodeIndexSampler(1, 3, 2, 0, 2)
    assert list(rank0) == [4, 5, 8, 9]
    # one process with batch 4 follows the same stream as the two ranks together
    assert sorted(list(rank0) + list(sampler)) == list(EpisodeIndexSampler(1, 3, 4, 0, 1))
    assert list(EpisodeIndexSampler(3, 3, 2, 0, 1)) == [] and len(EpisodeIndexSampler(5, 3, 2, 0, 1)) == 0


def test_pruning_keeps_the_newest_and_the_evaluated_snapshot(tmp_path):
    for step in range(1, 6):
        (tmp_path / f"step_{step:07d}.pth").write_bytes(b"")
    (tmp_path / "final.pth").write_bytes(b"")
    prune_snapshots(tmp_path, keep=2, eval_step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pth", "step_0000002.pth", "step_0000004.pth",
                                                         "step_0000005.pth"]


def _state(seed: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_training_state(MODEL, OPTIM, "off", torch.device("cpu"), seed, record={"config": {"n": 1}})


def _one_step(state) -> None:
    state.optimizer.zero_grad()
    sum(p.float().pow(2).mean() for p in state.model.parameters() if p.requires_grad).backward()
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1


def test_saved_state_resumes_with_weights_optimiser_schedule_and_step(tmp_path):
    ctx = DistributedContext(device=torch.device("cpu"), rank=0, world_size=1, local_rank=0)
    state = _state(seed=0)
    assert state.scaler.is_enabled() is False  # fp32: no loss scaling
    for _ in range(3):
        _one_step(state)
    save_training_state(state, tmp_path / "step_0000003.pth", ctx)
    assert torch.load(tmp_path / "step_0000003.pth", weights_only=False)["config"] == {"n": 1}

    other = _state(seed=1)  # different initial weights
    assert resume_training_state(other, tmp_path, torch.device("cpu")) == tmp_path / "step_0000003.pth"
    assert other.step == 3
    assert other.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5)  # one decay after step 2
    for name, value in state.model.state_dict().items():
        assert torch.equal(value, other.model.state_dict()[name]), name
    _one_step(state), _one_step(other)  # momentum buffers came back too: the next step is the same
    for name, value in state.model.state_dict().items():
        assert torch.equal(value, other.model.state_dict()[name]), name


def test_resume_from_an_empty_folder_says_so(tmp_path):
    assert resume_training_state(_state(seed=0), Path(tmp_path), torch.device("cpu")) is None
