"""Stage-two pieces on their own: losses, split, epoch plan, schedule, early stop, similarity."""

import json
import math

import numpy as np
import pytest
import torch

from g2l_cache import G2LError
from g2l_student.data import epoch_rows, patients_of_slides, samples_per_epoch, split_by_slide
from g2l_student.losses import get_loss, logsum_loss
from g2l_student.model import GlobalBatchNorm1d, build_student, init_heads_from_targets
from g2l_student.optim import build_optimizer, no_decay_names
from g2l_student.schedule import EMA, G2LEarlyStop, cosine_with_warmup
from g2l_student.task import build_task
from g2l_student.similarity import centred_r2, debiased_cka, knn_overlap, linear_cka, mean_cosine

S = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
T = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 1.0]])


def test_logsum_loss_matches_hand_computation():
    # sample 1: |d| = (1, 2, 0) -> 1 + 16 + 0 = 17; sample 2: |d| = (0, 2, 0) -> 16
    expected = (math.log(17) + math.log(16)) / 2
    assert abs(float(logsum_loss(S, T, alpha=4)) - expected) < 1e-6
    # alpha 2: 1 + 4 = 5 and 4
    assert abs(float(get_loss("logsum", 2.0)(S, T)) - (math.log(5) + math.log(4)) / 2) < 1e-6
    # over the whole batch: log(17 + 16)
    assert abs(float(get_loss("logsum", 4.0, "batch")(S, T)) - math.log(33)) < 1e-6


def test_other_losses_match_hand_computation():
    # cosine: sample 1 teacher is zero -> cos 0 -> 1; sample 2: (0,0,1).(0,2,1)=1, |.|=1*sqrt5
    assert abs(float(get_loss("cosine")(S, T)) - ((1 - 0) + (1 - 1 / math.sqrt(5))) / 2) < 1e-6
    # mse: (1 + 4 + 0) and (0 + 4 + 0) -> mean 4.5
    assert abs(float(get_loss("mse")(S, T)) - 4.5) < 1e-6
    # smooth-l1 (beta 1): 0.5*1 + (2-0.5) = 2.0 and 1.5 -> mean 1.75
    assert abs(float(get_loss("smooth-l1")(S, T)) - 1.75) < 1e-6
    with pytest.raises(G2LError, match="unknown loss"):
        get_loss("l3")


def test_logsum_gradient_is_finite_at_zero_difference():
    s = T.clone().requires_grad_(True)
    logsum_loss(s, T).backward()
    assert torch.isfinite(s.grad).all()


def test_split_by_slide_is_seeded_and_disjoint():
    ids = [f"s{i}" for i in range(20)]
    train, val = split_by_slide(ids, 0.25, seed=3)
    assert len(val) == 5 and not set(train) & set(val) and sorted(train + val) == sorted(ids)
    assert split_by_slide(ids, 0.25, seed=3) == (train, val)
    assert split_by_slide(ids, 0.25, seed=4)[1] != val
    assert split_by_slide(ids, 0.0, seed=3) == (sorted(ids), [])
    with pytest.raises(G2LError, match="at least 2 slides"):
        split_by_slide(["only"], 0.1, 0)


def test_epoch_rows_draw_one_view_per_tile_and_replay():
    n_tiles, k = 6, 4
    tiles = np.repeat(np.arange(10, 10 + n_tiles), k)  # views are stored tile by tile
    rows = epoch_rows(tiles, 0, seed=1, views_per_epoch="one")
    assert sorted(tiles[rows]) == sorted(set(tiles))
    assert samples_per_epoch(tiles, "one") == n_tiles and samples_per_epoch(tiles, "all") == n_tiles * k
    assert np.array_equal(rows, epoch_rows(tiles, 0, 1, "one"))
    assert not np.array_equal(rows, epoch_rows(tiles, 1, 1, "one"))
    # K epochs in a row visit each tile's K views once each, in an order drawn anew every K epochs
    for cycle in range(3):
        chosen = np.concatenate([epoch_rows(tiles, e, 1, "one") for e in range(cycle * k, cycle * k + k)])
        assert sorted(chosen.tolist()) == list(range(len(tiles)))
    firsts = [tuple(epoch_rows(tiles, e, 1, "one")) for e in (0, k, 2 * k)]
    assert len(set(map(frozenset, firsts))) > 1
    assert sorted(epoch_rows(tiles, 0, 1, "all")) == list(range(len(tiles)))


