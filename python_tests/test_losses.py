"""crowdkernels.losses: REL (HMoDE eq. 2), MPCL (L2SM eqs. 1-2), expert importance (eq. 6), attention
(eq. 5) and density (eq. 3) losses, against references written from the equations."""
from __future__ import annotations

import pathlib
import runpy

import pytest
import torch
import torch.nn.functional as F

import crowdkernels as ck
from crowdkernels import losses
from crowdkernels.ops import reference
from crowdkernels.ops.local_count import window_size

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def maps(B, H, W, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(B, 1, H, W, generator=g, dtype=torch.float64).to(device)
    target = torch.rand(B, 1, H, W, generator=g, dtype=torch.float64).to(device)
    return pred, target


def rel_reference(pred, target, region, num_hard, num_sublists, pairs, edge, reduction):
    rh, rw = window_size(region, pred.shape[-2], pred.shape[-1])
    pc, tc, se = reference.local_counts(pred[:, 0], target[:, 0], rh, rw, edge == "keep")
    per_image = reference.relative_local_count_loss(pc, tc, se, num_hard, num_sublists, pairs)
    return {"mean": per_image.mean(), "sum": per_image.sum(), "none": per_image}[reduction]


def released_structure(pred, gt, patch=16, k=9):
    """The authors' relativeLoss as their func.py structures it (written here from its description):
    AvgPool2d x area for the error map, pred and gt; topk of the detached error; a per-image loop that
    gathers and sorts by gt; every pair of each 3-element sub-list."""
    pool = torch.nn.AvgPool2d(patch, patch)
    err = pool(F.mse_loss(pred, gt, reduction="none")).flatten(1) * patch ** 2
    hard = torch.topk(err.detach(), k, dim=1).indices
    pc = pool(pred).flatten(1) * patch ** 2
    tc = pool(gt).flatten(1) * patch ** 2
    rows = []
    for b in range(pred.shape[0]):
        x, t = pc[b, hard[b]], tc[b, hard[b]]
        rows.append(x[torch.sort(t, descending=True).indices])
    x = torch.stack(rows)
    loss = 0.0
    for i in range(3):
        s = x[:, i::3]
        loss = loss + torch.relu(s[:, 1] - s[:, 0]) + torch.relu(s[:, 2] - s[:, 0]) + torch.relu(s[:, 2] - s[:, 1])
    return loss.sum()


# --------------------------------------------------------------------------------------------- REL
REL_CASES = [
    # B, region, num_hard, num_sublists, pairs, edge, reduction
    (1, 0.125, 9, 3, "adjacent", "keep", "mean"),
    (4, 0.125, 9, 3, "adjacent", "keep", "none"),
    (4, 0.125, 12, 4, "all", "drop", "sum"),          # T = 4
    (4, 0.5, 9, 3, "adjacent", "keep", "mean"),       # R = 4 < S: every window is used
    (1, 0.5, 9, 2, "all", "drop", "none"),            # R = 4 < S, drop
    (4, 16, 9, 3, "all", "drop", "sum"),              # the released settings
    (4, (7, 9), 40, 5, "all", "keep", "mean"),
    (1, 0.125, 2, 3, "adjacent", "keep", "sum"),      # S <= T: no pairs, loss 0
]


@pytest.mark.parametrize("B,region,S,T,pairs,edge,reduction", REL_CASES)
def test_rel_values_and_gradients_match_reference(device, B, region, S, T, pairs, edge, reduction):
    pred, target = maps(B, 61, 77, device=device, seed=B * 7 + S)
    pred.requires_grad_(True)
    got = losses.relative_local_count_loss(pred, target, region, S, T, pairs, edge, reduction)
    weights = torch.rand_like(got)
    (g_got,) = torch.autograd.grad((got * weights).sum(), pred)
    p = pred.detach().cpu().requires_grad_()
    want = rel_reference(p, target.cpu(), region, S, T, pairs, edge, reduction)
    (g_want,) = torch.autograd.grad((want * weights.cpu()).sum(), p)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got.cpu(), g_want, rtol=1e-12, atol=1e-12)
    if S <= T:
        assert got.item() == 0


