import pickle

import pytest
import torch

from pipeline.nn.modules import ShapeError, build_module, grid_features, infer_shape, pool_to_vector, to_patches
from schemas.config import ModuleConfig


def module(*layers, patches=None, normalize=None) -> ModuleConfig:
    return ModuleConfig.model_validate({"layers": list(layers), "patches": patches, "normalize": normalize})


def conv(ch, k=5, **kw):
    return {"type": "conv", "channels": ch, "kernel": k, **kw}


def run(cfg: ModuleConfig, in_shape, batch=2):
    torch.manual_seed(0)
    mod = build_module(cfg, in_shape)
    y = mod(torch.rand(batch, *in_shape))
    return tuple(y.shape[1:]), sum(p.numel() for p in mod.parameters())


CASES = [
    (module(conv(8), {"type": "maxpool"}), (1, 16, 16)),
    (module(conv(8, 3, stride=2, padding=0), {"type": "avgpool", "kernel": 3, "stride": 2}), (3, 17, 15)),
    (module(conv(4, 4), conv(6, 2, padding=1, activation="none")), (1, 9, 9)),
    (module(conv(8), {"type": "global_pool", "mode": "max"}, {"type": "linear", "features": 3}), (1, 12, 12)),
    (module(conv(4), {"type": "flatten"}, {"type": "linear", "features": 16, "activation": "relu"},
            {"type": "linear", "features": 3}), (2, 8, 8)),
    (module({"type": "global_pool"}, {"type": "linear", "features": 5}), (7, 4, 4)),
    (module({"type": "linear", "features": 5}, {"type": "flatten"}), (12,)),
    (module({"type": "stem", "channels": 16}, {"type": "resnet_stage", "block": "basic", "channels": 16, "blocks": 2},
            {"type": "resnet_stage", "block": "basic", "channels": 32, "blocks": 2, "stride": 2}), (3, 15, 15)),
    (module(conv(8, 3), {"type": "maxpool"}, patches={"size": 16, "stride": 8}), (1, 64, 64)),
    (module(conv(4, 3), {"type": "global_pool"}, {"type": "linear", "features": 6}, patches={"size": 8, "stride": 4}),
     (1, 16, 16)),
    (module(conv(4, 3), {"type": "flatten"}, patches={"size": 4, "stride": 4}), (2, 8, 12)),
    (module(conv(5, 3), {"type": "maxpool"}), (49, 8, 4, 4)),  # above a patched module: per patch
    (module({"type": "linear", "features": 3}), (9, 6, 1, 1)),
    (module(conv(4), {"type": "maxpool"}, normalize={"mode": "local"}), (3, 12, 12)),
    (module({"type": "linear", "features": 4}, normalize={"mode": "image"}), (10,)),
    (module(conv(4, 3), patches={"size": 8, "stride": 4}, normalize={"kernel": 3}), (1, 16, 16)),
    (module(conv(5, 3), normalize={"kernel": 3}), (49, 8, 4, 4)),  # above a patched module: per patch
]


@pytest.mark.parametrize("cfg,in_shape", CASES)
def test_infer_shape_matches_forward(cfg, in_shape):
    assert infer_shape(cfg, in_shape) == run(cfg, in_shape)


def test_gim_patches_give_7x7_grid():
    cfg = module(conv(8, 3), patches={"size": 16, "stride": 8})
    out, _ = infer_shape(cfg, (1, 64, 64))
    assert out == (49, 8, 16, 16)
    assert run(cfg, (1, 64, 64))[0] == out


RESNET50_SPLIT = [
    module({"type": "stem", "channels": 64},
           {"type": "resnet_stage", "block": "bottleneck", "channels": 64, "blocks": 3, "stride": 1},
           patches={"size": 16, "stride": 8}),
    module({"type": "resnet_stage", "block": "bottleneck", "channels": 128, "blocks": 4, "stride": 2}),
    module({"type": "resnet_stage", "block": "bottleneck", "channels": 256, "blocks": 6, "stride": 2}),
]


def test_resnet50_split_in_three_modules():
    shape = (1, 64, 64)
    x = torch.rand(1, *shape)
    expected = [(49, 256, 16, 16), (49, 512, 8, 8), (49, 1024, 4, 4)]
    for cfg, want in zip(RESNET50_SPLIT, expected):
        out, n_params = infer_shape(cfg, shape)
        mod = build_module(cfg, shape)
        with torch.no_grad():
            x = mod(x)
        assert out == want == tuple(x.shape[1:])
        assert n_params == sum(p.numel() for p in mod.parameters())
        shape = out
    # the bottleneck counts: 3 + 4 + 6 blocks, each three convs (+ a projection in each stage's first block)
    convs = sum(isinstance(m, torch.nn.Conv2d) for cfg, s in zip(RESNET50_SPLIT, [(1, 64, 64), (49, 256, 16, 16),
                                                                               (49, 512, 8, 8)])
                for m in build_module(cfg, s).modules())
    assert convs == 1 + 3 * 13 + 3


