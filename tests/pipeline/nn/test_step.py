import pytest
import torch

from pipeline.nn.modules import build_module, infer_shape
from pipeline.nn.objectives import build_objective
from pipeline.nn.step import step_loss
from schemas.config import ModuleConfig

GRID = {"patches": {"size": 8, "stride": 4},
        "layers": [{"type": "stem", "channels": 8},
                   {"type": "resnet_stage", "block": "bottleneck", "channels": 4, "blocks": 1, "stride": 1}],
        "objective": {"kind": "infonce_grid", "steps": 2, "negatives": 4}}
PAIRS = {"layers": [{"type": "conv", "channels": 8, "kernel": 3}, {"type": "global_pool"}],
         "objective": {"kind": "infonce_pair", "pairing": "same_instance"}}
AUTOENCODER = {"layers": [{"type": "conv", "channels": 4, "kernel": 3}], "objective": {"kind": "autoencoder"}}


def gradients(spec: dict, in_shape, micro_batch, pairs: bool, batch: int = 6):
    cfg = ModuleConfig.model_validate(spec)
    out_shape, _ = infer_shape(cfg, in_shape)
    torch.manual_seed(0)
    module = build_module(cfg, in_shape)
    objective = build_objective(cfg.objective, out_shape, None, in_shape=in_shape, module=module)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, *in_shape, generator=g)
    x_pos = torch.rand(batch, *in_shape, generator=g) if pairs else None
    torch.manual_seed(2)  # the objective's own draws (infonce_grid's negatives) are the same on both sides
    loss, backward = step_loss(objective, module, x, x_pos, None, None, micro_batch=micro_batch)
    backward()
    named = list(module.named_parameters()) + [("objective." + n, p) for n, p in objective.named_parameters()]
    return float(loss.detach()), {n: p.grad.clone() for n, p in named if p.grad is not None}