def test_rel_hand_computed():
    # One row of 6 windows (1x1 pixels). Target counts rank them 5 > 4 > 3 > 2 > 1 > 0 (windows 0..5).
    target = torch.tensor([[[[5.0, 4, 3, 2, 1, 0]]]], dtype=torch.float64)
    pred = torch.tensor([[[[5.0, 1, 3, 9, 1, 0]]]], dtype=torch.float64, requires_grad=True)
    # S = 6 keeps all; T = 2: sub-lists (x1, x3, x5) = (5, 3, 1), (x2, x4, x6) = (1, 9, 0).
    adjacent = losses.relative_local_count_loss(pred, target, 1, 6, 2, "adjacent")
    assert adjacent.item() == pytest.approx(0 + 0 + 8 + 0)          # max(0, 9 - 1) only
    all_pairs = losses.relative_local_count_loss(pred, target, 1, 6, 2, "all")
    assert all_pairs.item() == pytest.approx(8 + 0 + 0)              # (1, 9), (1, 0), (9, 0)
    adjacent.backward()
    assert pred.grad.flatten().tolist() == [0, -1, 0, 1, 0, 0]


def test_rel_ties_in_target_counts_keep_window_order(device):
    # Every window has the same target count: the ranking keeps the windows in row-major order.
    target = torch.ones(2, 1, 8, 8, dtype=torch.float64, device=device)
    g = torch.Generator().manual_seed(3)
    pred = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64).to(device)
    pc, tc, se = ck.local_counts(pred, target, 2)
    order = losses.hard_region_ranking(tc, se, 16)
    assert order.tolist() == [list(range(16))] * 2
    got = losses.relative_local_count_loss(pred, target, 2, 16, 4, "adjacent", reduction="none")
    want = torch.relu(pc[:, 4:] - pc[:, :-4]).sum(dim=1)
    torch.testing.assert_close(got, want)
    # Ties broken within a subset: windows 1 and 3 tie at the top, 0 and 2 below; hard = all four.
    tc = torch.tensor([[1.0, 2.0, 1.0, 2.0]])
    se = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert losses.hard_region_ranking(tc, se, 4).tolist() == [[1, 3, 0, 2]]
    # Ties in the error itself: the lower window index is the harder one.
    se = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert losses.hard_region_ranking(tc, se, 2).tolist() == [[1, 0]]
    tc = torch.zeros(1, 5)
    se = torch.tensor([[3.0, 1.0, 3.0, 1.0, 3.0]])
    assert losses.hard_region_ranking(tc, se, 2).tolist() == [[0, 2]]
    assert losses.hard_region_ranking(tc, se, 4).tolist() == [[0, 1, 2, 4]]


@pytest.mark.parametrize("pairs", ["adjacent", "all"])
def test_rel_many_ties_match_reference(device, pairs):
    # Quantized maps: many windows share their error and their target count.
    g = torch.Generator().manual_seed(21)
    pred = (torch.randint(0, 3, (4, 1, 24, 30), generator=g).double() / 2).to(device).requires_grad_()
    target = (torch.randint(0, 2, (4, 1, 24, 30), generator=g).double()).to(device)
    got = losses.relative_local_count_loss(pred, target, (2, 3), 25, 4, pairs, reduction="none")
    (g_got,) = torch.autograd.grad(got.sum(), pred)
    p = pred.detach().cpu().requires_grad_()
    want = rel_reference(p, target.cpu(), (2, 3), 25, 4, pairs, "keep", "none")
    (g_want,) = torch.autograd.grad(want.sum(), p)
    torch.testing.assert_close(got.cpu(), want)
    torch.testing.assert_close(g_got.cpu(), g_want)