def test_patches_are_cut_row_major():
    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    p = to_patches(x, 4, 2)  # 3x3 grid
    assert p.shape == (1, 9, 1, 4, 4)
    assert torch.equal(p[0, 1, 0], x[0, 0, 0:4, 2:6])  # row 0, column 1
    assert torch.equal(p[0, 3, 0], x[0, 0, 2:6, 0:4])  # row 1, column 0


@pytest.mark.parametrize("cfg,in_shape,index,words", [
    (module({"type": "linear", "features": 3}, conv(4)), (8, 4, 4), 0, "add flatten or global_pool"),
    (module({"type": "flatten"}, conv(4)), (8, 4, 4), 1, "vector"),
    (module(conv(4), {"type": "maxpool", "kernel": 8}), (1, 6, 6), 1, "larger than the 6x6"),
    (module(conv(4, 7, padding=0)), (1, 5, 5), 0, "larger than"),
    (module({"type": "global_pool"}, {"type": "global_pool"}), (3, 4, 4), 1, "vector"),
    (module({"type": "resnet_stage", "channels": 4, "blocks": 1}), (10,), 0, "vector"),
    (module(conv(4), patches={"size": 16, "stride": 8}), (10,), None, "image"),
    (module(conv(4), patches={"size": 16, "stride": 8}), (1, 12, 12), None, "larger than the 12x12"),
    (module(conv(4), patches={"size": 4, "stride": 4}), (9, 1, 8, 8), None, "already cut"),
    (module(conv(4), normalize={"mode": "local"}), (10,), None, "use mode image"),
    (module(conv(4), normalize={"kernel": 4}), (1, 8, 8), None, "odd"),
    (module(conv(4), normalize={"kernel": 13}), (1, 6, 6), None, "smaller than the 6x6"),
])
def test_shape_errors_name_the_layer(cfg, in_shape, index, words):
    with pytest.raises(ShapeError) as info:
        infer_shape(cfg, in_shape)
    [(where, message)] = info.value.problems
    assert where == index and words in message
    with pytest.raises(ShapeError):
        build_module(cfg, in_shape)


def test_shape_error_pickles():
    err = ShapeError([(2, "bad"), (None, "worse")])
    back = pickle.loads(pickle.dumps(err))
    assert back.problems == err.problems and str(back) == str(err)


def test_pool_to_vector_and_grid_features_shapes():
    assert pool_to_vector(torch.rand(2, 5)).shape == (2, 5)
    assert pool_to_vector(torch.rand(2, 5, 3, 3)).shape == (2, 5)
    z = torch.rand(2, 49, 5, 3, 3)
    assert pool_to_vector(z).shape == (2, 5)
    g = grid_features(z)
    assert g.shape == (2, 5, 7, 7)
    # patch p = row * 7 + col lands at g[:, :, row, col]
    assert torch.allclose(g[1, :, 2, 3], z[1, 2 * 7 + 3].mean(dim=(1, 2)))
    assert grid_features(torch.rand(2, 5, 4, 6)).shape == (2, 5, 4, 6)


@pytest.mark.parametrize("cfg,in_shape", [(RESNET50_SPLIT[0], (1, 32, 32)), (RESNET50_SPLIT[1], (4, 256, 8, 8)),
                                          CASES[1], CASES[7], CASES[4]])
def test_channels_last_inside_computes_what_nchw_computes(cfg, in_shape):
    """The module keeps its maps and conv weights NHWC (and sums its residuals in place): outputs, input and
    weight gradients as a plain NCHW copy of it gives; its output comes back in the usual layout; its state dict
    loads into a fresh module."""
    torch.manual_seed(0)
    mod = build_module(cfg, in_shape)
    plain = build_module(cfg, in_shape)
    plain.load_state_dict(mod.state_dict())
    plain.to(memory_format=torch.contiguous_format)
    plain.nhwc = False  # its input and output gradient not turned at the edges either
    convs = [p for p in mod.parameters() if p.ndim == 4 and p.shape[1] > 1]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(not p.is_contiguous() for p in convs)  # (a 1x1 kernel's weight is both)
    assert all(p.is_contiguous() for p in plain.parameters())
    x = torch.rand(3, *in_shape, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_(True)
    y, y_plain = mod(x), plain(x_plain)
    assert y.is_contiguous()
    torch.testing.assert_close(y, y_plain, rtol=1e-4, atol=1e-5)
    g = torch.rand_like(y)
    y.backward(g)
    y_plain.backward(g)
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-4, atol=1e-5)
    for (name, p), p_plain in zip(mod.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, p_plain.grad, rtol=1e-4, atol=1e-4, msg=name)
    if y.ndim == 5:  # through the grid objective's pooling too, whose gradient arrives as a broadcast view
        for t in (x, x_plain, *mod.parameters(), *plain.parameters()):
            t.grad = None
        (grid_features(mod(x)) ** 2).sum().backward()
        (grid_features(plain(x_plain)) ** 2).sum().backward()
        torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-4, atol=1e-5)
        for (name, p), p_plain in zip(mod.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, p_plain.grad, rtol=1e-4, atol=1e-4, msg=name)
    fresh = build_module(cfg, in_shape)
    fresh.load_state_dict({k: v.contiguous() for k, v in mod.state_dict().items()})  # as a checkpoint stores them
    torch.testing.assert_close(fresh(x.detach()), y.detach())