@pytest.mark.parametrize("micro_batch", [1, 4])
def test_micro_batches_give_the_whole_batch_gradient(micro_batch):
    """A loss over every pair of the batch (infonce_pair) is micro-batched without changing it."""
    loss, whole = gradients(PAIRS, (1, 12, 12), None, True)
    loss_mb, micro = gradients(PAIRS, (1, 12, 12), micro_batch, True)
    assert loss_mb == pytest.approx(loss, rel=1e-6)
    assert whole.keys() == micro.keys()
    for name in whole:
        assert torch.allclose(micro[name], whole[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("micro_batch", [1, 4])
def test_a_grid_loss_is_taken_micro_batch_by_micro_batch(micro_batch):
    """infonce_grid draws each micro-batch's negatives within it (the official GIM code's per-replica loss): the
    step's loss and gradients are those of the micro-batches' own whole steps, weighted by their share."""
    loss_mb, micro = gradients(GRID, (1, 20, 20), micro_batch, False)
    cfg = ModuleConfig.model_validate(GRID)
    out_shape, _ = infer_shape(cfg, (1, 20, 20))
    torch.manual_seed(0)
    module = build_module(cfg, (1, 20, 20))
    objective = build_objective(cfg.objective, out_shape, None, in_shape=(1, 20, 20), module=module)
    x = torch.rand(6, 1, 20, 20, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same negatives, drawn part by part in the same order
    expected = 0.0
    for part in x.split(micro_batch):
        loss, _ = step_loss(objective, module, part, None, None, None, micro_batch=None)
        (loss * len(part) / len(x)).backward()
        expected += float(loss.detach()) * len(part) / len(x)
    named = list(module.named_parameters()) + [("objective." + n, p) for n, p in objective.named_parameters()]
    assert loss_mb == pytest.approx(expected, rel=1e-6)
    assert micro.keys() == {n for n, p in named if p.grad is not None} and any(n.startswith("objective.") for n in micro)
    for name, p in named:
        assert torch.allclose(micro[name], p.grad, rtol=1e-4, atol=1e-6), name


def test_a_grid_step_runs_each_sample_once_and_touches_no_gradient_before_backward():
    """One forward with autograd per micro-batch, no second pass; the parameters' ``.grad`` stay as they are until
    ``backward`` (the trainer zeroes them in between)."""
    cfg = ModuleConfig.model_validate(GRID)
    module = build_module(cfg, (1, 20, 20))
    objective = build_objective(cfg.objective, infer_shape(cfg, (1, 20, 20))[0], None)
    seen = []
    module.register_forward_hook(lambda m, args, out: seen.append((len(args[0]), torch.is_grad_enabled())))
    loss, backward = step_loss(objective, module, torch.rand(7, 1, 20, 20), None, None, None, micro_batch=3)
    assert seen == [(3, True), (3, True), (1, True)]
    assert loss.grad_fn is None and all(p.grad is None for p in module.parameters())
    backward()
    assert all(p.grad is not None for p in module.parameters())


def test_an_objective_that_runs_the_module_itself_takes_the_plain_step():
    loss, whole = gradients(AUTOENCODER, (1, 8, 8), None, False)
    loss_mb, micro = gradients(AUTOENCODER, (1, 8, 8), 2, False)
    assert loss_mb == loss and all(torch.equal(micro[n], whole[n]) for n in whole)


def test_the_second_pass_holds_one_micro_batch_of_activations():
    """Every forward with autograd sees at most micro_batch samples; the last micro-batch runs with autograd in the
    first pass and keeps its graph through the loss, so only the others run again."""
    cfg = ModuleConfig.model_validate(PAIRS)
    module = build_module(cfg, (1, 12, 12))
    objective = build_objective(cfg.objective, infer_shape(cfg, (1, 12, 12))[0], None)
    seen = []
    module.register_forward_hook(lambda m, args, out: seen.append((len(args[0]), torch.is_grad_enabled())))
    _, backward = step_loss(objective, module, torch.rand(5, 1, 12, 12), torch.rand(5, 1, 12, 12), None, None,
                            micro_batch=3)
    backward()
    assert seen == [(3, False), (3, False), (3, False), (1, True), (3, True), (3, True), (3, True)]


def test_a_micro_batched_loss_keeps_no_batch_sized_tensor_after_its_step():
    """The loss handed back carries no graph: through it the outputs (a leaf) and their gradient stayed alive
    for as long as the trainer kept the loss (to the next step), two batch-sized tensors."""
    cfg = ModuleConfig.model_validate(PAIRS)
    module = build_module(cfg, (1, 12, 12))
    objective = build_objective(cfg.objective, infer_shape(cfg, (1, 12, 12))[0], None)
    loss, backward = step_loss(objective, module, torch.rand(5, 1, 12, 12), torch.rand(5, 1, 12, 12), None, None,
                               micro_batch=3)
    assert loss.grad_fn is None and not loss.requires_grad
    backward()
    assert any(p.grad is not None for p in module.parameters())


def test_the_second_pass_no_longer_holds_the_whole_batchs_outputs(monkeypatch):
    """The outputs of the first pass (the last ``torch.cat`` of the step) are freed before the module runs again
    with autograd: only their gradient is left of them."""
    import weakref

    cfg = ModuleConfig.model_validate(PAIRS)
    module = build_module(cfg, (1, 12, 12))
    objective = build_objective(cfg.objective, infer_shape(cfg, (1, 12, 12))[0], None)
    made, cat = [], torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: made.append(weakref.ref(out := cat(*a, **k))) or out)
    _, backward = step_loss(objective, module, torch.rand(5, 1, 12, 12), torch.rand(5, 1, 12, 12), None, None,
                            micro_batch=3)
    monkeypatch.undo()
    outputs = made[-1]
    assert outputs() is not None and outputs().shape[0] == 10  # alive until backward, for the objective's gradient
    alive = []
    module.register_forward_hook(lambda m, args, out: alive.append(outputs() is not None))
    backward()
    assert alive == [False, False, False]


def test_inputs_held_as_stored_are_made_float32_a_micro_batch_at_a_time():
    """``prepare`` turns each micro-batch of the stored (float16) batch into float32 as it runs: the module only
    sees float32 micro-batches, and the gradients are those of the batch made float32 first."""
    cfg = ModuleConfig.model_validate(PAIRS)
    torch.manual_seed(0)
    module = build_module(cfg, (1, 12, 12))
    objective = build_objective(cfg.objective, infer_shape(cfg, (1, 12, 12))[0], None)
    stored = torch.rand(5, 1, 12, 12).half(), torch.rand(5, 1, 12, 12).half()
    grads = []
    for micro, prepare, (x, x_pos) in ((None, None, [t.float() for t in stored]), (3, torch.Tensor.float, stored)):
        seen = []
        hook = module.register_forward_hook(lambda m, args, out: seen.append((len(args[0]), args[0].dtype)))
        module.zero_grad()
        _, backward = step_loss(objective, module, x, x_pos, None, None, micro_batch=micro, prepare=prepare)
        backward()
        hook.remove()
        grads.append([p.grad.clone() for p in module.parameters()])
        assert all(dtype == torch.float32 for _, dtype in seen) and (micro is None or max(n for n, _ in seen) <= 3)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(*grads))


def test_a_patch_pooling_objective_hands_back_a_broadcast_gradient():
    """The gradient a micro-batch back-propagates is autograd's own (a broadcast view of the pooled patches'), not a
    map-sized copy accumulated into the outputs' ``.grad``."""
    cfg = ModuleConfig.model_validate(GRID)
    module = build_module(cfg, (1, 20, 20))
    objective = build_objective(cfg.objective, infer_shape(cfg, (1, 20, 20))[0], None)
    strides = []

    def watch(m, args, out) -> None:
        if out.requires_grad:
            out.register_hook(lambda g: strides.append(g.stride()))

    module.register_forward_hook(watch)
    _, backward = step_loss(objective, module, torch.rand(6, 1, 20, 20), None, None, None, micro_batch=4)
    backward()
    assert len(strides) == 2 and all(s[-1] == s[-2] == 0 for s in strides)