def test_cosine_schedule_with_warmup():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = cosine_with_warmup(opt, warmup=4, total=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.05


def test_g2l_early_stop_rule():
    stop = G2LEarlyStop(window=5, patience=2, smoothing=0)  # no smoothing: the paper's raw rule
    assert not any(stop.update(v) for v in [5, 4, 3, 2, 1])  # history filling, falling
    assert not stop.update(10) and not stop.update(10)  # 2 exceedances: not more than 2
    state = stop.state_dict()
    assert stop.update(10)  # third in a row
    again = G2LEarlyStop(window=5, patience=2, smoothing=0)
    again.load_state_dict(state)
    assert again.update(10)
    reset = G2LEarlyStop(window=3, patience=1, smoothing=0)
    for v in [3, 3, 3, 4, 1, 4]:  # an improvement in between resets the count
        assert not reset.update(v)


def test_early_stop_smooths_waits_for_ten_percent_and_cools_the_lr_down():
    rng = np.random.default_rng(0)
    noisy = 5 * np.exp(-np.arange(1000) / 300) + rng.normal(0, 1.0, 1000)  # falling, noise >> trend
    raw = G2LEarlyStop(window=20, patience=3, smoothing=0)
    assert any(raw.update(v) for v in noisy[:100])  # the raw rule stops on noise in the first 10%
    smooth = G2LEarlyStop(window=20, patience=3, smoothing=0.9, min_step=100)
    assert not any(smooth.update(v) for v in noisy[:100])
    # a loss that has levelled off and creeps up: fires, then a 10-step cool-down to lr 0, then stops
    stop = G2LEarlyStop(window=10, patience=2, smoothing=0.5, min_step=0, cooldown=10)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = cosine_with_warmup(opt, warmup=1, total=10_000, early_stop=stop)
    losses, lrs, stopped = [1.0] * 20 + [1.0 + 0.01 * i for i in range(1, 100)], [], None
    for step, value in enumerate(losses, 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if stop.update(value):
            stopped = step
            break
    assert stop.fired_at is not None and stopped == stop.fired_at + 10
    assert lrs[stop.fired_at - 1] > 0.99 and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a > b for a, b in zip(lrs[stop.fired_at:], lrs[stop.fired_at + 1:]))
    restored = G2LEarlyStop(window=10, patience=2, smoothing=0.5, cooldown=10)
    restored.load_state_dict(json.loads(json.dumps(stop.state_dict())))  # stored as JSON in checkpoints
    assert restored.lr_factor(stopped) == stop.lr_factor(stopped) == 0


def test_ema_is_the_decayed_average_of_the_weights():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.shadow.items()}
    assert "1.num_batches_tracked" not in ema.shadow  # integer buffers are not averaged
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["0.weight"], 0.9 * start["0.weight"] + 0.1 * model[0].weight)
    torch.testing.assert_close(ema.shadow["0.bias"], start["0.bias"])


def test_optimizer_decays_matrices_only_and_matches_the_reference_adamw():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    reference = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    reference.load_state_dict(model.state_dict())
    ours = build_optimizer(model, lr=0.1, weight_decay=0.5)
    assert ours.defaults["fused"] is True  # fused kernel on CPU
    decayed = {id(p) for g in ours.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {id(model[0].weight)}
    ref = torch.optim.AdamW([{"params": [reference[0].weight], "weight_decay": 0.5},
                             {"params": [reference[0].bias, *reference[1].parameters()], "weight_decay": 0.0}],
                            lr=0.1, foreach=False)
    x = torch.randn(8, 4)
    for _ in range(3):
        for net, opt in ((model, ours), (reference, ref)):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_global_batchnorm_matches_batchnorm():
    x = torch.randn(16, 5)
    ours, ref = GlobalBatchNorm1d(5), torch.nn.BatchNorm1d(5)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))
    ref.load_state_dict(ours.state_dict())


def test_similarity_measures_on_hand_checked_inputs():
    a = np.array([[1.0, 0], [0, 1], [1, 1], [2, 0.5]])
    assert abs(linear_cka(a, a) - 1) < 1e-12
    assert abs(linear_cka(a, 3 * a @ np.array([[0, 1], [1, 0]])) - 1) < 1e-12  # scale + rotation
    b = np.array([[1.0], [-1], [0], [1]])
    # centred a . centred b by hand
    ac, bc = a - a.mean(0), b - b.mean(0)
    expected = np.linalg.norm(ac.T @ bc) ** 2 / (np.linalg.norm(ac.T @ ac) * np.linalg.norm(bc.T @ bc))
    assert abs(linear_cka(a, b) - expected) < 1e-12
    assert knn_overlap(a, a, k=2) == 1.0
    assert mean_cosine(np.array([[1.0, 0]]), np.array([[0.0, 2]])) == 0.0
    with pytest.raises(G2LError, match="NaN"):
        linear_cka(np.array([[np.nan, 1], [1, 1]]), a[:2])
    with pytest.raises(G2LError, match="same tiles"):
        linear_cka(a, a[:3])


def test_global_batchnorm_keeps_the_variance_of_large_offset_features():
    torch.manual_seed(0)
    x = 30 + 0.05 * torch.randn(64, 6)
    ours, ref = GlobalBatchNorm1d(6), torch.nn.BatchNorm1d(6).double()
    out, expected = ours(x), ref(x.double()).float()
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=0)  # unit-variance outputs
    torch.testing.assert_close(ours.running_var, ref.running_var.float(), rtol=1e-4, atol=0)
    # the one-pass E[x^2] - E[x]^2 in float32 misses the variance by far more than that
    one_pass = (x * x).mean(0) - x.mean(0) ** 2
    assert ((one_pass - x.double().var(0, unbiased=False).float()).abs() / x.var(0, unbiased=False)).max() > 1e-3


