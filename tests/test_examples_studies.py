"""The study scripts run end to end in their quick modes (a file of their
own so that pytest-xdist's `--dist loadfile` runs them beside
test_examples.py's: they are the longest tests)."""

import pytest

from test_examples import _is_png
from test_examples import _run_example


@pytest.mark.slow
def test_recipe_study_quick_mode_writes_the_frontier(tmp_path):
    _run_example("recipe_study.py", f"--output_dir={tmp_path}",
                 "--recipes=keep_best + BN,taylor + BN,L1-norm + BN",
                 "--finetune_budgets=0.11")
    tag = "vgg16_w0.5_quick"
    text = (tmp_path / f"{tag}_recipes.md").read_text()
    for recipe in ("keep_best + BN", "taylor + BN", "L1-norm + BN"):
        assert f"| {recipe} | 0.15 |" in text
    assert "## Lossless points" in text
    assert "| keep_best + BN + 1 epoch fine-tune | 0.11 |" in text
    assert _is_png(tmp_path / f"{tag}_recipes.png")


@pytest.mark.slow
def test_distill_study_quick_mode_writes_the_grid(tmp_path):
    _run_example("distill_study.py", f"--output_dir={tmp_path}",
                 "--rankings=cdrp,random", "--budgets=0.33")
    text = (tmp_path / "vgg16_w0.125_quick_distill.md").read_text()
    for config in ("cdrp, hard", "cdrp, distill", "random, hard",
                   "random, distill", "scratch (same channels), hard"):
        assert f"| {config} | 0.33 | 1 | 2 |" in text
    assert _is_png(tmp_path / "vgg16_w0.125_quick_distill.png")
    rows = (tmp_path / "vgg16_w0.125_quick_distill_pairs.csv").read_text()
    assert len(rows.splitlines()) == 1 + 5 * 2  # 5 configs x 2 pairs
    # (--search_max_drop is kd.smallest_subtask per pair: test_budget_search
    # covers it; a second subprocess here would cost a minute of CI.)


@pytest.mark.slow
def test_repair_study_quick_mode_resumes_where_it_stopped(tmp_path):
    # A run that stopped after one row: the rerun computes the other three.
    csv_path = tmp_path / "vgg16_w0.125_quick_repair_pairs.csv"
    csv_path.write_text(
        "pair,ranking,allocation,recovery,params,compact_params,full,"
        "accuracy,drop,seconds\n"
        "cat-dog,cdrp,uniform:0.5,bn,0.25,0.25,0.5,0.5,0.0,1.0\n")
    out = _run_example("repair_study.py", f"--output_dir={tmp_path}",
                       "--allocations=uniform:0.5", "--recoveries=bn,repair")
    computed = [line.split()[:4] for line in out.splitlines()
                if " pp [" in line]
    assert computed == [
        ["cat-dog", "cdrp", "uniform:0.5", "repair"],
        ["bird-cat", "cdrp", "uniform:0.5", "bn"],
        ["bird-cat", "cdrp", "uniform:0.5", "repair"],
    ], out
    assert len(csv_path.read_text().splitlines()) == 1 + 4
    text = (tmp_path / "vgg16_w0.125_quick_repair.md").read_text()
    for config in ("cdrp / uniform:0.5 / bn", "cdrp / uniform:0.5 / repair"):
        assert f"| {config} | 2 |" in text
    assert _is_png(tmp_path / "vgg16_w0.125_quick_repair.png")


@pytest.mark.slow
def test_detect_study_quick_mode_writes_the_table_and_plot(tmp_path):
    _run_example("detect_study.py", f"--output_dir={tmp_path}",
                 "--methods=activation")
    text = (tmp_path / "vgg16_w0.125_quick_detect.md").read_text()
    for score in ("msp", "energy", "path: activation"):
        assert f"| {score} | mnist | 40 |" in text, text
    assert _is_png(tmp_path / "vgg16_w0.125_quick_detect.png")
    # The attacks and scores are cached: a rerun resumes from them.
    assert (tmp_path / "vgg16_w0.125_quick_detect_cache" /
            "activation_cosine_overlap_norm.npz").exists()


def test_fgsm_and_pgd_stay_in_the_ball_and_raise_the_loss():
    import keras
    import numpy as np

    from examples import cifar_models

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 3)),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (16, 4, 4, 3)).astype("float32")  # [0, 1] in
    y = np.asarray(model(x)).argmax(-1)  # attack the model's own answers

    def loss(images):
        return float(np.mean(keras.losses.sparse_categorical_crossentropy(
            y, model(images), from_logits=True)))

    for kind in ("fgsm", "pgd"):
        adv = cifar_models.adversarial(model, x, y, kind, 8, 1.0)
        assert np.abs(adv - x).max() <= 8 / 255 + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        assert loss(adv) > loss(x)
    fgsm = cifar_models.adversarial(model, x, y, "fgsm", 8, 1.0)
    inside = (x > 8 / 255) & (x < 1 - 8 / 255)  # not clipped: moved by eps
    np.testing.assert_allclose(np.abs(fgsm - x)[inside], 8 / 255, atol=1e-6)
    # C&W: every image either fools the model or is returned unchanged.
    cw = cifar_models.adversarial(model, x, y, "cw", 0, 1.0)
    assert cw.min() >= 0 and cw.max() <= 1
    fooled = np.asarray(model(cw)).argmax(-1) != y
    assert fooled.mean() > 0.5
    np.testing.assert_array_equal(cw[~fooled], x[~fooled])
