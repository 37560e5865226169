"""One run folder per recipe, and the checkpoint's training config as the source of the evaluated model.

Pure config functions here (no data, no training): folder names, the training-relevant keys, the
comparison of two configs, and which model settings an evaluation takes from a checkpoint.
"""
from __future__ import annotations

import pytest

from config import (NON_TRAINING_KEYS, ConfigError, build_config, evaluation_model_config, experiment_name,
                    recipe_differences, resolve_config, training_differences, training_view)


def name(*named, **updates) -> str:
    return experiment_name(build_config(named, updates))


def test_the_default_recipe_keeps_the_plain_name_and_cpu_gets_its_own_folder():
    plain = name(dataset="CHAOST2")
    assert plain == "CHAOST2_setting1_fold0_learned"
    cpu = name("cpu", dataset="CHAOST2")
    assert cpu.startswith("CHAOST2_setting1_fold0_learned_cpu-") and cpu != plain
    # a changed training key gives another folder, and the named config no longer describes the recipe
    shorter = name("cpu", dataset="CHAOST2", n_steps=600)
    assert shorter not in (plain, cpu) and "_cpu-" not in shorter
    # the suffix is the same on every fold, so the folds of one recipe group together
    assert name("cpu", eval_fold=3).replace("fold3", "fold0") == cpu


@pytest.mark.parametrize("updates", [
    {"optim": {"lr": 0.5}}, {"seed": 1}, {"model": {"alpha": 20.0}}, {"model": {"backbone": "resnet18"}},
    {"loss": {"gamma": 2.0}}, {"image_size": 128}, {"exclude_mode": "all"}, {"volumes": [1, 2, 3, 5, 8]},
    {"use_gt": True}, {"n_sv": 3000},
])
def test_each_training_key_changes_the_folder(updates):
    assert name(**updates) != name()


@pytest.mark.parametrize("updates", [
    {"supp_idx": 0}, {"rotate_support": True}, {"n_part": 5}, {"eval_batch": 8}, {"amp": "off"}, {"device": "cpu"},
    {"num_workers": 0}, {"resume": True}, {"save_snapshot_every": 7}, {"data_root": "elsewhere"}, {"eval_step": 0},
    {"eval_override": {"model": {"fixed_threshold": 0.5}}}, {"test_label": [1, 4]}, {"tensorboard": False},
])
def test_evaluation_and_runtime_keys_keep_the_folder(updates):
    assert name(**updates) == name()


def test_the_non_training_list_is_explicit_and_every_other_key_counts():
    cfg = build_config()
    assert set(NON_TRAINING_KEYS) - set(cfg) <= {"run_dir", "snapshot_dir"}  # keys resolve_config adds
    # keys the defaults do not know yet (a new option, a new model key) are training-relevant at once
    for extra in ({"ema_decay": 0.999}, {"model": dict(cfg["model"], future_key=1)}):
        assert experiment_name(dict(cfg, **extra)) != experiment_name(cfg)
        assert recipe_differences(dict(cfg, **extra))


def test_a_method_names_its_folder_and_dmap_folders_keep_their_names():
    assert name(model={"method": "dmap"}) == name() == "CHAOST2_setting1_fold0_learned"
    assert name("cpu", model={"method": "dmap", "dmap_mode": "off"}) == name("cpu", model={"dmap_mode": "off"})
    for method in ("adnet", "qnet", "alpnet"):
        assert name(model={"method": method}) == f"CHAOST2_setting1_fold0_{method}"
        assert name("cpu", model={"method": method}).startswith(f"CHAOST2_setting1_fold0_{method}_cpu-")
    # the cpu recipe's own keys give one digest whatever the method (the word before it tells them apart)
    assert name("cpu", model={"method": "adnet"}).split("_")[-1] == name("cpu").split("_")[-1]
    # another method's dmap_mode is part of its recipe, so two modes never share a folder
    assert name(model={"method": "adnet", "dmap_mode": "off"}).startswith("CHAOST2_setting1_fold0_adnet_")
    assert name(model={"method": "adnet", "dmap_mode": "off"}) != name(model={"method": "adnet"})
    assert name(model={"method": "adnet", "pooling": "dmap"}) != name(model={"method": "adnet"})


def test_resolved_and_unresolved_configs_share_the_name(tmp_path):
    raw = build_config(["cpu"], {"dataset": "chaost2", "test_label": [1, 2, 3, 4], "path": {"log_dir": str(tmp_path)}})
    resolved = resolve_config(raw, need_data=False)
    assert experiment_name(raw) == experiment_name(resolved) == experiment_name(build_config(["cpu"]))
    assert resolved["run_dir"].endswith(experiment_name(raw))
    # setting 2 leaves the test organs out: another recipe than setting 1, and named by its setting
    assert name("setting2") == "CHAOST2_setting2_fold0_learned"
    assert name("setting2", test_label=[1]) != name("setting2")  # excludes other slices