def test_no_weight_decay_on_tokens_positions_norms_and_biases_of_a_vit():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, reg_tokens=4, img_size=32,
                            no_embed_class=True)
    exempt = no_decay_names(vit)
    assert {"cls_token", "reg_token", "pos_embed", "norm.weight", "blocks.0.attn.qkv.bias"} <= exempt
    assert not {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"} & exempt
    opt = build_optimizer(vit, lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    names = {n for n, p in vit.named_parameters() if id(p) in decayed}
    assert names == {n for n, p in vit.named_parameters() if n.endswith(".weight") and p.ndim >= 2}


def test_debiased_cka_tells_unrelated_from_related_when_samples_are_few():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((24, 384)), rng.standard_normal((24, 384))
    assert linear_cka(a, b) > 0.9  # the bias the debiased estimator removes
    assert abs(debiased_cka(a, b)) < 0.1
    rot = np.linalg.qr(rng.standard_normal((384, 384)))[0]
    assert abs(debiased_cka(a, 3 * a @ rot) - 1) < 1e-9  # invariant to scale and rotation
    mixed = a + 0.5 * rng.standard_normal((24, 384))
    assert 0.5 < debiased_cka(a, mixed) < 0.95
    with pytest.raises(G2LError, match="at least 4"):
        debiased_cka(a[:3], b[:3])


def test_centred_r2_on_hand_checked_values():
    t = np.array([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1): total sum of squares 4
    assert centred_r2(t, t) == 1.0
    assert centred_r2(np.array([[2.0, 1.0], [2.0, 1.0]]), t) == 0.0  # the mean itself
    assert abs(centred_r2(np.array([[1.0, 1.0], [3.0, 1.0]]), t) - (1 - 2 / 4)) < 1e-12


def test_heads_start_at_the_targets_per_dimension_mean_and_sd():
    torch.manual_seed(0)
    student = build_student("vit_tiny_patch16_224", 32, {"cls": 6}, random_init=True)
    targets = torch.randn(200, 6) * torch.tensor([0.1, 0.5, 1, 2, 3, 0.05]) + torch.arange(6) * 10
    init_heads_from_targets(student, {"cls": targets})
    out = student(torch.rand(64, 3, 32, 32))["cls"].detach()  # train mode: batch statistics
    torch.testing.assert_close(out.mean(0), targets.mean(0), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out.std(0, unbiased=False), targets.std(0), rtol=1e-3, atol=1e-4)


def test_validation_split_keeps_patients_whole(tmp_path):
    tcga = [f"TCGA-A{i % 4}-00{i % 4}{i % 4}-01Z-00-DX{i}" for i in range(12)]  # 4 patients, 3 slides each
    patients, source = patients_of_slides(tcga)
    assert source == "tcga" and len(set(patients.values())) == 4
    for seed in range(5):
        train, val = split_by_slide(tcga, 0.25, seed, patients)
        assert len(val) == 3 and {patients[s] for s in val}.isdisjoint(patients[s] for s in train)
    assert patients_of_slides(["a", "TCGA-A1-0011-01Z"]) == ({"a": "a", "TCGA-A1-0011-01Z": "TCGA-A1-0011-01Z"}, "slide")
    csv = tmp_path / "patients.csv"
    csv.write_text("slide_id,patient_id\na,p1\nb,p1\nc,p2\n")
    assert patients_of_slides(["a", "b", "c"], str(csv)) == ({"a": "p1", "b": "p1", "c": "p2"}, "csv")
    with pytest.raises(G2LError, match="no patient for 1 slide"):
        patients_of_slides(["a", "d"], str(csv))
    with pytest.raises(G2LError, match="at least 2 patients"):
        split_by_slide(["a", "b"], 0.5, 0, {"a": "p1", "b": "p1"})


def test_distill_task_weights_each_head_and_takes_targets_from_a_live_teacher():
    torch.manual_seed(0)
    student = build_student("vit_tiny_patch16_224", 32, {"cls": 4, "mean-patch": 3}, random_init=True)
    views, t_cls, t_patch = torch.rand(5, 3, 32, 32), torch.randn(5, 4), torch.randn(5, 3)
    mse = get_loss("mse")
    task = build_task(student, "both", mse, cls_weight=2.0, patch_weight=0.5)
    out = student(views)
    expected = 2.0 * mse(out["cls"], t_cls) + 0.5 * mse(out["mean-patch"], t_patch)
    torch.testing.assert_close(task.loss(views, t_cls, t_patch), expected)

    class Live(torch.nn.Module):  # a teacher whose targets are a known function of the views
        def embed(self, v):
            return v.mean((2, 3)).repeat(1, 2)[:, :4], v.amax((2, 3))

    live = build_task(student, "both", mse, teacher=Live())
    expected = mse(out["cls"], views.mean((2, 3)).repeat(1, 2)[:, :4]) + mse(out["mean-patch"], views.amax((2, 3)))
    torch.testing.assert_close(live.loss(views, t_cls * 0, t_patch * 0), expected)
    assert set(build_task(student, "cls", mse).weights) == {"cls"}
