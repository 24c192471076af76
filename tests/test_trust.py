"""Numbers a user can trust: a selection split chooses, validation reports, with intervals and
paired tests; slimming is exact; the course's submission format."""
import fractions
import math
import shutil
import sys

import cv2
import numpy as np
import pytest
import torch

import common
from support import choose, files, images, reports, running, settings, stats
from support.resume import Resumable
from conftest import load_script

prune = load_script("03_prune.py")


def write(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


def labeled_root(root, per_class=10, classes=3):
    rng = np.random.default_rng(0)
    for split, count in (("training", per_class), ("validation", 4)):
        for c in range(classes):
            for n in range(count):
                write(root / split / f"{c}_{n}.jpg", rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    return root


# --- the selection split ---------------------------------------------------------------------

def test_the_selection_split_is_stratified_disjoint_and_deterministic(tmp_path):
    root = labeled_root(tmp_path / "food")
    data = common.load_data(root, 12, select_fraction=0.2)
    assert sorted(data.select.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert sorted(data.train.labels.tolist()) == [0] * 8 + [1] * 8 + [2] * 8
    assert not set(data.select.names) & set(data.train.names)
    for i, name in enumerate(data.select.names):  # images travel with their names
        j = common.load_data(root, 12).train.names.index(name)
        assert torch.equal(data.select.images[i], common.load_data(root, 12).train.images[j])
    again = common.load_data(root, 12, select_fraction=0.2)
    assert again.select.names == data.select.names
    assert data.selection == {"select_fraction": 0.2, "select_key": images.names_key(data.select.names)}
    write(root / "training" / "0_99.jpg", np.zeros((20, 24, 3), np.uint8))  # one more file in class 0
    grown = common.load_data(root, 12, select_fraction=0.2)
    assert [n for n in grown.select.names if not n.startswith("0_")] == \
        [n for n in data.select.names if not n.startswith("0_")]


def test_select_fraction_zero_chooses_on_validation_and_says_so(tmp_path):
    data = common.load_data(labeled_root(tmp_path / "food"), 12, select_fraction=0.0)
    assert data.select is data.val and len(data.train.labels) == 30
    assert data.chosen_on == "validation (optimistic)"


def test_a_class_with_one_image_keeps_it_for_training(tmp_path):
    root = labeled_root(tmp_path / "food", per_class=1)
    with pytest.raises(running.UserError, match="--select_fraction=0"):
        common.load_data(root, 12, select_fraction=0.1)


def test_validation_chooses_nothing(tmp_path, monkeypatch):
    """fit() never looks at validation, and keeps the same checkpoint whatever its labels say."""
    seen = []
    evaluate = common.evaluate
    monkeypatch.setattr(common, "evaluate", lambda m, images, *a: seen.append(images) or evaluate(m, images, *a))
    root = labeled_root(tmp_path / "food", per_class=6)
    saved = []
    for flip in (False, True):
        data = common.load_data(root, 16, select_fraction=0.34)
        if flip:
            data.val.labels = (data.val.labels + 1) % 3
        torch.manual_seed(0)
        path = tmp_path / f"m{flip}.pt"
        common.fit(common.StudentNet(num_classes=3), data, common.cross_entropy(), epochs=3, lr=3e-3, batch_size=6,
                   augment=common.Augment(16), norm="imagenet", device=torch.device("cpu"),
                   out=Resumable(path, {}))
        saved.append(torch.load(files.new_path(path), weights_only=True)["state_dict"])
        assert len(seen) == 3 and all(images is data.select.images for images in seen)
        seen.clear()
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


def selection_score(right, losses):
    return stats.Score(np.arange(len(losses)) < right, "k", losses)


def test_the_round_or_file_is_chosen_on_selection_not_validation(capsys):
    kd = selection_score(8, [1.0] * 10)
    rows = [{"params": 100, "val": 0.90, "select": selection_score(7, [1.0] * 10)},
            {"params": 50, "val": 0.50, "select": selection_score(8, [1.01] * 10)},
            {"params": 20, "val": 0.95, "select": selection_score(9, [1.5] * 10)}]
    by_loss = settings.Settings({"choose_by": "loss", "max_loss_rise": 0.02, "max_acc_drop": 0.01})
    assert choose.smallest_close(rows, lambda r: r["params"], kd, by_loss, "round")["params"] == 50
    assert choose.smallest_close(rows, lambda r: r["params"], kd, by_loss.but(max_loss_rise=0.6), "round")["params"] == 20
    by_acc = by_loss.but(choose_by="acc")
    assert choose.smallest_close(rows, lambda r: r["params"], kd, by_acc, "round")["params"] == 20
    assert choose.smallest_close(rows[:1], lambda r: r["params"], kd, by_acc, "round")["params"] == 100
    assert "no round passes the rule (selection accuracy at most 0.01 below" in capsys.readouterr().err
    broken = {"params": 10, "select": selection_score(9, [float("nan")] * 10)}
    assert choose.smallest_close([broken, rows[2]], lambda r: r["params"], kd, by_loss, "round")["params"] == 20
    with pytest.raises(running.UserError, match="every round scored NaN"):
        choose.smallest_close([broken, broken], lambda r: r["params"], kd, by_loss, "round")
    budget = (15, "params")  # none but the broken one fits: the smallest that scored
    assert choose.smallest_close([broken, rows[2]], lambda r: r["params"], kd, by_loss, "round", budget)["params"] == 20
    fewer_rows = [rows[0], {**rows[1], "select": selection_score(8, [1.03] * 10)}]
    assert choose.smallest_close(fewer_rows, lambda r: r["params"], kd, by_loss, "file")["params"] == 100
    assert "no file passes" not in capsys.readouterr().err


def test_the_chosen_row_says_what_chose_it():
    kd = selection_score(8, [1.0] * 10)
    rows = [{"bytes": b, "select": selection_score(8, [loss] * 10)} for b, loss in [(90_000, 1.0), (30_000, 1.5)]]
    rule = settings.Settings({"choose_by": "loss", "max_loss_rise": 0.02, "max_acc_drop": 0.01})

    def why(rule, budget=0):
        return choose.smallest_close(rows, lambda r: r["bytes"], kd, rule, "file", (budget, "bytes"))["chosen_by"]
    assert why(rule) == "the rule: the smallest file with selection loss at most 2% above student_kd's"
    assert why(rule, 40_000) == ("the best on selection (none passed the rule: selection loss at most 2% above "
                                 "student_kd's, of at most 40,000 bytes)")
    assert why(rule, 20_000) == "the smallest (none fits the budget of 20,000 bytes)"


def test_a_budget_keeps_the_rule_among_the_rows_that_fit(capsys):
    kd = selection_score(8, [1.0] * 10)
    rows = [{"bytes": b, "select": selection_score(8, [loss] * 10)}
            for b, loss in [(90_000, 1.00), (60_000, 1.01), (45_000, 1.05), (39_000, 1.02), (30_000, 1.04)]]
    rule = settings.Settings({"choose_by": "loss", "max_loss_rise": 0.02, "max_acc_drop": 0.01})

    def chosen(rule, budget):
        return choose.smallest_close(rows, lambda r: r["bytes"], kd, rule, "file", limit=(budget, "bytes"))["bytes"]
    assert chosen(rule, 0) == 39_000  # no budget: the smallest within 2%
    assert chosen(rule, 50_000) == 39_000
    assert chosen(rule, 39_000) == 39_000  # "at most": a file of exactly the budget fits
    assert chosen(rule.but(max_loss_rise=0.001), 50_000) == 39_000  # none within 0.1%: the best that fits
    assert chosen(rule, 35_000) == 30_000
    assert "no file passes the rule (selection loss at most 2% above student_kd's, of at most 35,000 bytes)" \
        in capsys.readouterr().err
    assert chosen(rule, 20_000) == 30_000  # none fits: the smallest
    assert "no file has at most 20,000 bytes; keeping the smallest (30,000 bytes)" in capsys.readouterr().err


@pytest.mark.parametrize("n", [100, 300, 750])
def test_a_file_exactly_max_acc_drop_below_student_kd_passes_and_one_image_more_fails(n):
    """Counted in images: in floats 0.07 - 0.01 is 0.06000000000000001, which refused 0.06."""
    def score(right):
        return stats.Score(np.arange(n) < right, "k", [1.0] * n)
    for drop in ("0.01", "0.02", "0.03", "0.05", "0.1"):
        rule = settings.Settings({"choose_by": "acc", "max_loss_rise": 0.02, "max_acc_drop": float(drop)})
        allowed = math.floor(fractions.Fraction(drop) * n)  # 7 of 750 for 0.01: 8 would be 0.0107
        for right in range(allowed + 1, n + 1):
            def chosen(small_right):
                rows = [{"bytes": 2, "select": score(right)}, {"bytes": 1, "select": score(small_right)}]
                return choose.smallest_close(rows, lambda r: r["bytes"], score(right), rule, "file")["bytes"]
            assert chosen(right - allowed) == 1, (drop, right)
            assert chosen(right - allowed - 1) == 2, (drop, right)


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_a_non_finite_student_kd_loss_is_an_error_not_a_choice(loss):
    kd = selection_score(8, [loss] * 10)
    rows = [{"bytes": 90, "select": selection_score(8, [1.0] * 10)},
            {"bytes": 10, "select": selection_score(2, [9.0] * 10)}]
    rule = settings.Settings({"choose_by": "loss", "max_loss_rise": 0.02, "max_acc_drop": 0.01})
    with pytest.raises(running.UserError, match="student_kd's selection loss is not finite .*--choose_by=acc"):
        choose.smallest_close(rows, lambda r: r["bytes"], kd, rule, "file")
    assert choose.smallest_close(rows, lambda r: r["bytes"], kd, rule.but(choose_by="acc"), "file")["bytes"] == 90


def test_when_only_files_that_scored_nan_fit_the_budget_the_warning_says_so(capsys):
    kd = selection_score(8, [1.0] * 10)
    rows = [{"bytes": 10_000, "select": selection_score(8, [math.nan] * 10)},
            {"bytes": 30_000, "select": selection_score(8, [1.0] * 10)}]
    rule = settings.Settings({"choose_by": "loss", "max_loss_rise": 0.02, "max_acc_drop": 0.01})
    chosen = choose.smallest_close(rows, lambda r: r["bytes"], kd, rule, "file", (20_000, "bytes"))
    assert chosen["bytes"] == 30_000
    assert chosen["chosen_by"] == "the smallest that scored a number (those of at most 20,000 bytes scored NaN)"
    assert "no file of at most 20,000 bytes scored a number on the selection split (those that fit scored NaN); " \
        "keeping the smallest that did (30,000 bytes)" in capsys.readouterr().err


def test_a_score_keeps_each_images_cross_entropy():
    torch.manual_seed(0)
    model = common.StudentNet(num_classes=3).eval()
    x, y = torch.randint(0, 256, (5, 20, 20, 3), dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1])
    losses, correct = common.evaluate(model, x, y, 2, 16, "imagenet")
    with torch.no_grad():
        logits = model(common.normalize(common.to_float(x[:, 2:18, 2:18]), "imagenet"))
    assert np.allclose(losses, torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy(), atol=1e-5)
    assert (correct == (logits.argmax(1) == y).numpy()).all()
    assert stats.Score(correct, "k", losses).loss == pytest.approx(float(losses.mean()))


# --- intervals and paired tests ---------------------------------------------------------------

def test_wilson_interval_matches_the_textbook_value():
    score = stats.Score([True] * 45 + [False] * 5)
    lo, hi = score.interval()
    assert (round(lo, 4), round(hi, 4)) == (0.7864, 0.9565)
    assert str(score) == "0.9000 [0.786, 0.957]"
    lo, hi = stats.Score([True] * 10).interval()
    assert hi == pytest.approx(1.0) and 0.69 < lo < 0.73  # no [1, 1] for a perfect score
    assert str(stats.Score([False] * 10)) == "0.0000 [0.000, 0.278]"


def test_exact_mcnemar_p():
    assert stats.mcnemar_p(0, 6) == 2 / 64
    assert stats.mcnemar_p(1, 9) == 2 * (1 + 10) / 1024
    assert stats.mcnemar_p(3, 3) == 1.0 and stats.mcnemar_p(0, 0) == 1.0
    assert stats.mcnemar_p(40, 60) == pytest.approx(0.0569, abs=1e-4)  # a textbook case


def test_paired_difference_interval_and_counts():
    a = np.array([True] * 300 + [True] * 10 + [False] * 30 + [False] * 60)
    b = np.array([True] * 300 + [False] * 10 + [True] * 30 + [False] * 60)
    d = stats.paired(stats.Score(a, "k"), stats.Score(b, "k"))
    assert d["diff"] == pytest.approx(20 / 400) and (d["only_a"], d["only_b"]) == (10, 30)
    lo, hi = d["ci"]
    se = math.sqrt(40 - 20 ** 2 / 400) / 400  # the textbook paired standard error
    assert lo == pytest.approx(0.05 - 1.96 * se, abs=0.006) and hi == pytest.approx(0.05 + 1.96 * se, abs=0.006)
    assert d["p"] == stats.mcnemar_p(10, 30) < 0.01
    with pytest.raises(ValueError):
        stats.paired(stats.Score(a, "k"), stats.Score(b, "other images"))


def test_per_image_correctness_round_trips_through_the_results_log(tmp_path):
    rng = np.random.default_rng(1)
    score = stats.Score(rng.random(751) < 0.6, "key")
    path = tmp_path / "m.pt"
    model = common.StudentNet(widths=[4] * 8, num_classes=3)
    common.save_checkpoint(path, model, {"norm": "imagenet"})
    files.publish(tmp_path, records=[common.model_record("1 architecture", "m", model, path, score, 16)])
    back = reports.recorded_score(files.read_results(tmp_path)[0])
    assert np.array_equal(back.correct, score.correct) and back.key == "key"
    assert files.read_results(tmp_path)[0]["val_ci"] == [round(v, 4) for v in score.interval()]


def test_evaluation_is_plain_fp32_on_cuda_too():
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    before = flags()
    with common.plain_fp32(torch.device("cuda")):
        assert flags() == (False, False)
    assert flags() == before


# --- exact slimming ----------------------------------------------------------------------------

def random_student(seed, widths=None):
    """An eval-mode StudentNet with non-trivial BN statistics and betas (some negative, some > 6)."""
    torch.manual_seed(seed)
    model = common.StudentNet(widths=widths, num_classes=5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.1, 1.5)
            m.bias.data.uniform_(-1.0, 7.0)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.3, 2.0)
    return model.eval()


def with_dropped_gammas_zeroed(model, small_counts):
    """The original with only the gammas of the channels slim drops set to 0 (betas kept)."""
    reference = random_student(0, model.widths)
    reference.load_state_dict(model.state_dict())
    for g, count in small_counts.items():
        weakest = prune.importance(model, g).argsort(descending=True)[count:]
        reference.cnn[g][1].weight.data[weakest] = 0
    return reference.eval()


def counts_cases(model):
    uniform = {g: max(1, round(0.6 * model.widths[g - 1])) for g in prune.GROUPS}
    budget = common.count_params(prune.slim(model, 0.5))
    return {f"group {g} alone": {g: max(1, model.widths[g - 1] // 3)} for g in prune.GROUPS} | {
        "uniform 0.6, every group": uniform, "global threshold": prune.global_counts(model, budget),
        "one channel left everywhere": {g: 1 for g in prune.GROUPS}}


@pytest.mark.parametrize("seed", [0, 1])
def test_slimming_is_exact(seed):
    model = random_student(seed, widths=[8, 12, 16, 24, 32, 32, 24, 16])
    x = torch.randn(4, 3, 32, 32)
    for case, counts in counts_cases(model).items():
        small = prune.slim_counts(model, counts).eval()
        with torch.no_grad():
            expected, got = with_dropped_gammas_zeroed(model, counts)(x), small(x)
        assert small.widths != model.widths, case
        assert (got - expected).abs().max() < 1e-5, case


def test_the_bias_fold_matters():
    """Without it, dropping zero-gamma channels with positive betas changes the output."""
    model = random_student(3, widths=[8, 12, 16, 24, 32, 32, 24, 16])
    counts = {4: 12}
    reference = with_dropped_gammas_zeroed(model, counts)
    small = prune.slim_counts(model, counts).eval()
    small.cnn[4][3].bias.data.copy_(model.cnn[4][3].bias)  # undo the fold
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (small(x) - reference(x)).abs().max() > 1e-3


# --- preprocessing that travels -------------------------------------------------------------

def test_a_crop_size_given_to_04_is_the_one_it_evaluates(pipeline, tmp_path, monkeypatch):
    ck, _, args = pipeline
    work = tmp_path / "ck"
    shutil.copytree(ck, work)
    seen = set()
    evaluate = common.evaluate
    monkeypatch.setattr(common, "evaluate", lambda m, images, labels, batch, crop, norm: (
        seen.add((images.shape[1], crop)), evaluate(m, images, labels, batch, crop, norm))[1])
    argv = [a for a in args if not a.startswith(("--img_size", "--resize", "--ckpt_dir"))]
    monkeypatch.setattr(sys, "argv", ["04_quantize.py", *argv, f"--ckpt_dir={work}", "--variants=fp16",
                                      "--img_size=17"])
    running.run(load_script("04_quantize.py").main)
    assert seen == {(19, 17)}  # stored at round(17 * 8/7), cropped at 17, for every model and file


# --- the course's submission format -----------------------------------------------------------

def test_predictions_use_integer_ids_in_order_and_keep_unreadable_rows(tmp_path):
    split = images.Split(torch.zeros(4, 2, 2, 3, dtype=torch.uint8), torch.full((4,), -1),
                         ["0002.jpg", "0000.jpg", "0010.jpg", "0001.jpg"], unreadable=["0010.jpg"])
    count, unreadable = reports.write_predictions(tmp_path / "p.csv", split, torch.tensor([5, 6, 7, 8]))
    assert (count, unreadable) == (4, 1)
    assert (tmp_path / "p.csv").read_text() == "Id,Category\n0,6\n1,8\n2,5\n10,0\n"


def test_an_unreadable_test_image_keeps_its_row_with_one_warning(tmp_path, capsys):
    root = labeled_root(tmp_path / "food", per_class=2)
    for n in range(3):
        write(root / "testing" / f"{n:04d}.jpg", np.full((20, 20, 3), 90, np.uint8))
    (root / "testing" / "0001.jpg").write_bytes(b"broken")
    for _ in range(2):  # decoded, then read back from the cache
        test = common.load_data(root, 12, cache_dir=tmp_path / "cache").test
        assert test.names == ["0000.jpg", "0001.jpg", "0002.jpg"] and test.unreadable == ["0001.jpg"]
    assert "0001.jpg" not in capsys.readouterr().err  # said once, where its row is written:
    assert reports.write_predictions(tmp_path / "p.csv", test, torch.tensor([4, 5, 6])) == (3, 1)
    assert capsys.readouterr().err.count("0001.jpg") == 1
    assert (tmp_path / "p.csv").read_text() == "Id,Category\n0,4\n1,0\n2,6\n"


def test_predictions_of_files_not_named_by_number_name_the_file_and_may_name_the_class(tmp_path):
    """Such names were given sequence Ids, and an unreadable file class 0, like an answer."""
    split = images.Split(None, None, ["pie, apple.jpg", "b.png", "a.jpg"], unreadable=["b.png"])
    count, unreadable = reports.write_predictions(tmp_path / "p.csv", split, np.array([2, -1, 0]),
                                                  unreadable_class=None, class_names=["Bread", "Dairy", "Dessert"])
    assert (count, unreadable) == (3, 1)
    assert (tmp_path / "p.csv").read_text() == 'File,Category,Name\na.jpg,0,Bread\nb.png,,\n"pie, apple.jpg",2,Dessert\n'


def jpeg(params):
    img = np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img, params)[1].tobytes()


@pytest.mark.parametrize("kind", ["baseline", "progressive", "restart markers"])
def test_a_jpeg_with_trailing_bytes_decodes_and_a_truncated_one_does_not(tmp_path, kind):
    params = {"baseline": [], "progressive": [cv2.IMWRITE_JPEG_PROGRESSIVE, 1],
              "restart markers": [cv2.IMWRITE_JPEG_RST_INTERVAL, 2]}[kind]
    whole = jpeg(params)
    trailers = [b"\x00camera maker notes" * 20, b"\xff\xda\x11" * 50, b"\xff\xd9\xff\xda" + bytes(300)]
    for i, trailer in enumerate(trailers):
        (tmp_path / f"trailing{i}.jpg").write_bytes(whole + trailer)
        assert images.decode_image(tmp_path / f"trailing{i}.jpg", 16).shape == (16, 16, 3)
    for cut in (len(whole) // 3, len(whole) // 2, len(whole) - 2, len(whole) - 1):
        (tmp_path / "cut.jpg").write_bytes(whole[:cut])
        assert images.decode_image(tmp_path / "cut.jpg", 16) is None, cut


def test_course_ids_only_where_every_file_has_its_own_number():
    assert reports.submission_ids(["0001.jpg", "2.jpg"]) == [1, 2]
    assert reports.submission_ids(["1.jpg", "0001.png"]) is None  # two Id 1 rows otherwise
    assert reports.submission_ids(["\u00b2.jpg"]) is None  # a digit to str.isdigit, not to int()
