"""The device-resident dispatch (issue 38): the fixed-k and expert-choice plans are the exact plan's pairs in
the exact plan's order; ReMoE's bounded plan gives bitwise the exact plan's outputs and gradients, re-runs
exactly on overflow, and the model syncs with the host at most once per forward; host syncs are counted
per method in one training step (what would stall a GPU, counted on the CPU)."""

import pytest
import torch
import torch.nn.functional as F

from remoe.bench.syncs import CountSyncs
from remoe.model import METHODS, ModelConfig, Transformer, build_method, preset
from remoe.model.dispatch import bounded, group_by_expert
from remoe.model.moe import MoELayer

FIXED = ["topk", "hash", "auxfree", "ec"]


def layer_of(method, E=8, k=2, G=1, d=32, ffn=64, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=1, d_model=d, n_head=2, n_kv_head=1, ffn_hidden=ffn, vocab_size=50,
                      routing=method, experts=E, topk=k, granularity=G)
    layer = METHODS[method].build_ffn(cfg).to(dtype)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    if method == "auxfree":
        layer.router.expert_bias.normal_(std=0.3)
    return layer


@pytest.mark.parametrize("method", FIXED)
@pytest.mark.parametrize("E,k,G", [(8, 1, 1), (8, 2, 1), (4, 1, 4)])
def test_fixed_plans_are_the_nonzero_plan(method, E, k, G):
    layer = layer_of(method, E, k, G)
    x, ids = torch.randn(96, 32), torch.randint(0, 50, (96,))
    routed = layer.router(x, ids)
    assert (routed.experts is None) != (routed.tokens is None)  # the router says what it chose
    got, want = layer.plan(routed), group_by_expert(routed.gates)
    for name in ("token_idx", "expert_idx", "weights", "counts"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def stage(layer: MoELayer, x: torch.Tensor, plan):
    """Expert-stage output and the grads of x, the gates, w13 and w2 under `plan(gates)`."""
    layer.zero_grad()
    xx = x.clone().requires_grad_()
    gates = layer.router(xx).gates.detach().requires_grad_()
    y = layer.experts(xx, plan(gates))
    (y * torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype)).sum().backward()
    return [y.detach(), xx.grad, gates.grad, layer.experts.w13.grad.clone(), layer.experts.w2.grad.clone()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # grouped_mm; the per-expert loop
@pytest.mark.parametrize("ffn", [16, 64])  # gate on the hidden (f < d) and on the output (f >= d)
def test_bounded_plan_is_bitwise_the_exact_stage(dtype, ffn):
    layer = layer_of("remoe", E=8, d=32, ffn=ffn, dtype=dtype)
    x = torch.randn(64, 32, dtype=dtype)
    n = int((layer.router(x).gates != 0).sum())
    want = stage(layer, x, group_by_expert)
    for rows in (n, n + 1, n + 100):  # exactly full, one padding row, many
        got = stage(layer, x, lambda g, rows=rows: bounded(g, rows)[0])
        for a, b, name in zip(got, want, ("y", "dx", "dgates", "dw13", "dw2")):
            assert torch.equal(a, b), (rows, name)


def remoe_model(seed=0, bounded_on=True):
    torch.manual_seed(seed)
    cfg = preset("tiny", "remoe", vocab_size=128, experts=8)
    model = Transformer(cfg)
    model.set_pair_capacity(bounded_on)
    return model


def train_steps(model, steps=3, seed=1):
    """Logits, grads and routing counts of a few SGD steps (the data fixed by `seed`)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    method, record = build_method(model.cfg), []
    for _ in range(steps):
        ids = torch.randint(0, 128, (4, 33), generator=g)
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + 1e-2 * method.loss(out)
        opt.zero_grad()
        loss.backward()
        record += [out.logits.detach(), *(p.grad.clone() for p in model.parameters()),
                   model.routing_counts()[0].clone()]
        opt.step()
    return record


def test_bounded_model_trains_bitwise_as_the_exact_model():
    exact, fast = train_steps(remoe_model(bounded_on=False)), train_steps(remoe_model(bounded_on=True))
    assert len(exact) == len(fast)
    assert all(torch.equal(a, b) for a, b in zip(exact, fast))


def test_overflow_reruns_the_forward_exactly_and_is_counted():
    model, ref = remoe_model(), remoe_model(bounded_on=False)
    ids = torch.randint(0, 128, (4, 33))
    model(ids[:, :-1])  # the first forward is exact and sizes the capacities
    model.reset_routing_counts()
    for m in model.moe_layers():  # a capacity far below the pairs: every layer overflows
        m.capacity.recent.clear()
        m.capacity.recent.append(0.01)
    out = model(ids[:, :-1])
    assert model.pair_overflows == 1
    want = ref(ids[:, :-1])
    assert torch.equal(out.logits, want.logits)
    assert torch.equal(model.routing_counts()[0], ref.routing_counts()[0])  # the discarded pass is not counted
    assert torch.equal(model.routing_counts()[1], ref.routing_counts()[1])
    model.reset_routing_counts()
    model(ids[:, :-1])  # the capacity grew from what it saw: no second overflow
    assert model.pair_overflows == 1


def test_capacity_follows_recent_pairs_with_headroom():
    model = remoe_model()
    ids = torch.randint(0, 128, (2, 33))
    model(ids[:, :-1])
    for m in model.moe_layers():
        T = ids[:, :-1].numel()
        n = int(m.pairs)
        rows = m.capacity.rows(T)
        assert rows % m.capacity.quantum == 0 or rows == T * model.cfg.n_experts
        assert n * (1 + m.capacity.headroom) <= rows < n * (1 + m.capacity.headroom) + m.capacity.quantum


def one_step_syncs(method: str, bounded_on: bool, steps: int = 2) -> list[CountSyncs]:
    torch.manual_seed(0)
    cfg = preset("tiny", method, vocab_size=128, experts=8, topk=2)
    model, routing = Transformer(cfg), build_method(cfg)
    model.set_pair_capacity(bounded_on)
    ids = torch.randint(0, 128, (4, 33))
    counted = []
    for _ in range(steps):  # forward, routing + LM loss, backward: everything inside the model
        with CountSyncs() as syncs:
            out = model(ids[:, :-1])
            loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) \
                + routing.coefficient() * routing.loss(out)
            loss.backward()
        counted.append(syncs)
    return counted


@pytest.mark.parametrize("method", ["dense", *FIXED])
def test_fixed_k_methods_never_sync_in_a_training_step(method):
    for syncs in one_step_syncs(method, bounded_on=True) + one_step_syncs(method, bounded_on=False):
        assert syncs.total == 0, dict(syncs.counts)


def test_remoe_bounded_syncs_once_per_forward_and_exact_once_per_layer():
    n_layers = preset("tiny", "remoe", vocab_size=128).n_layer
    first, second = one_step_syncs("remoe", bounded_on=True)
    assert second.total == 1 and second.counts["tolist"] == 1, dict(second.counts)  # the capacity check
    assert first.counts["nonzero"] == n_layers  # the first forward sizes the capacities exactly
    for syncs in one_step_syncs("remoe", bounded_on=False):
        assert syncs.counts["nonzero"] == n_layers and syncs.counts["bincount"] == n_layers


def test_the_counter_sees_each_kind_of_sync():
    t = torch.arange(6.0)
    cases = {"tolist": lambda: t.tolist(), "_local_scalar_dense": lambda: float(t.sum()),
             "nonzero": lambda: t.nonzero(), "index (boolean mask)": lambda: t[t > 2],
             "bincount": lambda: torch.bincount(t.long()), "masked_select": lambda: t.masked_select(t > 1),
             "repeat_interleave (no output_size)": lambda: t.repeat_interleave(t.long())}
    for name, fn in cases.items():
        with CountSyncs() as syncs:
            fn()
        assert syncs.counts[name] >= 1, (name, dict(syncs.counts))
    with CountSyncs() as syncs:  # static-size versions: none
        torch.nonzero_static(t, size=4)
        t.repeat_interleave(t.long(), output_size=15)
        t.argsort(stable=True)
    assert syncs.total == 0, dict(syncs.counts)


def test_moe_dispatch_setting_is_checked_and_chosen_by_device():
    from omegaconf import OmegaConf

    from remoe.bench.step import compose_config
    from remoe.train.run import bounded_dispatch
    from remoe.train.spec import ConfigError, validate

    with pytest.raises(ConfigError, match="moe_dispatch"):
        validate(compose_config(["moe_dispatch=fast"]))
    cfg = OmegaConf.create({"moe_dispatch": "auto", "trainer": {"accelerator": "cpu"}})
    assert bounded_dispatch(cfg) is False
    cfg.moe_dispatch = "bounded"
    assert bounded_dispatch(cfg) is True
    cfg.moe_dispatch, cfg.trainer.accelerator = "auto", "gpu"
    assert bounded_dispatch(cfg) is torch.cuda.is_available()
