import pytest
import torch

from pipeline.errors import ConfigError, TrainingError
from pipeline.nn.modules import build_module, infer_shape
from pipeline.nn.objectives import LocalObjective, build_objective, local_loss
from pipeline.nn.objectives.infonce import info_nce_from_scores
from pipeline.nn.objectives.sfa import whiten
from pipeline.nn.objectives.variational import gaussian_kl
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
    losses, stats, _, _ = train_new(layers, objective, x, x_pos, steps=steps, lr=lr, patches=patches, labels=labels,
                                    num_classes=num_classes)
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


def test_infonce_pair_pool_flatten_scores_where_features_are():
    # Each sample a map with one hot position per channel, a different one per sample: every map has the same
    # mean over positions, so the mean-pooled pair loss cannot tell the samples apart and the flattened one can.
    n, c, h, w = 8, 2, 3, 3
    z = torch.zeros(n, c, h * w)
    for i in range(n):
        z[i, 0, i], z[i, 1, (2 * i) % (h * w)] = 1.0, 1.0
    z = z.reshape(n, c, h, w)
    mean = build_objective(objective_cfg(kind="infonce_pair", temperature=0.1), (c, h, w), None)
    flat = build_objective(objective_cfg(kind="infonce_pair", temperature=0.1, pool="flatten"), (c, h, w), None)
    chance = torch.log(torch.tensor(float(n)))
    assert mean(z, z.clone(), None)[0].item() == pytest.approx(chance.item(), abs=1e-3)
    assert flat(z, z.clone(), None)[0].item() < 0.5 * chance.item()
    head = build_objective(objective_cfg(kind="infonce_pair", pool="flatten", projection_dim=4, projection_hidden=5),
                           (c, h, w), None).head
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (c * h * w, 5, 4)
    with pytest.raises(ConfigError, match="objective.projection_hidden"):
        build_objective(objective_cfg(kind="infonce_pair", projection_hidden=5), (c, h, w), None)
    with pytest.raises(ConfigError, match="objective.pool"):
        build_objective(objective_cfg(kind="infonce_pair", pairing="patch_grid", pool="flatten"), (c, h, w), None)


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
    from pipeline.nn.objectives.infonce import info_nce_from_scores

    scores = torch.tensor([[5.0, 5.0, 0.0], [5.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    plain, _ = info_nce_from_scores(scores)
    masked, acc = info_nce_from_scores(scores, groups=torch.tensor([7, 7, 8]))
    # Rows 0 and 1 show the same object: masking their cross scores removes the false negatives.
    assert masked < plain and acc == 1.0
    assert torch.isfinite(masked)


# ---------------------------------------------------------------- cpc_ar, dim, moco, autoencoder, aet


def train_new(layers, objective, x, x_pos=None, steps=20, lr=1e-2, groups=None, patches=None, labels=None,
              num_classes=None):
    """Train a module with its objective for ``steps`` steps, called as the trainer calls it (``local_loss``,
    then ``after_step``). Returns (losses, last stats, objective, module)."""
    torch.manual_seed(0)
    cfg = ModuleConfig.model_validate({"layers": layers, "objective": objective, "patches": patches})
    in_shape = tuple(x.shape[1:])
    out_shape, _ = infer_shape(cfg, in_shape)
    mod = build_module(cfg, in_shape)
    obj = build_objective(cfg.objective, out_shape, num_classes, in_shape=in_shape, module=mod)
    assert isinstance(obj, LocalObjective)
    opt = torch.optim.Adam([*mod.parameters(), *obj.parameters()], lr=lr)
    losses = []
    for _ in range(steps):
        loss, stats = local_loss(obj, mod, x, x_pos if obj.needs_pairs else None,
                                 labels if obj.needs_labels else None, groups)
        assert all(isinstance(v, float) for v in stats.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hasattr(obj, "after_step"):
            obj.after_step(mod)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    return losses, stats, obj, mod


def sequences(n=16, channels=2, length=24, seed=0):
    """(n, C, T) sinusoids with a sample-specific frequency and phase: the next steps follow from the past."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float32)
    freq = 0.2 + 0.8 * torch.rand(n, channels, 1, generator=g)
    phase = 6.28 * torch.rand(n, channels, 1, generator=g)
    return torch.sin(freq * t + phase) + 0.05 * torch.randn(n, channels, length, generator=g)


class _SeqModule(torch.nn.Module):
    """A 1x1 conv over a (B, C, T) sequence: the objective, not the module, is under test here."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = torch.nn.Conv1d(c_in, c_out, 1)

    def forward(self, x):
        return torch.relu(self.conv(x))


@pytest.mark.parametrize("context", ["gru", "masked_conv"])
def test_cpc_ar_loss_falls_on_a_feature_map(context):
    x = stripes()
    losses, stats, _, _ = train_new([{"type": "conv", "channels": 8, "kernel": 3}, {"type": "maxpool"}],
                                    {"kind": "cpc_ar", "context": context, "steps": 2, "negatives": 8}, x, lr=3e-2)
    assert falls(losses) and 0 <= stats["accuracy"] <= 1


def test_cpc_ar_on_a_patch_grid():
    x = stripes()
    losses, _, obj, _ = train_new([{"type": "conv", "channels": 8, "kernel": 3}, {"type": "global_pool"}],
                                  {"kind": "cpc_ar", "steps": 5, "negatives": 8}, x, patches={"size": 4, "stride": 4},
                                  lr=3e-2)
    assert obj.offsets == [1, 2, 3]  # a 4x4 grid: steps past row 4 are not built
    assert falls(losses)


@pytest.mark.parametrize("bptt_steps", [None, 4])
def test_cpc_ar_loss_falls_on_a_sequence(bptt_steps):
    x = sequences()
    torch.manual_seed(0)
    mod = _SeqModule(2, 8)
    obj = build_objective(objective_cfg(kind="cpc_ar", steps=3, negatives=8, bptt_steps=bptt_steps), (8, 24), None)
    opt = torch.optim.Adam([*mod.parameters(), *obj.parameters()], lr=3e-2)
    losses = []
    for _ in range(20):
        loss, _ = obj(mod(x), None, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert falls(losses)


def test_cpc_ar_truncated_bptt_blocks_gradients_across_chunks():
    from pipeline.nn.objectives.cpc import gru_context

    gru = torch.nn.GRU(3, 4, batch_first=True)
    g = torch.randn(2, 3, 8, 1, requires_grad=True)  # (B, C, S, L)
    gru_context(gru, g, bptt_steps=4)[:, :, 7].sum().backward()
    assert g.grad[:, :, :4].abs().sum() == 0 and g.grad[:, :, 4:].abs().sum() > 0
    g.grad = None
    gru_context(gru, g, bptt_steps=None)[:, :, 7].sum().backward()
    assert g.grad[:, :, :4].abs().sum() > 0


def test_cpc_ar_masked_conv_is_causal():
    from pipeline.nn.objectives.cpc import CausalConvContext

    ctx = CausalConvContext(2, 4, kernel=3)
    g = torch.randn(1, 2, 6, 5)
    later = g.clone()
    later[:, :, 3:] = torch.randn(1, 2, 3, 5)  # change rows 3..5
    assert torch.allclose(ctx(g)[:, :, :3], ctx(later)[:, :, :3])  # rows 0..2 see only rows <= themselves


@pytest.mark.parametrize("estimator", ["infonce", "jsd"])
def test_dim_loss_falls(estimator):
    # Every location of an image carries its colour, so a local feature tells which global summary it belongs to
    # (pixel-wise random images would share nothing between one location and the whole).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, 1, 1, generator=g) + 0.3 * torch.randn(16, 4, 8, 8, generator=g)
    losses, stats, _, _ = train_new([{"type": "conv", "channels": 8, "kernel": 3}],
                                    {"kind": "dim", "estimator": estimator, "projection_dim": 8}, x)
    assert falls(losses) and 0 <= stats["accuracy"] <= 1


def test_dim_estimators_prefer_matching_locals():
    from pipeline.nn.objectives.dim import dim_infonce, dim_jsd

    good = torch.full((4, 4, 3), -5.0)
    good[torch.arange(4), torch.arange(4)] = 5.0  # positives (same image) high
    bad = -good
    for loss_fn in (dim_infonce, dim_jsd):
        low, acc = loss_fn(good)
        high, _ = loss_fn(bad)
        assert low < high and acc == 1.0


def test_moco_loss_falls_and_updates_key_encoder_and_queue():
    x, x_pos, labels = clustered(shape=(1, 8, 8))
    layers = [{"type": "conv", "channels": 8, "kernel": 3}, {"type": "maxpool"}, {"type": "flatten"},
              {"type": "linear", "features": 16}]
    losses, stats, obj, mod = train_new(layers, {"kind": "moco", "temperature": 0.2, "momentum": 0.99,
                                                 "queue_size": 48, "projection_dim": 8}, x, x_pos, groups=labels,
                                        steps=25)
    # The first step scores against the random initial queue (easy negatives); from the second on, the queue
    # holds real keys (48 < 2B, so always the last batch's), and the loss must fall from there.
    assert falls(losses[1:]) and 0 <= stats["accuracy"] <= 1
    assert int(obj.queue_ptr) == 0  # 2B = 128 keys per step >= 48: each step replaces the whole queue
    assert set(obj.queue_groups.tolist()) <= set(labels.tolist())
    obj._enqueue(torch.zeros(5, 8), None)
    assert int(obj.queue_ptr) == 5 and (obj.queue_groups[:5] == -1).all() and (obj.queue[:5] == 0).all()
    # The key encoder moved towards the module but is not trained by gradient.
    for pk, pq in zip(obj.key_encoder.parameters(), mod.parameters()):
        assert not pk.requires_grad and not torch.equal(pk, pq)
    assert not any(p.requires_grad for p in obj.key_encoder.parameters())


def test_moco_state_survives_a_checkpoint(tmp_path):
    from pipeline.store import checkpoint
    from pipeline.store import Store

    x, x_pos, labels = clustered()
    losses, _, obj, mod = train_new([{"type": "linear", "features": 8}], {"kind": "moco", "queue_size": 32}, x, x_pos,
                                    steps=3)
    store = Store(str(tmp_path), "run")
    checkpoint.save(store, "checkpoints/m1", 1, mod, obj, None, {})
    cfg = ModuleConfig.model_validate({"layers": [{"type": "linear", "features": 8}], "objective": {"kind": "moco",
                                                                                                 "queue_size": 32}})
    torch.manual_seed(1)
    mod2 = build_module(cfg, (16,))
    obj2 = build_objective(cfg.objective, (8,), None, in_shape=(16,), module=mod2)
    checkpoint.restore(store, checkpoint.latest(store, "checkpoints/m1"), mod2, obj2)
    for key, value in obj.state_dict().items():
        assert torch.equal(value, obj2.state_dict()[key]), key
    state = set(obj2.state_dict())
    assert {"queue", "queue_ptr", "queue_groups"} <= state and any(k.startswith("key_encoder.") for k in state)


@pytest.mark.parametrize("layers", [
    [{"type": "conv", "channels": 8, "kernel": 3}, {"type": "maxpool"}],  # map -> map: resize-conv decoder
    [{"type": "flatten"}, {"type": "linear", "features": 16, "activation": "relu"}],  # map -> vector: MLP decoder
])
def test_autoencoder_loss_falls(layers):
    x, _, _ = clustered(shape=(1, 8, 8))
    losses, stats, _, _ = train_new(layers, {"kind": "autoencoder", "hidden": 16}, x)
    assert falls(losses) and stats["mse"] >= 0


def test_autoencoder_loss_falls_on_a_sequence():
    x = sequences(length=12)  # (16, 2, 12) -> a strided conv1d module -> (4, 6): the decoder rebuilds (2, 12)
    layers = [{"type": "conv1d", "channels": 4, "kernel": 4, "stride": 2, "padding": 1}]
    losses, stats, _, _ = train_new(layers, {"kind": "autoencoder", "hidden": 8}, x)
    assert falls(losses) and stats["mse"] >= 0


def test_aet_loss_falls_and_transforms_are_affine():
    from pipeline.nn.objectives.aet import random_affine, transform_images

    theta = random_affine(4, rotation=0, translation=0, scale=(1, 1), shear=0)
    assert torch.allclose(theta, torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(4, 2, 3))
    img = torch.rand(4, 1, 8, 8)
    assert torch.allclose(transform_images(img, theta), img, atol=1e-5)
    x, _, _ = clustered(shape=(1, 12, 12), noise=0.2)
    x = x.clamp(-2, 2)
    losses, _, _, _ = train_new([{"type": "conv", "channels": 8, "kernel": 3}, {"type": "maxpool"}],
                                {"kind": "aet", "rotation": 30, "hidden": 32}, x, steps=30, lr=3e-3)
    assert falls(losses)


def test_new_objectives_config_errors():
    with pytest.raises(ConfigError, match="vector"):
        build_objective(objective_cfg(kind="cpc_ar"), (8,), None)
    with pytest.raises(ConfigError, match="at least 2 steps"):
        build_objective(objective_cfg(kind="cpc_ar"), (8, 1, 4), None)
    with pytest.raises(ConfigError, match="gru"):
        build_objective(objective_cfg(kind="cpc_ar", context="masked_conv", bptt_steps=2), (8, 4, 4), None)
    with pytest.raises(ConfigError, match="no locations"):
        build_objective(objective_cfg(kind="dim"), (8,), None)
    with pytest.raises(ConfigError, match="patch_grid"):
        build_objective(objective_cfg(kind="moco", pairing="patch_grid"), (8, 4, 4), None, module=torch.nn.Identity())
    with pytest.raises(ConfigError, match="module"):
        build_objective(objective_cfg(kind="moco"), (8,), None)
    with pytest.raises(ConfigError, match="input shape"):
        build_objective(objective_cfg(kind="autoencoder"), (8,), None)
    with pytest.raises(ConfigError, match="objective.hidden"):
        build_objective(objective_cfg(kind="autoencoder", hidden=4096), (64,), None, in_shape=(3, 64, 64))
    with pytest.raises(ConfigError, match="images"):
        build_objective(objective_cfg(kind="aet"), (8,), None, in_shape=(16,))