def test_rel_choice_carries_no_gradient():
    pred, target = maps(2, 16, 16, seed=4)
    pred.requires_grad_(True)
    pc, tc, se = ck.local_counts(pred, target, 4)
    order = losses.hard_region_ranking(tc, se, 9)
    assert not order.requires_grad
    loss = losses.relative_local_count_loss(pred, target, 4)
    (grad,) = torch.autograd.grad(loss, pred)
    # The hinge terms only see pred through the window counts: the gradient is constant in each window.
    blocks = grad[:, 0].reshape(2, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(2, 16, 16)
    assert torch.equal(blocks, blocks[..., :1].expand_as(blocks))


def test_rel_released_settings_match_released_structure(device):
    pred, target = maps(3, 70, 90, device=device, seed=9)  # 70x90 leaves partial 16-pixel windows to drop
    pred.requires_grad_(True)
    got = losses.relative_local_count_loss(pred, target, region=16, pairs="all", edge="drop", reduction="sum")
    want = released_structure(pred, target)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(got, pred)[0]
    g2 = torch.autograd.grad(want, pred)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_rel_batch_is_per_image():
    pred, target = maps(4, 33, 41, seed=5)
    batched = losses.relative_local_count_loss(pred, target, 0.2, reduction="none")
    single = torch.stack([losses.relative_local_count_loss(pred[b:b + 1], target[b:b + 1], 0.2, reduction="sum")
                          for b in range(4)])
    torch.testing.assert_close(batched, single)
    assert losses.relative_local_count_loss(pred, target, 0.2).item() == pytest.approx(batched.mean().item())


def test_rel_gradcheck():
    pred, target = maps(2, 12, 12, seed=6)
    pred.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda p: losses.relative_local_count_loss(p, target, 3, 9, 3, "all", reduction="sum"), (pred,))


def test_rel_module_and_compile():
    pred, target = maps(2, 61, 77, seed=8)
    module = losses.RelativeLocalCountLoss(region=16, pairs="all", edge="drop", reduction="sum")
    assert "pairs='all'" in repr(module)
    torch.testing.assert_close(module(pred, target), losses.relative_local_count_loss(
        pred, target, 16, pairs="all", edge="drop", reduction="sum"))
    compiled = torch.compile(module, backend="aot_eager")
    torch.testing.assert_close(compiled(pred, target), module(pred, target))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target=torch.zeros(2, 1, 32, 31)), "target"),
        (dict(num_hard=0), "num_hard"),
        (dict(num_sublists=0), "num_sublists"),
        (dict(region=64), "region"),
        (dict(region=0.0), "region"),
        (dict(region=-3), "region"),
        (dict(pairs="every"), "pairs"),
        (dict(edge="wrap"), "edge"),
        (dict(reduction="max"), "reduction"),
    ],
)
def test_rel_bad_input(kwargs, match):
    args = dict(pred=torch.zeros(2, 1, 32, 32), target=torch.zeros(2, 1, 32, 32))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        losses.relative_local_count_loss(**args)


@pytest.mark.parametrize("kwargs,match", [(dict(num_hard=0), "num_hard"), (dict(num_sublists=-1), "num_sublists"),
                                          (dict(pairs="x"), "pairs"), (dict(edge="x"), "edge"),
                                          (dict(reduction="x"), "reduction")])
def test_rel_module_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        losses.RelativeLocalCountLoss(**kwargs)


def test_example_runs():
    namespace = runpy.run_path(str(EXAMPLES / "rel_with_any_model.py"))
    history = namespace["main"](steps=3, batch=2, size=48)
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(history)))


# --------------------------------------------------------------------------------------------- MPCL
def mpcl_with(centers, alpha=0.5, **options):
    m = losses.MultipolarCenterLoss(len(centers), alpha=alpha, **options)
    m.centers.copy_(torch.tensor(centers, dtype=m.centers.dtype))
    return m


