"""Stable end-of-training weights and the pieces around them: the weight average (EMA) with batch-norm
buffers, the learning-rate schedules, the class-normalised focal loss, the straight-through selection
(``learned_st``), which weights evaluation reads, and the config checks of their keys."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from config import ConfigError, build_config, resolve_config
from models.dmap import selection_weights
from models.losses import focal_loss
from trainer.loop import LoopSettings, _optimisation_step
from trainer.state import EMA_KEY, OptimSettings, build_training_state, resume_training_state, save_training_state
from util.checkpoints import select_weights
from util.distributed import DistributedContext
from util.lr_schedule import build_lr_schedule

MODEL = {"backbone": "resnet18", "weights_path": "", "dmap_mode": "learned", "temperature": 0.05,
         "fixed_threshold": 0.9, "alpha": 10.0, "bn_with_support": False}
CPU = DistributedContext(device=torch.device("cpu"), rank=0, world_size=1, local_rank=0)


def _lrs(optim: OptimSettings, steps: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=optim.lr)
    schedule = build_lr_schedule(opt, optim)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return out


def test_cosine_schedule_values_at_chosen_steps():
    optim = OptimSettings(lr=1.0, momentum=0.0, weight_decay=0.0, lr_step_size=1, lr_gamma=1.0,
                          lr_schedule="cosine", n_steps=100, lr_final_factor=0.01)
    lrs = _lrs(optim, 101)
    # lr(t) = 0.01 + 0.99 (1 + cos(pi t / 100)) / 2
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[50] == pytest.approx(0.01 + 0.99 * 0.5)
    assert lrs[25] == pytest.approx(0.01 + 0.99 * (1 + math.cos(math.pi / 4)) / 2)
    assert lrs[100] == pytest.approx(0.01)


def test_warm_up_then_cosine_and_the_step_schedule():
    optim = OptimSettings(lr=1.0, momentum=0.0, weight_decay=0.0, lr_step_size=1, lr_gamma=1.0,
                          lr_schedule="cosine", n_steps=14, lr_final_factor=0.0, lr_warmup_steps=4)
    lrs = _lrs(optim, 15)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # (t + 1) / 4
    assert lrs[4] == pytest.approx(1.0)  # the cosine starts at its top after the warm-up
    assert lrs[9] == pytest.approx(0.5)  # half-way through its 10 steps
    assert lrs[14] == pytest.approx(0.0, abs=1e-12)
    step = OptimSettings(lr=1.0, momentum=0.0, weight_decay=0.0, lr_step_size=3, lr_gamma=0.5)
    assert _lrs(step, 7) == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25])


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(1, 1, 32, 32)
    masks[..., 8:20, 10:24] = 1
    return {"support_images": torch.rand(1, 1, 3, 32, 32, generator=g), "support_masks": masks,
            "query_images": torch.rand(1, 1, 3, 32, 32, generator=g), "query_masks": masks.clone()}


def _ema_state(decay: float, warmup: bool = False):
    optim = OptimSettings(lr=0.05, momentum=0.0, weight_decay=0.0, lr_step_size=100, lr_gamma=1.0,
                          ema_decay=decay, ema_warmup=warmup)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = build_training_state(MODEL, optim, "off", torch.device("cpu"), seed=0, record={"config": {}})
    state.model.train()
    return state


def test_the_average_is_the_hand_computed_ema_of_weights_and_batch_norm_buffers():
    state = _ema_state(decay=0.75)
    settings = LoopSettings(n_steps=3, log_every=1, save_snapshot_every=10, eval_step=None, keep_snapshots=1)
    raw = []
    for step in range(3):
        _, aux = _optimisation_step(state, state.model, _batch(step), torch.device("cpu"), settings)
        sd = state.model.state_dict()
        raw.append({k: sd[k].clone() for k in ("encoder.reduce.weight", "encoder.backbone.bn1.running_mean")
                    if k in sd})
    assert "encoder.backbone.bn1.running_mean" in raw[0]
    assert {"pred_fg_fraction", "true_fg_fraction"} <= set(aux)
    averaged = state.averaged.module.state_dict()
    for key in raw[0]:
        # the first update copies, then avg <- 0.75 avg + 0.25 new
        expected = 0.75 * (0.75 * raw[0][key] + 0.25 * raw[1][key]) + 0.25 * raw[2][key]
        torch.testing.assert_close(averaged[key], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(averaged[key], raw[2][key])  # not just the last weights
    assert int(state.averaged.n_averaged) == 3


def test_the_warm_up_ramps_the_decay_from_the_first_updates():
    state = _ema_state(decay=0.75, warmup=True)
    settings = LoopSettings(n_steps=3, log_every=1, save_snapshot_every=10, eval_step=None, keep_snapshots=1)
    raw = []
    for step in range(3):
        _optimisation_step(state, state.model, _batch(step), torch.device("cpu"), settings)
        raw.append(state.model.state_dict()["encoder.reduce.weight"].clone())
    # update 1 copies; update 2 (n = 1): d = min(0.75, 2 / 11); update 3 (n = 2): d = min(0.75, 3 / 12)
    d1, d2 = 2 / 11, 3 / 12
    expected = d2 * (d1 * raw[0] + (1 - d1) * raw[1]) + (1 - d2) * raw[2]
    torch.testing.assert_close(state.averaged.module.state_dict()["encoder.reduce.weight"], expected,
                               rtol=1e-5, atol=1e-6)


def test_checkpoint_keeps_raw_and_averaged_weights_and_resume_restores_the_average(tmp_path):
    state = _ema_state(decay=0.5)
    settings = LoopSettings(n_steps=2, log_every=1, save_snapshot_every=10, eval_step=None, keep_snapshots=1)
    for step in range(2):
        _optimisation_step(state, state.model, _batch(step), torch.device("cpu"), settings)
    path = tmp_path / "step_0000002.pth"
    save_training_state(state, path, CPU)
    saved = torch.load(path, weights_only=False)
    assert set(saved[EMA_KEY]) == set(saved["model"]) and saved["ema_n_averaged"] == 2
    fresh = _ema_state(decay=0.5)
    resume_training_state(fresh, tmp_path, torch.device("cpu"))
    for key, value in state.averaged.module.state_dict().items():
        torch.testing.assert_close(fresh.averaged.module.state_dict()[key], value)
    assert int(fresh.averaged.n_averaged) == 2 and fresh.step == 2
    # which weights evaluation reads
    weights, which = select_weights(saved, "auto", path)
    assert which == "averaged" and weights["model"] is saved[EMA_KEY]
    weights, which = select_weights(saved, "raw", path)
    assert which == "raw" and weights["model"] is saved["model"]
    plain = {"model": saved["model"]}
    assert select_weights(plain, "auto", path)[1] == "raw"
    with pytest.raises(ValueError, match="eval_weights.*holds no averaged weights"):
        select_weights(plain, "averaged", path)
    # a run without averaging cannot resume into one that keeps it: the average would start mid-run
    with pytest.raises(ValueError, match="no averaged weights but ema_decay > 0"):
        torch.save(plain | {k: saved[k] for k in ("optimizer", "scheduler", "scaler", "step", "rng")},
                   tmp_path / "final.pth")
        resume_training_state(_ema_state(decay=0.5), tmp_path, torch.device("cpu"))


def test_class_normalised_focal_loss_by_hand():
    p_fg = torch.tensor([0.9, 0.2, 0.5, 0.5]).reshape(1, 2, 2)
    probs = torch.stack([1 - p_fg, p_fg], dim=1)
    target = torch.tensor([1, 0, 0, 0]).reshape(1, 2, 2)

    def term(p):  # -(1 - p)^0.7 log p
        return -((1 - p) ** 0.7) * math.log(p)
    fg, bg = term(0.9), [term(0.8), term(0.5), term(0.5)]
    by_pixels = (1.0 * fg + 0.5 * sum(bg)) / (1.0 + 0.5 * 3)
    by_classes = (1.0 * fg + 0.5 * sum(bg) / 3) / (1.0 + 0.5)
    assert focal_loss(probs, target, class_weights=(0.5, 1.0)).item() == pytest.approx(by_pixels, rel=1e-5)
    assert focal_loss(probs, target, class_weights=(0.5, 1.0), normalize="classes").item() == \
        pytest.approx(by_classes, rel=1e-5)
    # an absent class adds nothing and its weight leaves the normaliser
    only_bg = torch.zeros_like(target)
    assert focal_loss(probs, only_bg, class_weights=(0.5, 1.0), normalize="classes").item() == \
        pytest.approx((term(0.1) + sum(bg)) / 4, rel=1e-5)


def test_a_small_foreground_keeps_its_pull_only_with_class_normalisation():
    """A model that predicts background everywhere (p_fg = sigmoid(-5)): how hard the loss pulls it back.

    Normalised by pixels, the pull is proportional to the foreground's share of the image, so a 0.25 %
    foreground barely moves a model that predicts nothing (the collapse seen with small structures);
    normalised by classes it does not depend on that share.
    """
    def pull(normalize: str, fg_pixels: int) -> float:
        logit = torch.full((1, 1, 40, 40), -5.0, requires_grad=True)
        p_fg = torch.sigmoid(logit)[:, 0]
        probs = torch.stack([1 - p_fg, p_fg], dim=1)
        target = torch.zeros(1, 40, 40, dtype=torch.long)
        target.view(-1)[:fg_pixels] = 1
        focal_loss(probs, target, class_weights=(0.5, 1.0), normalize=normalize).backward()
        return -logit.grad.sum().item()  # d loss / d (a shared logit offset), sign: towards foreground

    small, large = 4, 400  # 0.25 % and 25 % of 1600 pixels
    assert pull("pixels", small) < 0.02 * pull("pixels", large)
    assert pull("classes", small) == pytest.approx(pull("classes", large), rel=1e-3)
    assert pull("classes", small) > 50 * pull("pixels", small)


def test_below_the_clamp_the_foreground_gets_no_gradient_at_all():
    """Why a collapsed run stays collapsed: once p_fg < eps (1e-7) the clamp of the log's argument cuts the
    gradient of the foreground pixels to exactly zero, whatever the normalisation."""
    logit = torch.full((1, 1, 4, 4), -20.0, requires_grad=True)   # sigmoid(-20) = 2e-9
    p_fg = torch.sigmoid(logit)[:, 0]
    target = torch.ones(1, 4, 4, dtype=torch.long)
    focal_loss(torch.stack([1 - p_fg, p_fg], dim=1), target, normalize="classes").backward()
    assert logit.grad.abs().max().item() == 0.0


def test_straight_through_selection_is_hard_forward_and_soft_backward():
    cosine = torch.tensor([[[[0.95, 0.85], [0.70, 0.20]]]])        # [B=1, S=1, 2, 2]
    fg = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    xi = torch.tensor([[0.8]], requires_grad=True)                   # [B, K=1]
    weights, kept = selection_weights(cosine, fg, xi, soft=True, temperature=0.05, straight_through=True)
    assert weights.detach().flatten().tolist() == [1.0, 1.0, 0.0, 0.0]  # the hard rule s >= xi on the mask
    assert kept.item() == pytest.approx(2 / 3)
    (weights * torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(weights.shape)).sum().backward()
    # d/dxi sigmoid((s - xi) / T) = -sig (1 - sig) / T, summed with the pixel factors over the mask
    sig = torch.sigmoid((cosine - 0.8) / 0.05).flatten()[:3]
    expected = -(sig * (1 - sig) / 0.05 * torch.tensor([1.0, 2.0, 3.0])).sum()
    assert xi.grad.item() == pytest.approx(expected.item(), rel=1e-5) and xi.grad.item() != 0.0
    soft, _ = selection_weights(cosine, fg, xi.detach(), soft=True, temperature=0.05)
    assert 0.0 < soft.flatten()[2].item() < 1.0  # the soft rule alone would keep a fraction of pixel 3


def test_learned_st_model_trains_its_threshold_head():
    from models.fewshot import FewShotSeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = FewShotSeg(backbone="resnet18", dmap_mode="learned_st", bn_with_support=False).train()
    assert all(p.requires_grad for p in model.ltg.parameters())
    batch = _batch(0)
    probs, aux = model(batch["support_images"], batch["support_masks"], batch["query_images"])
    probs[..., 1, :, :].mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.ltg.parameters())
    kept = float(aux["kept_fraction"])
    n_fg = batch["support_masks"].sum().item()
    assert kept * n_fg == pytest.approx(round(kept * n_fg), abs=1e-4)  # a whole number of kept pixels


@pytest.mark.parametrize("updates, key", [
    ({"lr_schedule": "linear"}, "lr_schedule"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"ema_decay": -0.1}, "ema_decay"),
    ({"lr_final_factor": 2.0}, "lr_final_factor"),
    ({"lr_schedule": "cosine", "n_steps": 10, "lr_warmup_steps": 10}, "lr_warmup_steps"),
    ({"optim": {"grad_clip": -1.0}}, "optim.grad_clip"),
    ({"ema_warmup": 1}, "ema_warmup"),
    ({"loss": {"normalize": "pixel"}}, "loss.normalize"),
    ({"eval_weights": "ema"}, "eval_weights"),
    ({"model": {"dmap_mode": "learnt"}}, "model.dmap_mode"),
])
def test_new_keys_are_checked_with_one_line(updates, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        resolve_config(build_config(updates=updates), need_data=False)


def test_the_paper_schedule_stays_the_default():
    paper = resolve_config(build_config(), need_data=False)
    assert paper["lr_schedule"] == "step" and paper["ema_decay"] == 0 and paper["loss"]["normalize"] == "pixels"
    assert paper["support_spill_px"] == 0 and paper["optim"]["grad_clip"] == 0
