"""Setting 2 through the path training uses: config -> resolve_config -> training.build_episodes."""
import numpy as np

import training
from config import build_config, resolve_config
from conftest import smoke_updates


def episode_slices(cfg, n=40):
    """(label volume, slice index) of every slice of the first ``n`` training episodes."""
    episodes = training.build_episodes(cfg)
    labels = {vol.case.case_id: vol.case.label for vol in episodes.indexes}
    for i in range(n):
        item = episodes[i]
        for z in item["slice_indices"].tolist():
            yield labels[int(item["case_id"])], z


def test_setting2_excludes_every_slice_with_a_test_organ(synth_root, tmp_path):
    def cfg(**updates):
        return resolve_config(build_config(["smoke"], smoke_updates(synth_root, tmp_path, n_steps=40, **updates)))

    setting1, setting2 = cfg(test_label=[1]), cfg(test_label=[1], setting=2)
    assert setting1["exclude_label"] == [] and setting2["exclude_label"] == [1]
    # Setting 1 does train on liver slices (so the check below can fail), Setting 2 never does
    assert any((label[z] == 1).any() for label, z in episode_slices(setting1))
    assert not any((label[z] == 1).any() for label, z in episode_slices(setting2))

    # exclude_mode="all" (peer code) only drops slices holding all test organs at once
    both = cfg(test_label=[1, 4], setting=2, exclude_mode="all")
    seen = [(bool((label[z] == 1).any()), bool((label[z] == 4).any())) for label, z in episode_slices(both)]
    assert (True, True) not in seen and any(a or b for a, b in seen)


def test_setting2_any_with_two_test_organs_drops_slices_holding_either(synth_root, tmp_path):
    """Two test organs on data where "any" and "all" differ: the configured "any" is what training draws."""
    def cfg(**updates):
        return resolve_config(build_config(["smoke"], smoke_updates(synth_root, tmp_path, n_steps=40, **updates)))

    def organs(config):
        return [(bool((label[z] == 1).any()), bool((label[z] == 4).any())) for label, z in episode_slices(config)]

    configured = cfg(test_label=[1, 4], setting=2)
    assert configured["exclude_mode"] == "any" and configured["exclude_label"] == [1, 4]
    # on these phantoms the two organs do not always share a slice: "all" keeps slices with one of them
    peer = organs(cfg(test_label=[1, 4], setting=2, exclude_mode="all"))
    assert any(a != b for a, b in peer)
    assert organs(configured) and not any(a or b for a, b in organs(configured))