def test_mpcl_eq2_and_eq1_hand_computed():
    m = mpcl_with([1.0, 2.0, 3.0]).double()
    D = torch.tensor([2.0, 4.0, 8.0, 3.0, 10.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0], dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([0, 0, 1, 2, -1])
    loss = m(D, r, idx)
    # d = D / r^2 = [2, 4, 2, 3, -]; eq. 2: (2-1)^2 + (4-1)^2 + (2-2)^2 + (3-3)^2 = 10 (pre-update centres)
    assert loss.item() == pytest.approx(10.0)
    # eq. 1: delta_0 = ((1-2) + (1-4)) / (1 + 2) = -4/3 -> 1 + 0.5 * 4/3; centres 1 and 2 have zero pull
    torch.testing.assert_close(m.centers, torch.tensor([1 + 2 / 3, 2.0, 3.0], dtype=torch.float64))
    loss.backward()
    # dL/dD_i = 2 (d_i - c) / r_i^2, dL/dr_i = -4 D_i (d_i - c) / r_i^3, with the pre-update c
    torch.testing.assert_close(D.grad, torch.tensor([2.0, 6.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(r.grad, torch.tensor([-8.0, -48.0, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_mpcl_uses_pre_update_centres_and_keeps_moving():
    m = mpcl_with([0.0], alpha=1.0).double()
    D = torch.tensor([1.0], dtype=torch.float64)
    r = torch.ones(1, dtype=torch.float64)
    i = torch.zeros(1, dtype=torch.long)
    assert m(D, r, i).item() == pytest.approx(1.0)        # (1 - 0)^2
    assert m.centers.item() == pytest.approx(0.5)         # 0 - 1 * (0 - 1) / 2
    assert m(D, r, i).item() == pytest.approx(0.25)       # (1 - 0.5)^2


def test_mpcl_frozen_in_eval_and_state_dict_round_trip():
    m = losses.MultipolarCenterLoss(3, generator=torch.Generator().manual_seed(0))
    init = m.centers.clone()
    assert bool((init[1:] > init[:-1]).all())            # increasing random values
    m.eval()
    D, r = torch.rand(8), torch.rand(8) + 0.5
    idx = torch.tensor([0, 1, 2, 0, 1, 2, -1, 0])
    first = m(D, r, idx)
    assert torch.equal(m.centers, init) and torch.equal(m(D, r, idx), first)
    m.train()
    m(D, r, idx)
    assert not torch.equal(m.centers, init)
    state = m.state_dict()
    assert set(state) == {"centers"}
    other = losses.MultipolarCenterLoss(3)
    other.load_state_dict(state)
    assert torch.equal(other.centers, m.centers)


def test_mpcl_gradcheck():
    m = mpcl_with([0.2, 0.5, 0.9]).double().eval()
    D = torch.rand(6, dtype=torch.float64, requires_grad=True)
    r = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    idx = torch.tensor([0, 1, 2, 2, -1, 1])
    assert torch.autograd.gradcheck(lambda a, b: m(a, b, idx), (D, r))
    assert torch.autograd.gradcheck(lambda a, b: losses.multipolar_center_loss(a, b, idx, m.centers), (D, r))


@pytest.mark.parametrize(
    "D,r,idx,match",
    [
        (torch.ones(3), torch.ones(3), torch.tensor([0, 3, 1]), "center_index"),
        (torch.ones(3), torch.ones(3), torch.tensor([0, -2, 1]), "center_index"),
        (torch.ones(3), torch.ones(2), torch.tensor([0, 1, 1]), "scale"),
        (torch.ones(3), torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 1, 1]), "scale"),
        (torch.ones(3), torch.tensor([1.0, -1.0, 1.0]), torch.tensor([0, 1, 1]), "scale"),
        (torch.ones(3), torch.ones(3), torch.tensor([0, 1]), "center_index"),
    ],
)
def test_mpcl_bad_input(D, r, idx, match):
    with pytest.raises(ValueError, match=match):
        losses.MultipolarCenterLoss(3)(D, r, idx)


def test_mpcl_unselected_region_with_zero_scale_is_ignored():
    m = mpcl_with([1.0, 2.0]).eval()
    assert m(torch.tensor([1.0, 5.0]), torch.tensor([1.0, 0.0]), torch.tensor([0, -1])).item() == 0


def test_fit_density_levels_and_assign_centers():
    values = torch.arange(100, dtype=torch.float64)
    thresholds = losses.fit_density_levels(values, 5)
    torch.testing.assert_close(thresholds, torch.quantile(values, torch.tensor([0.2, 0.4, 0.6, 0.8],
                                                                                dtype=torch.float64)))
    means = torch.tensor([[0.0, 19.8, 40.0, 60.0, 99.0]])
    selected, idx = losses.assign_centers(means, thresholds, 3)
    # levels: 0, 1 (19.8 is the first threshold), 2, 3, 4 -> the densest 3 levels are centres 0, 1, 2
    assert idx.tolist() == [[-1, -1, 0, 1, 2]]
    assert selected.tolist() == [[False, False, True, True, True]]
    with pytest.raises(ValueError, match="num_centers"):
        losses.assign_centers(means, thresholds, 6)
    with pytest.raises(ValueError, match="num_groups"):
        losses.fit_density_levels(values, 0)


# ------------------------------------------------------------------------------ expert importance
def test_expert_importance_matches_eq6():
    g = torch.Generator().manual_seed(1)
    imp = torch.rand(3, 4, 2, generator=g, dtype=torch.float64) * 100
    W = imp.sum(0)
    want = sum(float(W[i].var(unbiased=True) / (W[i].mean() ** 2 + 1e-10)) for i in range(4))
    assert losses.expert_importance_loss(imp).item() == pytest.approx(want)
    per = sum(sum(float(imp[b, i].var() / (imp[b, i].mean() ** 2 + 1e-10)) for i in range(4)) for b in range(3)) / 3
    assert losses.expert_importance_loss(imp, per_image=True).item() == pytest.approx(per)
    assert losses.ExpertImportanceLoss()(imp).item() == pytest.approx(want)
    # [[1, 3]] over one image: var = 2, mean = 2 -> 0.5
    assert losses.expert_importance_loss(torch.tensor([[[1.0, 3.0]]])).item() == pytest.approx(0.5)
    assert losses.expert_importance_loss(torch.ones(2, 3, 1)).item() == 0     # one expert per group
    imp.requires_grad_(True)
    assert torch.autograd.gradcheck(losses.expert_importance_loss, (imp,))
    with pytest.raises(ValueError, match="importance"):
        losses.expert_importance_loss(torch.ones(3, 4))


# ------------------------------------------------------------------------------------- attention
def test_attention_loss_matches_eq5_with_nearest_upsampling():
    g = torch.Generator().manual_seed(2)
    att = torch.rand(2, 1, 4, 5, generator=g, dtype=torch.float64)
    density = torch.rand(2, 1, 8, 10, generator=g, dtype=torch.float64)
    density[density < 0.5] = 0
    a = att.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    y = (density > 1e-5).double()
    bce = -(y * torch.log(a) + (1 - y) * torch.log(1 - a))
    torch.testing.assert_close(losses.attention_loss(att, density), bce.mean())
    torch.testing.assert_close(losses.attention_loss(att, density, reduction="sum"), bce.sum())
    torch.testing.assert_close(losses.attention_loss(att, density, reduction="none"), bce.flatten(1).mean(1))
    torch.testing.assert_close(losses.AttentionLoss()(att, density), bce.mean())
    # The released code's form, log(a + 1e-10), agrees away from 0 and 1.
    released = -(y * torch.log(a + 1e-10) + (1 - y) * torch.log(1 - a + 1e-10)).sum()
    torch.testing.assert_close(losses.attention_loss(att, density, reduction="sum"), released)


def test_attention_loss_safe_at_0_and_1():
    att = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]], dtype=torch.float64, requires_grad=True)
    density = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)
    loss = losses.attention_loss(att, density)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(att.grad).all())
    assert loss.item() == pytest.approx(50.0)   # two pixels exactly wrong (clamped at 100), two exactly right


