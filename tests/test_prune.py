import pytest
import torch

import common
from support import running
from conftest import load_script

prune = load_script("03_prune.py")


def trained_looking_student(widths=None, seed=0):
    torch.manual_seed(seed)
    model = common.StudentNet(widths=widths, num_classes=5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics and affine terms
            m.weight.data.uniform_(0.2, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.77, 1.0])
def test_dropping_dead_channels_changes_no_output(keep):
    """Channels whose gamma is 0 still feed the next conv the constant ReLU6(beta): with betas
    kept (some negative, some past ReLU6's 6), the slim model must fold that into the bias."""
    model = trained_looking_student()
    for g in prune.GROUPS:  # the channels slim will drop get gamma = 0; their betas stay
        width = model.widths[g - 1]
        dead = prune.importance(model, g).argsort()[: width - max(1, round(keep * width))]
        model.cnn[g][1].weight.data[dead] = 0
        model.cnn[g][1].bias.data[dead] = torch.linspace(-1.0, 8.0, len(dead))
    small = prune.slim(model, keep).eval()
    expected = [max(1, round(keep * w)) for w in model.widths[:7]] + [model.widths[7]]
    assert small.widths == expected
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)


def test_slim_shapes_params_and_groups():
    model = trained_looking_student()
    small = prune.slim(model, [0.5, 0.25], groups=[4, 7])
    assert small.widths == [16, 32, 64, 64, 256, 256, 64, 256]
    assert small.cnn[4][0].weight.shape == (64, 1, 3, 3)
    assert small.cnn[3][3].weight.shape == (64, 64, 1, 1)
    assert small.cnn[4][3].weight.shape == (256, 64, 1, 1)
    assert small.cnn[7][3].weight.shape == (256, 64, 1, 1)
    assert common.count_params(small) == common.count_params(common.StudentNet(widths=small.widths, num_classes=5))
    assert common.count_params(small) < common.count_params(model)
    # the strongest channels survive, in their original order
    kept = prune.importance(model, 4).topk(64).indices.sort().values
    assert torch.equal(small.cnn[4][1].weight, model.cnn[4][1].weight[kept])
    with pytest.raises(ValueError):
        prune.slim(model, [0.5], groups=[4, 7])


def test_global_threshold_fits_the_parameter_budget():
    model = trained_looking_student()
    budget = common.count_params(prune.slim(model, 0.5))
    counts = prune.global_counts(model, budget)
    small = prune.slim_counts(model, counts)
    assert budget * 0.97 < common.count_params(small) <= budget
    # one threshold: every kept gamma is at least every dropped one
    kept, dropped = [], []
    for g, c in counts.items():
        order = prune.importance(model, g).sort(descending=True).values
        kept.append(order[:c].min())
        if c < len(order):
            dropped.append(order[c:].max())
    assert min(kept) >= max(dropped) or any(c == 1 for c in counts.values())


@pytest.mark.parametrize("method", ["uniform", "global"])
def test_channel_counts_round_to_the_multiple_by_the_same_ranking(method):
    model = trained_looking_student()
    exact = prune.prune_model(model, 0.41, prune.GROUPS, method, 1)
    eights = prune.prune_model(model, 0.41, prune.GROUPS, method, 8)
    assert any(w % 8 for w in exact.widths[:7]) and all(w % 8 == 0 for w in eights.widths)
    if method == "uniform":  # 1 is today's exact round(keep * width); 8 the nearest multiple of it
        assert exact.widths[:7] == [max(1, round(0.41 * w)) for w in model.widths[:7]]
        assert eights.widths[:7] == [max(8, 8 * round(e / 8)) for e in exact.widths[:7]]
    else:  # the same parameter budget, met as closely as rounded counts allow
        assert common.count_params(eights) <= common.count_params(prune.slim(model, 0.41, multiple=8))
    for g in prune.GROUPS:  # whatever the count, the channels kept are the strongest ones, in order
        count = eights.widths[g - 1]
        kept = prune.importance(model, g).topk(count).indices.sort().values
        assert torch.equal(eights.cnn[g][1].weight, model.cnn[g][1].weight[kept])
    assert prune.rounded(3, 16, 8) == 8 and prune.rounded(13, 16, 8) == 16 and prune.rounded(51, 64, 8) == 48
    assert prune.rounded(61, 60, 8) == 60 and prune.rounded(51, 64, 1) == 51
    assert [prune.rounded(c, 64, 8) for c in (20, 28, 36, 44)] == [16, 32, 32, 48]  # ties to the even multiple


def test_a_pruned_checkpoint_rebuilds_its_shape(tmp_path):
    small = prune.slim(trained_looking_student(), 0.4)
    common.save_checkpoint(tmp_path / "p.pt", small, {"norm": "imagenet"})
    model = common.load_model(tmp_path / "p.pt")[0]
    assert model.widths == small.widths
    torch.save(small.state_dict(), tmp_path / "plain.bin")   # even without our metadata
    assert common.load_model(tmp_path / "plain.bin")[0].widths == small.widths


def test_bad_prune_groups_are_a_clear_error():
    assert prune.parse_groups("7,4, 5") == [4, 5, 7]
    for text in ("0,1", "8", "a", ""):
        with pytest.raises(running.UserError, match="block numbers from 1 to 7"):
            prune.parse_groups(text)


def test_round_names_never_collide():
    assert prune.round_names([0.8 ** k for k in range(1, 6)]) == ["0.800", "0.640", "0.512", "0.410", "0.328"]
    close = [0.9995 ** k for k in range(1, 4)]
    names = prune.round_names(close)
    assert names == ["0.9995", "0.9990", "0.9985"] and len(set(names)) == 3
