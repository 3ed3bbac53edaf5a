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


@pytest.mark.parametrize("spec,in_shape,pairs", [(GRID, (1, 20, 20), False), (PAIRS, (1, 12, 12), True)],
                         ids=["infonce_grid", "infonce_pair"])
@pytest.mark.parametrize("micro_batch", [1, 4])
def test_micro_batches_give_the_whole_batch_gradient(spec, in_shape, pairs, micro_batch):
    loss, whole = gradients(spec, in_shape, None, pairs)
    loss_mb, micro = gradients(spec, in_shape, micro_batch, pairs)
    assert loss_mb == pytest.approx(loss, rel=1e-6)
    assert whole.keys() == micro.keys() and any(n.startswith("objective.") for n in whole) == (spec is GRID)
    for name in whole:
        assert torch.allclose(micro[name], whole[name], rtol=1e-4, atol=1e-6), name


def test_an_objective_that_runs_the_module_itself_takes_the_plain_step():
    loss, whole = gradients(AUTOENCODER, (1, 8, 8), None, False)
    loss_mb, micro = gradients(AUTOENCODER, (1, 8, 8), 2, False)
    assert loss_mb == loss and all(torch.equal(micro[n], whole[n]) for n in whole)


def test_the_second_pass_holds_one_micro_batch_of_activations():
    """Every forward with autograd in the second pass sees at most micro_batch samples."""
    cfg = ModuleConfig.model_validate(PAIRS)
    module = build_module(cfg, (1, 12, 12))
    objective = build_objective(cfg.objective, infer_shape(cfg, (1, 12, 12))[0], None)
    seen = []
    module.register_forward_hook(lambda m, args, out: seen.append((len(args[0]), torch.is_grad_enabled())))
    _, backward = step_loss(objective, module, torch.rand(5, 1, 12, 12), torch.rand(5, 1, 12, 12), None, None,
                            micro_batch=3)
    backward()
    assert seen == [(3, False), (3, False), (3, False), (1, False), (3, True), (3, True), (3, True), (1, True)]


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
    assert alive == [False, False, False, False]