def test_attention_loss_bad_input():
    with pytest.raises(ValueError, match="target_density"):
        losses.attention_loss(torch.rand(2, 1, 4, 4), torch.rand(3, 1, 8, 8))
    with pytest.raises(ValueError, match="attention"):
        losses.attention_loss(torch.rand(2, 2, 4, 4), torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="reduction"):
        losses.attention_loss(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 8, 8), reduction="avg")


# --------------------------------------------------------------------------------------- density
def test_density_loss_eq3():
    pred, target = maps(3, 9, 11, seed=12)
    torch.testing.assert_close(losses.density_loss(pred, target), F.mse_loss(pred, target))
    torch.testing.assert_close(losses.density_loss(pred, target, "sum"), F.mse_loss(pred, target, reduction="sum"))
    torch.testing.assert_close(losses.density_loss(pred, target, "none"), ((pred - target) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(losses.DensityLoss("sum")(pred, target), F.mse_loss(pred, target, reduction="sum"))
    with pytest.raises(ValueError, match="target"):
        losses.density_loss(pred, target[:, :, :8])
    with pytest.raises(ValueError, match="reduction"):
        losses.DensityLoss("max")


# ----------------------------------------------------------------------------------------- REL's balance
@pytest.mark.parametrize("normalize, divisor", [("none", 1.0), ("window", 5.0 * 7.0), ("pixels", 37.0 * 50.0)])
def test_rel_normalize_divides_rel_by_the_window_or_the_map(normalize, divisor):
    from crowdkernels import CSRNet, HMoDE
    from crowdkernels.losses.rel import rel_normalizer

    g = torch.Generator().manual_seed(3)
    d = torch.rand(2, 1, 37, 50, generator=g, dtype=torch.float64)
    assert rel_normalizer(d, normalize, 0.125) == divisor  # windows ceil(37/8) x ceil(50/8) = 5 x 7
    # the criteria divide REL (and only REL) by it; HMoDE scales every output's REL, then weights the sum
    torch.manual_seed(0)
    net = HMoDE(width=0.125).double()
    images = torch.rand(2, 3, 64, 48, dtype=torch.float64)
    targets = {"density": torch.rand(2, 1, 64, 48, dtype=torch.float64) * 1e-2, "points": [torch.zeros(0, 2)] * 2}
    out = net(images)
    raw = net.criterion()(out, targets)
    scaled = net.criterion(rel_normalize=normalize, rel_weight=0.5)(out, targets)
    div = rel_normalizer(targets["density"], normalize, 0.125)
    torch.testing.assert_close(scaled["rel"], raw["rel"] / div)
    torch.testing.assert_close(scaled["total"] - raw["total"], 0.5 * scaled["rel"] - raw["rel"])
    c = CSRNet(width=0.125).double()
    o = c(images)
    r0 = c.criterion(rel=True)(o, targets)["rel"]
    r1 = c.criterion(rel=True, rel_normalize=normalize)(o, targets)["rel"]
    torch.testing.assert_close(r1, r0 / rel_normalizer(o.final, normalize, 0.125))


def test_rel_normalize_names_its_choices():
    from crowdkernels import HMoDE

    with pytest.raises(ValueError, match=r"rel_normalize must be one of \['none', 'window', 'pixels'\], got 'area'"):
        HMoDE(width=0.125).criterion(rel_normalize="area")


def test_expert_importance_variance_over_n_or_n_minus_1():
    """eq. 6's sigma(W_i): over N - 1 (unbiased, the released cv_squared's x.var()) or over N."""
    imp = torch.tensor([[[1.0, 3.0, 8.0]]], dtype=torch.float64)
    mean = 4.0
    ss = (1 - mean) ** 2 + (3 - mean) ** 2 + (8 - mean) ** 2  # 26
    assert losses.expert_importance_loss(imp).item() == pytest.approx(ss / 2 / (mean ** 2 + 1e-10))
    assert losses.expert_importance_loss(imp, unbiased=False).item() == pytest.approx(ss / 3 / (mean ** 2 + 1e-10))
    assert losses.ExpertImportanceLoss(unbiased=False)(imp).item() == pytest.approx(ss / 3 / (mean ** 2 + 1e-10))
    with pytest.raises(TypeError, match="unbiased"):
        losses.expert_importance_loss(imp, unbiased=1)


def test_mpcl_norm_as_printed_is_the_absolute_difference():
    """L2SM eq. 2's ||D/r^2 - d_c||_2 of a scalar read as written: |d - d_c|; eq. 1's update is unchanged."""
    m = mpcl_with([1.0, 2.0, 3.0], norm="l2").double()
    D = torch.tensor([2.0, 4.0, 8.0, 3.0, 10.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    idx = torch.tensor([0, 0, 1, 2, -1])
    loss = m(D, r, idx)
    assert loss.item() == pytest.approx(1.0 + 3.0 + 0.0 + 0.0)  # d = [2, 4, 2, 3]
    torch.testing.assert_close(m.centers, torch.tensor([1 + 2 / 3, 2.0, 3.0], dtype=torch.float64))
    loss.backward()
    torch.testing.assert_close(D.grad, torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="norm must be one of"):
        losses.MultipolarCenterLoss(3, norm="l1")