def test_named_configs_only_match_their_own_mode_and_data_set():
    assert "_public_code-" in name("public_code")  # sets dmap_mode fixed: the folder says so
    assert name("public_code").startswith("CHAOST2_setting1_fold0_fixed_")
    assert "_public_code-" not in name(exclude_mode="all")  # learned mode: not the public code's recipe
    assert name("demo").startswith("SYNTH_setting1_fold0_learned_demo-")
    assert name(tag="probe").endswith("_probe") and name("cpu", tag="probe").endswith("_probe")


def test_weights_are_compared_by_file_name():
    here = build_config((), {"model": {"weights_path": "weights/r101.pth"}})
    there = build_config((), {"model": {"weights_path": "/elsewhere/weights/r101.pth"}})
    other = build_config((), {"model": {"weights_path": "weights/r50.pth"}})
    assert experiment_name(here) == experiment_name(there) != experiment_name(other)
    assert training_view(here)["model.weights_path"] == "r101.pth"


def test_training_differences_name_each_key_and_fill_absent_keys_with_defaults():
    a = build_config(["cpu"])
    b = build_config(["cpu"], {"optim": {"lr": 0.1}, "model": {"alpha": 5}, "supp_idx": 0, "eval_fold": 2})
    assert training_differences(a, b, ignore=("eval_fold",)) == [("model.alpha", 10.0, 5), ("optim.lr", 0.01, 0.1)]
    assert ("eval_fold", 0, 2) in training_differences(a, b)
    older = build_config()
    del older["sampler"]  # a config stored before the key existed counts as the default
    assert training_differences(older, build_config()) == []
    assert training_differences(older, build_config((), {"sampler": "valid_windows"})) == [
        ("sampler", "public", "valid_windows")]
    assert training_differences(build_config((), {"lr_gamma": 1}), build_config((), {"lr_gamma": 1.0})) == []


def stored(**updates) -> dict:
    """A training config as a checkpoint stores it (resolved)."""
    return resolve_config(build_config(["smoke"], updates), need_data=False)


def evaluation(**updates) -> dict:
    return resolve_config(build_config([], updates), need_data=False)


def test_a_plain_command_line_evaluates_the_checkpoint_as_trained():
    trained = stored(model={"dmap_mode": "fixed", "fixed_threshold": 0.7}, image_size=48)
    model, size = evaluation_model_config(evaluation(), trained, "ckpt.pth")
    assert model == trained["model"] and size == 48
    assert model["dmap_mode"] == "fixed" and model["backbone"] == "resnet18"


@pytest.mark.parametrize("updates, key", [
    ({"model": {"dmap_mode": "off"}}, "model.dmap_mode"),
    ({"model": {"fixed_threshold": 0.5}}, "model.fixed_threshold"),
    ({"image_size": 96}, "image_size"),
    ({"model": {"backbone": "resnet50"}}, "model.backbone"),
])
def test_a_command_line_model_key_that_differs_is_refused_with_both_values(updates, key):
    trained = stored(model={"dmap_mode": "fixed", "fixed_threshold": 0.7}, image_size=48)
    with pytest.raises(ConfigError) as info:
        evaluation_model_config(evaluation(**updates), trained, "ckpt.pth")
    message = str(info.value)
    assert "\n" not in message and message.startswith("ckpt.pth") and f"{key}: " in message
    value = updates.get("image_size") or next(iter(updates["model"].values()))
    assert repr(value) in message and "(checkpoint)" in message and "(command line)" in message


def test_the_same_values_on_the_command_line_are_accepted():
    trained = stored(model={"dmap_mode": "fixed"}, image_size=48)
    model, size = evaluation_model_config(evaluation(model={"dmap_mode": "fixed", "backbone": "resnet18"},
                                                     image_size=48), trained, "ckpt.pth")
    assert model["dmap_mode"] == "fixed" and size == 48


def test_every_model_key_is_compared_including_new_ones():
    trained = stored()
    trained["model"]["method"] = "adnet"  # a model key this version's defaults do not have
    cfg = evaluation()
    assert evaluation_model_config(cfg, trained, "ckpt.pth")[0]["method"] == "adnet"
    cfg["model"]["method"] = "qnet"
    with pytest.raises(ConfigError, match=r"model.method: 'adnet' \(checkpoint\) vs 'qnet' \(command line\)"):
        evaluation_model_config(cfg, trained, "ckpt.pth")


def test_eval_override_changes_the_model_on_purpose():
    trained = stored(model={"dmap_mode": "fixed", "fixed_threshold": 0.9}, image_size=48)
    cfg = evaluation(eval_override={"model": {"fixed_threshold": 0.6}, "image_size": 64})
    model, size = evaluation_model_config(cfg, trained, "ckpt.pth")
    assert model["fixed_threshold"] == 0.6 and size == 64 and trained["model"]["fixed_threshold"] == 0.9
    for bad, key in (({"model": {"colour": 1}}, "eval_override.model.colour"),
                     ({"n_steps": 3}, "eval_override.n_steps"), ({"image_size": 8}, "eval_override.image_size")):
        with pytest.raises(ConfigError, match=key):
            evaluation_model_config(evaluation(eval_override=bad), trained, "ckpt.pth")
    with pytest.raises(ConfigError, match="'eval_override'"):
        evaluation(eval_override=3)