def test_patch_mean_gradient_is_the_mean_s():
    """grid_features pools each patch with PatchMean, whose gradient is a broadcast view: the same values as
    mean's, and viewable as the module's (B*P, C, h, w) map without a copy."""
    z = torch.rand(2, 9, 3, 4, 4, requires_grad=True)
    z_ref = z.detach().clone().requires_grad_(True)
    w = torch.rand(2, 3, 3, 3)
    g = grid_features(z)
    g_ref = z_ref.mean(dim=(3, 4)).reshape(2, 3, 3, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(g, g_ref)
    (grad,) = torch.autograd.grad((g * w).sum(), z)
    (grad_ref,) = torch.autograd.grad((g_ref * w).sum(), z_ref)
    torch.testing.assert_close(grad, grad_ref)
    assert grad.stride()[3:] == (0, 0)  # one value a patch and channel, not a written map
    assert grad.flatten(0, 1).data_ptr() == grad.data_ptr()  # the module's view of it is no copy


@pytest.mark.parametrize("mode", ["local", "image"])
def test_normalize_removes_gain_and_offset(mode):
    """The same scene under a brighter, higher-contrast light comes out the same: lighting a contrast-normalised
    stack need not learn (held-out lightings in the pose preset)."""
    mod = build_module(module({"type": "flatten"}, normalize={"mode": mode}), (2, 16, 16))
    torch.manual_seed(0)
    x = torch.rand(3, 2, 16, 16)
    y = mod(x).reshape(x.shape)
    assert torch.allclose(mod(2.5 * x + 0.3).reshape(x.shape), y, atol=1e-4)
    assert not torch.allclose(y, x)
    if mode == "image":
        assert torch.allclose(y.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5)
        assert torch.allclose(y.std(dim=(1, 2, 3)), torch.ones(3), atol=1e-4)
    else:
        # Local: one texture, its left half lit at a fifth of the right's light. A global mean/std keeps the halves'
        # contrast 1 : 5; the local one evens it out (to ~1 : 2.3 here: the floor keeps dim regions from blowing up).
        tex = torch.rand(1, 1, 16, 16)
        lit = tex * torch.cat([torch.full((8,), 0.2), torch.full((8,), 1.0)])[None, None, None, :]
        z = build_module(module({"type": "flatten"}, normalize={"kernel": 3}), (1, 16, 16))(lit).reshape(lit.shape)
        ratio = lambda t: (t[..., 2:14, 2:5].std() / t[..., 2:14, 11:14].std()).item()  # noqa: E731
        assert ratio(lit) < 0.25 and ratio(z) > 1.5 * ratio(lit)
    assert sum(p.numel() for p in mod.parameters()) == 0 and not mod.state_dict()


def test_local_normalize_matmuls_equal_the_reflect_padded_gaussian_conv():
    """The blur as two matmuls (blocks.blur_matrix) is the 2-D Gaussian window over a reflect-padded map, for the
    configured size and for another one (built on the fly)."""
    import torch.nn.functional as F

    from pipeline.nn.blocks import Normalize

    torch.manual_seed(0)
    for c, h, w in ((3, 20, 20), (1, 11, 7)):
        x = torch.rand(4, c, h, w)
        r = torch.arange(9, dtype=torch.float32) - 4
        g = torch.exp(-r**2 / 8)  # sigma (9 - 1) / 4 = 2
        window = (g[:, None] * g[None] / (g.sum() ** 2 * c)).expand(1, c, 9, 9)
        local_mean = lambda t: F.conv2d(F.pad(t, (4, 4, 4, 4), mode="reflect"), window)  # noqa: E731
        centred = x - local_mean(x)
        sd = local_mean(centred**2).sqrt()
        expected = centred / torch.maximum(sd, sd.mean(dim=(2, 3), keepdim=True)).clamp_min(1e-4)
        assert torch.allclose(Normalize(9, (h, w))(x), expected, atol=1e-5)
        assert torch.allclose(Normalize(9, (32, 32))(x), expected, atol=1e-5)


def test_a_fractional_window_scales_with_the_image():
    """normalize.kernel 0.72 is 11, 23 and 35 px at 16, 32 and 48 px (the odd count nearest the fraction of the
    side, at least 3), and normalises exactly as the window given in pixels; a map too small for 3 is refused."""
    torch.manual_seed(0)
    for side, pixels in ((16, 11), (32, 23), (48, 35), (5, 3)):
        x = torch.rand(2, 1, side, side)
        frac = build_module(module({"type": "flatten"}, normalize={"kernel": 0.72}), (1, side, side))
        fixed = build_module(module({"type": "flatten"}, normalize={"kernel": pixels}), (1, side, side))
        assert torch.equal(frac(x), fixed(x))
    with pytest.raises(ShapeError, match=r"1x1 input, found 0.5 \(3 px\)"):
        build_module(module({"type": "flatten"}, normalize={"kernel": 0.5}), (1, 1, 1))
