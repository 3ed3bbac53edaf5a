import pytest
import torch

from pipeline.errors import ConfigError, TrainingError
from pipeline.modules import build_module, infer_shape
from pipeline.objectives import LocalObjective, build_objective
from pipeline.objectives.infonce import info_nce_from_scores
from pipeline.objectives.sfa import whiten
from pipeline.objectives.variational import gaussian_kl
from schemas.config import ModuleConfig


def objective_cfg(**kw):
    return ModuleConfig.model_validate({"layers": [{"type": "flatten"}], "objective": kw}).objective


def clustered(n_clusters=8, per_cluster=8, shape=(16,), noise=0.5, seed=0):
    """Samples and a positive for each (another noisy draw of the same cluster centre), with the cluster labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, *shape, generator=g)
    labels = torch.arange(n_clusters).repeat_interleave(per_cluster)
    x = centres[labels] + noise * torch.randn(len(labels), *shape, generator=g)
    x_pos = centres[labels] + noise * torch.randn(len(labels), *shape, generator=g)
    return x, x_pos, labels


def losses_over_training(layers, objective, x, x_pos, labels, steps=20, lr=1e-2, patches=None, num_classes=None):
    torch.manual_seed(0)
    cfg = ModuleConfig.model_validate({"layers": layers, "objective": objective, "patches": patches})
    in_shape = tuple(x.shape[1:])
    out_shape, _ = infer_shape(cfg, in_shape)
    mod = build_module(cfg, in_shape)
    obj = build_objective(cfg.objective, out_shape, num_classes)
    assert isinstance(obj, LocalObjective)
    opt = torch.optim.Adam([*mod.parameters(), *obj.parameters()], lr=lr)
    losses = []
    for _ in range(steps):
        z = mod(x)
        z_pos = mod(x_pos) if obj.needs_pairs else None
        loss, stats = obj(z, z_pos, labels if obj.needs_labels else None)
        assert all(isinstance(v, float) for v in stats.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    return losses, stats


def falls(losses, factor=0.9):
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    return last < factor * first


# ---------------------------------------------------------------- losses fall on toy data


def test_infonce_pair_loss_falls_on_clustered_images():
    x, x_pos, labels = clustered(shape=(1, 8, 8))
    layers = [{"type": "conv", "channels": 8, "kernel": 3}, {"type": "maxpool"}, {"type": "flatten"},
              {"type": "linear", "features": 16}]
    losses, stats = losses_over_training(layers, {"kind": "infonce_pair", "temperature": 0.2, "projection_dim": 8},
                                         x, x_pos, labels)
    assert falls(losses) and 0 <= stats["accuracy"] <= 1


def test_infonce_pair_bilinear_loss_falls():
    x, x_pos, labels = clustered()
    losses, _ = losses_over_training([{"type": "linear", "features": 8}], {"kind": "infonce_pair", "bilinear": True,
                                                                          "temperature": 1.0}, x, x_pos, labels)
    assert falls(losses)


def stripes(n=16, size=16, seed=0):
    """Images of vertical stripes with an image-specific pattern: the rows below are predictable from a row."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.rand(n, 1, 1, size, generator=g)
    return (pattern + 0.05 * torch.randn(n, 1, size, size, generator=g)).clamp(0, 1)


def test_infonce_grid_loss_falls_on_patches():
    x = stripes()
    layers = [{"type": "conv", "channels": 8, "kernel": 3}, {"type": "global_pool"}]
    losses, stats = losses_over_training(layers, {"kind": "infonce_grid", "steps": 5, "negatives": 8}, x, None, None,
                                         patches={"size": 4, "stride": 4}, lr=3e-2)
    assert falls(losses) and stats["accuracy"] > 0.2


def test_infonce_grid_on_a_feature_map():
    x = stripes()
    losses, _ = losses_over_training([{"type": "conv", "channels": 8, "kernel": 3}, {"type": "maxpool"}],
                                     {"kind": "infonce_grid", "steps": 3, "negatives": 8}, x, None, None, lr=3e-2)
    assert falls(losses)


def test_infonce_grid_skips_steps_past_the_grid():
    obj = build_objective(objective_cfg(kind="infonce_grid", steps=5), (16, 8, 1, 1), None)  # 4x4 grid: offsets 2, 3
    assert len(obj.w_k) == 2 and not obj.needs_pairs
    assert len(build_objective(objective_cfg(kind="infonce_grid", steps=5), (49, 8, 2, 2), None).w_k) == 5
    loss, _ = obj(torch.randn(3, 16, 8, 1, 1), None, None)
    assert torch.isfinite(loss)


def test_sfa_loss_falls():
    x, x_pos, labels = clustered(per_cluster=16)
    losses, _ = losses_over_training([{"type": "linear", "features": 4}], {"kind": "sfa"}, x, x_pos, labels)
    assert falls(losses)


def test_vinfonce_loss_falls():
    x, x_pos, labels = clustered()
    losses, stats = losses_over_training([{"type": "linear", "features": 16, "activation": "relu"}],
                                         {"kind": "vinfonce", "latent_dim": 8, "temperature": 0.2}, x, x_pos, labels)
    assert falls(losses) and stats["kl"] >= 0


def test_supervised_local_loss_falls():
    x, _, labels = clustered()
    losses, stats = losses_over_training([{"type": "linear", "features": 8, "activation": "relu"}],
                                         {"kind": "supervised_local"}, x, None, labels, num_classes=8)
    assert falls(losses, 0.8) and stats["accuracy"] > 0.5


@pytest.mark.parametrize("kind", ["infonce_pair", "sfa", "vinfonce"])
def test_patch_grid_pairing_pairs_neighbouring_positions(kind):
    x = stripes(n=8)
    losses, _ = losses_over_training([{"type": "conv", "channels": 4, "kernel": 3}, {"type": "maxpool"}],
                                     {"kind": kind, "pairing": "patch_grid"}, x, None, None, steps=5)
    assert len(losses) == 5


# ---------------------------------------------------------------- maths


def test_infonce_stays_finite_with_huge_logits():
    scores = torch.randn(8, 8, dtype=torch.float32) * 1e4
    scores.requires_grad_(True)
    loss, acc = info_nce_from_scores(scores)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()

    obj = build_objective(objective_cfg(kind="infonce_pair", temperature=1e-4), (5,), None)  # cosine / 1e-4: |logit| ~ 1e4
    a = torch.randn(8, 5, requires_grad=True)
    loss, _ = obj(a, a.detach() + 0.1 * torch.randn(8, 5), None)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()

    obj = build_objective(objective_cfg(kind="infonce_pair", bilinear=True, temperature=1.0), (5,), None)
    loss, _ = obj(1e4 * torch.randn(8, 5), 1e4 * torch.randn(8, 5), None)
    assert torch.isfinite(loss)


def test_infonce_is_low_for_matching_pairs():
    a = torch.eye(6)
    loss, acc = info_nce_from_scores(a @ a.T / 0.01)
    assert loss < 1e-3 and acc == 1.0


def test_whitened_outputs_have_identity_covariance():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(5, 5, generator=g)
    x = torch.randn(2000, 5, generator=g) @ mix + 3.0  # correlated, off-centre
    w = whiten(x, eps=1e-6)
    cov = w.T @ w / (len(w) - 1)
    assert torch.allclose(w.mean(0), torch.zeros(5), atol=1e-4)
    assert torch.allclose(cov, torch.eye(5), atol=1e-3)


def test_sfa_raises_when_batch_does_not_exceed_width():
    obj = build_objective(objective_cfg(kind="sfa"), (16,), None)
    with pytest.raises(TrainingError, match="must exceed"):
        obj(torch.randn(8, 16), torch.randn(8, 16), None)


def test_vinfonce_kl_is_zero_for_the_prior():
    assert torch.equal(gaussian_kl(torch.zeros(4, 3), torch.zeros(4, 3)), torch.zeros(4))
    assert (gaussian_kl(torch.ones(4, 3), torch.zeros(4, 3)) == 1.5).all()


def test_vinfonce_uses_the_mean_in_eval():
    obj = build_objective(objective_cfg(kind="vinfonce"), (6,), None).eval()
    z, z_pos = torch.randn(8, 6), torch.randn(8, 6)
    assert obj(z, z_pos, None)[0] == obj(z, z_pos, None)[0]


def test_flags_and_config_errors():
    assert build_objective(objective_cfg(kind="infonce_pair"), (4,), None).needs_pairs
    assert not build_objective(objective_cfg(kind="infonce_pair", pairing="patch_grid"), (4, 3, 3), None).needs_pairs
    sup = build_objective(objective_cfg(kind="supervised_local"), (4,), 3)
    assert sup.needs_labels and not sup.needs_pairs
    with pytest.raises(ConfigError, match="needs a grid"):
        build_objective(objective_cfg(kind="infonce_grid"), (8,), None)
    with pytest.raises(ConfigError, match="at least 3"):
        build_objective(objective_cfg(kind="infonce_grid"), (4, 8, 1, 1), None)
    with pytest.raises(ConfigError, match="labels"):
        build_objective(objective_cfg(kind="supervised_local"), (4,), None)
    with pytest.raises(ConfigError, match="vector"):
        build_objective(objective_cfg(kind="sfa", pairing="patch_grid"), (4,), None)
    with pytest.raises(TrainingError):
        sup(torch.randn(2, 4), None, None)


def test_same_group_rows_are_not_negatives():
    from pipeline.objectives.infonce import info_nce_from_scores

    scores = torch.tensor([[5.0, 5.0, 0.0], [5.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    plain, _ = info_nce_from_scores(scores)
    masked, acc = info_nce_from_scores(scores, groups=torch.tensor([7, 7, 8]))
    # Rows 0 and 1 show the same object: masking their cross scores removes the false negatives.
    assert masked < plain and acc == 1.0
    assert torch.isfinite(masked)
