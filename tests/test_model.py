"""Models: parameter counts, exactness of the MoE layer against a naive reference, routing losses,
the lambda controller, construction errors, and ReMoE reaching its target sparsity."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from remoe.model import (
    LAMBDA_FLOOR,
    METHODS,
    LambdaController,
    ModelConfig,
    RoutingStats,
    Transformer,
    build_method,
    method_of,
    param_counts,
    preset,
)
from remoe.model import experts as experts_mod
from remoe.model.moe import MoELayer
from remoe.model.presets import CONF_SIZE_DIR, preset_arch
from remoe.model.regularizers import l1_loss, lb_l1_loss, switch_aux_loss

PRESETS = sorted(p.stem for p in CONF_SIZE_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# ---- parameter counts -----------------------------------------------------------------------
def test_182m_dense_counts_182_4m():
    cfg = preset("182m", "dense", vocab_size=50257)
    assert cfg.padded_vocab_size == 51200
    total = param_counts(cfg)["total"]
    assert abs(total - 182.4e6) / 182.4e6 < 0.005
    assert n_params(Transformer(cfg)) == total


@pytest.mark.parametrize("name", ["tiny", "small"])
@pytest.mark.parametrize("variant", ["dense", "topk", "remoe", "hash", "ec", "auxfree"])
def test_counts_match_module(name, variant):
    cfg = preset(name, variant, vocab_size=1000, experts=4, granularity=2)
    assert n_params(Transformer(cfg)) == param_counts(cfg)["total"]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("E,G", [(8, 1), (16, 1), (8, 4)])
def test_moe_total_and_active(name, E, G):
    dense = param_counts(preset(name, "dense", vocab_size=50257))
    for v in ("topk", "remoe", "hash", "ec", "auxfree"):
        cfg = preset(name, v, vocab_size=50257, experts=E, topk=1, granularity=G)
        c = param_counts(cfg)
        ffn = 3 * cfg.d_model * cfg.ffn
        router = 0 if v == "hash" else cfg.d_model * E * G
        assert c["total"] == dense["total"] + cfg.n_layer * ((E - 1) * ffn + router)
        assert c["active"] == dense["total"] + cfg.n_layer * router  # k=1: one expert's FFN, any G


def test_paper_total_params_with_e8():
    # the paper's Table 1 totals at E=8: 182M -> 777M, 469M -> 2.58B, 978M -> 5.73B
    for name, paper in (("182m", 777e6), ("469m", 2.58e9), ("978m", 5.73e9)):
        total = param_counts(preset(name, "remoe", vocab_size=50257, experts=8))["total"]
        assert abs(total - paper) / paper < 0.005


def test_dense_x8_has_moe_e8_params():
    d8 = param_counts(preset("182m", "dense", vocab_size=50257, ffn_mult=8))["total"]
    e8 = param_counts(preset("182m", "topk", vocab_size=50257, experts=8))["total"]
    router = 12 * 768 * 8
    assert d8 == e8 - router


# ---- exactness of the MoE layer ---------------------------------------------------------------
def naive_gates(layer: MoELayer, x: torch.Tensor, method: str, k: int, ids=None) -> torch.Tensor:
    """Each method's gates from its formula, token by token (expert by expert for EC), not the router code."""
    T, E = x.shape[0], layer.experts.w13.shape[0]
    gates = x.new_zeros(T, E)
    if method == "hash":  # the table is the hash (tested on its own below); gate 1 on each of its experts
        for t in range(T):
            for e in layer.router.table[ids[t]].tolist():
                gates[t, e] = 1.0
        return gates
    logits = x @ layer.router.weight.t()
    if method == "remoe":
        return torch.clamp(logits, min=0)
    if method == "auxfree":
        r = layer.router
        s = logits.sigmoid() if r.score_func == "sigmoid" else logits.softmax(-1)
        for t in range(T):
            chosen = torch.argsort(s[t] + r.expert_bias.double(), descending=True)[:k].tolist()
            total = sum(s[t, e] for e in chosen) if r.norm_topk_prob else 1.0
            for e in chosen:
                gates[t, e] = s[t, e] / total
        return gates
    p = logits.softmax(-1)
    if method == "ec":  # each expert e takes the C tokens with the largest p[:, e]
        C = max(1, math.floor(layer.router.capacity_factor * T * k / E))
        for e in range(E):
            for t in torch.argsort(p[:, e], descending=True)[:C].tolist():
                gates[t, e] = p[t, e]
        return gates
    for t in range(T):  # topk
        for e in torch.argsort(p[t], descending=True)[:k].tolist():
            gates[t, e] = p[t, e]
    return gates


def naive_moe(layer: MoELayer, x: torch.Tensor, method: str, k: int, ids=None) -> torch.Tensor:
    """Loop over tokens and experts, gates recomputed from the formulas (not the router code)."""
    gates = naive_gates(layer, x, method, k, ids)
    ex = layer.experts
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros_like(x[t])
        for e in range(gates.shape[1]):
            if gates[t, e] != 0:
                f = ex.w2.shape[1]
                h = F.silu(x[t] @ ex.w13[e, :, :f]) * (x[t] @ ex.w13[e, :, f:])
                y = y + gates[t, e] * (h @ ex.w2[e])
        rows.append(y)
    return torch.stack(rows)


def make_layer(method, E, k, G, d=16, ffn=32, seed=0):
    """One MoE layer of routing method `method`, as the transformer builds it."""
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=1, d_model=d, n_head=2, n_kv_head=1, ffn_hidden=ffn, vocab_size=10,
                      routing=method, experts=E, topk=k, granularity=G)
    layer = METHODS[method].build_ffn(cfg).double()
    assert isinstance(layer, MoELayer)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    if method == "auxfree":  # a bias that changes which experts are chosen
        layer.router.expert_bias.normal_(std=0.3)
    return layer


CASES = [(4, 1, 1), (8, 2, 1), (4, 1, 2), (8, 1, 4), (16, 4, 1)]
NEW_CASES = [(4, 1, 1), (8, 2, 1), (8, 1, 4)]  # the routing baselines: the cases their issue asks for
ROUTED = ["topk", "remoe", "hash", "ec", "auxfree"]  # every MoE routing method


@pytest.mark.parametrize("method,E,k,G", [(m, *c) for m in ("topk", "remoe") for c in CASES]
                         + [(m, *c) for m in ("hash", "ec", "auxfree") for c in NEW_CASES])
def test_moe_matches_naive_reference_with_grads(method, E, k, G):
    layer = make_layer(method, E, k, G)
    torch.manual_seed(1)
    x = torch.randn(37, 16, dtype=torch.float64)
    ids = torch.randint(0, 10, (37,))
    if method == "remoe":
        w_sum = layer.router.weight.detach().sum(0)
        x[:5] = -3.0 * w_sum / w_sum.norm()  # push some tokens toward zero gates
    w = torch.randn(37, 16, dtype=torch.float64)

    def run(fn):
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        y = fn(xx)
        (y * w).sum().backward()
        return y.detach(), xx.grad, [p.grad.clone() for p in layer.parameters()]

    y1, gx1, gp1 = run(lambda xx: layer(xx, ids)[0])
    y2, gx2, gp2 = run(lambda xx: naive_moe(layer, xx, method, k * G, ids))
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-300)).item()  # noqa: E731
    assert rel(y1, y2) < 1e-10
    assert rel(gx1, gx2) < 1e-10
    assert len(gp1) == (2 if method == "hash" else 3)  # experts (+ router)
    for a, b in zip(gp1, gp2):
        assert b.norm() > 0 and rel(a, b) < 1e-10  # every parameter gets a gradient, the reference's


@pytest.fixture
def rows_computed(monkeypatch):
    """Rows fed through the experts' first GEMM in each forward: the (token, expert) pairs computed."""
    rows = []
    gmm = experts_mod.gmm

    def counting(a, b, offs, counts, trans_b=False):
        rows.append(a.shape[0])
        return gmm(a, b, offs, counts, trans_b)

    monkeypatch.setattr(experts_mod, "gmm", counting)
    return rows


def test_relu_tokens_with_no_expert_get_zero_and_cost_nothing(rows_computed):
    layer = make_layer("remoe", 8, 1, 1)
    torch.manual_seed(2)
    x = torch.randn(64, 16, dtype=torch.float64)
    with torch.no_grad():
        layer.router.weight[:, 0] = 5.0  # x[:,0] << 0 -> all gates zero
    x[:20, 0] = -50.0
    gates = layer.router(x).gates
    assert (gates[:20] == 0).all() and (gates[20:] > 0).any()
    with torch.no_grad():
        y, _ = layer(x)
    assert (y[:20] == 0).all()
    nnz = int((gates > 0).sum())
    assert rows_computed == [nnz, nnz] and nnz < 64 * 8  # only non-zero (token, expert) pairs computed
    counts_per_token = (gates > 0).sum(1)
    assert counts_per_token.min() == 0 and counts_per_token.max() > 1  # variable experts per token


def test_relu_layer_fully_sparse_runs_and_keeps_graph():
    layer = make_layer("remoe", 4, 1, 1)
    with torch.no_grad():
        layer.router.weight.fill_(1.0)
    x = -torch.ones(10, 16, dtype=torch.float64)
    y, routed = layer(x)
    assert (y == 0).all() and lb_l1_loss(routed.gates, 1).item() == 0
    y.sum().backward()
    assert layer.experts.w13.grad is not None and (layer.experts.w13.grad == 0).all()


@pytest.mark.parametrize("method", ["topk", "hash", "auxfree", "ec"])
def test_rows_computed_are_the_routed_pairs(rows_computed, method):
    """Only routed (token, expert) pairs go through the experts: T*k for the token-choice methods,
    E*C for Expert Choice (C = T*k/E: 50*2/8 -> 12 tokens per expert)."""
    layer = make_layer(method, 8, 2, 1)
    with torch.no_grad():
        y, routed = layer(torch.randn(50, 16, dtype=torch.float64), torch.randint(0, 10, (50,)))
    n = 8 * 12 if method == "ec" else 100
    assert int((routed.gates != 0).sum()) == n and rows_computed == [n, n]


def test_balanced_hash_is_distinct_balanced_and_seeded():
    from remoe.model.routers import balanced_hash

    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    t = balanced_hash(1000, 8, 3, g())
    assert t.shape == (1000, 3) and torch.equal(t, balanced_hash(1000, 8, 3, g()))
    assert not torch.equal(t, balanced_hash(1000, 8, 3, torch.Generator().manual_seed(4)))
    assert all(len(set(row)) == 3 for row in t.tolist())  # k distinct experts per token id
    first = torch.bincount(t[:, 0], minlength=8)
    assert first.max() - first.min() <= 1  # the first hash: balanced over the vocabulary to one id
    total = torch.bincount(t.flatten(), minlength=8)
    assert total.max() / total.float().mean() < 1.1  # all k: balanced to within 10% (collisions move on)


def test_hash_routes_by_token_id_only():
    layer = make_layer("hash", 8, 1, 1)
    x = torch.randn(6, 16, dtype=torch.float64)
    ids = torch.tensor([3, 3, 5, 5, 3, 7])
    gates = layer(x, ids)[1].gates
    assert (gates.sum(1) == 1).all() and torch.equal(gates[0], gates[1]) and torch.equal(gates[0], gates[4])
    assert torch.equal(gates, layer(torch.randn(6, 16, dtype=torch.float64), ids)[1].gates)
    with pytest.raises(ValueError, match="token ids"):
        layer(x)


def test_expert_choice_is_not_causal_across_the_batch():
    """What its docstring says: changing a later token can change an earlier token's experts."""
    layer = make_layer("ec", 4, 1, 1)
    torch.manual_seed(5)
    x = torch.randn(16, 16, dtype=torch.float64)
    gates = layer(x)[1].gates
    assert ((gates > 0).sum(0) == 4).all()  # every expert takes C = 16*1/4 tokens
    taken = (gates > 0).sum(1)
    assert taken.min() == 0 or taken.max() > 1  # a token gets 0..E experts
    t0 = int(torch.nonzero(gates[:8].sum(1) > 0)[0])  # an early token that some expert took
    e = int(torch.nonzero(gates[t0])[0])
    y = x.clone()
    w_e = layer.router.weight[e].detach()
    y[8:] = 40 * w_e / w_e.norm()  # every later token now scores highest for expert e
    assert layer(y)[1].gates[t0, e] == 0


def test_auxfree_bias_selects_but_gates_are_affinities():
    layer = make_layer("auxfree", 4, 1, 1)
    x = torch.randn(20, 16, dtype=torch.float64)
    layer.router.expert_bias.zero_()
    layer.router.expert_bias[2] = 100.0  # every token picks expert 2 ...
    g = layer(x)[1].gates
    assert (g[:, 2] > 0).all() and (g.sum(1) == g[:, 2]).all()
    assert torch.allclose(g[:, 2], (x @ layer.router.weight.t()).sigmoid()[:, 2])  # ... at its affinity


def test_auxfree_bias_update_follows_the_load_and_is_in_the_state_dict():
    import numpy as np

    cfg = preset("tiny", "auxfree", vocab_size=100, experts=4)
    model, m = Transformer(cfg), build_method(cfg, bias_update_rate=0.01)
    counts = np.array([[10, 0, 5, 1], [4, 4, 4, 4]])  # mean 4: layer 0 over, under, over, under
    logs = m.on_optimizer_step(RoutingStats(0, counts, np.array([16, 16])), model)
    b = [layer.router.expert_bias.tolist() for layer in model.moe_layers()]
    assert b[0] == pytest.approx([-0.01, 0.01, -0.01, 0.01]) and b[1] == [0.0] * 4
    assert logs == {"train/expert_bias_absmax": pytest.approx(0.01)}
    bias0 = model.state_dict()["blocks.0.ffn.router.expert_bias"]
    assert torch.equal(bias0, model.moe_layers()[0].router.expert_bias)
    fresh = Transformer(cfg)
    fresh.load_state_dict(model.state_dict())
    assert fresh.moe_layers()[0].router.expert_bias.tolist() == pytest.approx(b[0])
    assert build_method(cfg, load_balancing=False).bias_update_rate == 0.0  # the LB ablation


def test_router_state_is_in_the_checkpointed_state_dict():
    """The hash table and the bias are persistent buffers: a model built with another seed and loaded from the
    state dict routes exactly as the original."""
    idx = torch.randint(0, 100, (2, 16))
    for method in ("hash", "auxfree"):
        cfg = preset("tiny", method, vocab_size=100, experts=8, topk=2)
        torch.manual_seed(0)
        a = Transformer(cfg)
        for m in a.moe_layers():
            if method == "auxfree":
                m.router.expert_bias.normal_()
        torch.manual_seed(1)
        b = Transformer(cfg)
        assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        b.load_state_dict(a.state_dict())
        oa, ob = a(idx), b(idx)
        assert torch.equal(oa.logits, ob.logits)
        assert all(torch.equal(x.gates, y.gates) for x, y in zip(oa.routing, ob.routing))


def test_topk_gates_are_unrenormalised_softmax_probs():
    layer = make_layer("topk", 8, 2, 1)
    x = torch.randn(30, 16, dtype=torch.float64)
    gates, probs = layer.router(x)[:2]  # RouterOutput(gates, scores, ...)
    p = (x @ layer.router.weight.t()).softmax(-1)
    assert torch.allclose(probs, p)
    top = torch.topk(p, 2, dim=-1)
    assert torch.allclose(gates.gather(1, top.indices), top.values)
    assert ((gates > 0).sum(1) == 2).all()
    assert (gates.sum(1) < 1 - 1e-6).all()  # not renormalised


# ---- routing losses --------------------------------------------------------------------------
def test_switch_aux_loss_hand_example():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]], dtype=torch.float64)
    gates = torch.zeros_like(probs).scatter(1, probs.argmax(1, keepdim=True), probs.max(1, keepdim=True).values)
    # f = [3/4, 1/4], P = [0.6, 0.4] -> 2 * (0.45 + 0.1)
    assert switch_aux_loss(probs, gates, k=1).item() == pytest.approx(1.1, abs=1e-12)


def test_lb_l1_and_l1_hand_example_and_no_grad_through_counts():
    R = torch.tensor([[0.5, 0.0], [0.2, 0.3]], dtype=torch.float64, requires_grad=True)
    # counts [2, 1], f = E/(kT) * counts = [2, 1]; L = (2*.5 + 2*.2 + 1*.3)/2
    loss = lb_l1_loss(R, k=1)
    assert loss.item() == pytest.approx(0.85, abs=1e-12)
    loss.backward()
    # d/dR = f_e / T everywhere: the counts are constants
    assert torch.equal(R.grad, torch.tensor([[1.0, 0.5], [1.0, 0.5]], dtype=torch.float64))
    assert l1_loss(R.detach()).item() == pytest.approx(0.5, abs=1e-12)


def test_model_router_loss_conventions():
    """Each method's loss from the model's per-layer router outputs: ReMoE averages LB-L1 over layers
    (the 1/(L T) convention), TopK sums the Switch aux loss; the dense model has no router output."""
    torch.manual_seed(0)
    idx = torch.randint(0, 100, (2, 16))
    for v in ("topk", "remoe", "dense"):
        cfg = preset("tiny", v, vocab_size=100, experts=4)
        m, method = Transformer(cfg).double(), build_method(cfg)
        out = m(idx)
        assert out.logits.shape == (2, 16, 128) and len(out.routing) == (0 if v == "dense" else cfg.n_layer)
        assert all(r.gates.shape == (32, 4) for r in out.routing)  # (tokens, experts) per layer
        if v == "remoe":
            per_layer = [lb_l1_loss(r.gates, 1) for r in out.routing]
            assert method.loss(out).item() == pytest.approx(torch.stack(per_layer).mean().item(), rel=1e-12)
        elif v == "topk":
            per_layer = [switch_aux_loss(r.scores, r.gates, 1) for r in out.routing]
            assert method.loss(out).item() == pytest.approx(torch.stack(per_layer).sum().item(), rel=1e-12)
        else:
            assert method.loss(out).item() == 0 and method.coefficient() == 0


# ---- the controller --------------------------------------------------------------------------
def test_controller_multiplies_below_target_and_divides_above():
    c = LambdaController(target=0.75, lambda0=1e-8, alpha=1.2)
    assert c.lam.dtype == torch.float32
    assert c.update(0.5) == pytest.approx(1.2e-8, rel=1e-6)
    assert c.update(0.5) == pytest.approx(1.44e-8, rel=1e-6)
    assert c.update(0.9) == pytest.approx(1.2e-8, rel=1e-6)
    assert c.update(0.75) == pytest.approx(1e-8, rel=1e-6)  # at target: divide
    state = c.state_dict()
    d = LambdaController(target=0.5, lambda0=1.0, alpha=2.0)
    d.load_state_dict(state)
    assert d.value == c.value and d.steps == 4 and d.target == 0.75 and float(d.alpha) == pytest.approx(1.2)
    assert d.update(0.0) == c.update(0.0)


def test_controller_held_above_target_stops_at_its_floor_and_climbs_back(caplog):
    """Issue 20 (study4k, ReMoE G=4 seed 2): ~900 steps above target took a float32 lambda into the
    subnormals, to 2.8e-45, where x1.2 rounds back to itself: the controller never moved again. The floor
    (float32's smallest normal) keeps every update a real multiplication, and reaching it is said once."""
    c = LambdaController(target=0.875, lambda0=1e-8, alpha=1.2)
    with caplog.at_level(logging.WARNING, logger="remoe"):
        for _ in range(1000):
            c.step(below_target=False)
    assert c.value == LAMBDA_FLOOR == torch.finfo(torch.float32).tiny
    said = [r.getMessage() for r in caplog.records if "floor" in r.getMessage()]
    # 1e-8 / 1.2^378 < 1.18e-38: the 378th division
    assert len(said) == 1 and "reached its floor 1.18e-38 at controller step 378" in said[0], said
    lam, alpha, climb = torch.tensor(LAMBDA_FLOOR), torch.tensor(1.2), []
    for _ in range(5):
        lam = lam * alpha  # float32, step by step, as the spec's update
        climb.append(float(lam))
    assert [c.step(below_target=True) for _ in range(5)] == climb and climb[-1] > 2.4 * LAMBDA_FLOOR
    stuck = LambdaController(target=0.875)
    stuck.load_state_dict({**stuck.state_dict(), "lam": 2.802597e-45})  # from a checkpoint written before
    assert stuck.step(below_target=True) == LAMBDA_FLOOR


# ---- construction errors ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(experts=0), "experts"),
        (dict(experts=-2), "experts"),
        (dict(topk=0), "topk"),
        (dict(topk=9, experts=8), "topk"),
        (dict(granularity=5), "granularity"),  # 4*64=256 not divisible by 5
        (dict(granularity=0), "granularity"),
        (dict(routing="softmax"), "routing"),
        (dict(capacity_factor=2.0), "capacity_factor"),  # an Expert Choice option, not ReMoE's
        (dict(routing="dense", score_func="softmax"), "score_func"),
        (dict(routing="ec", capacity_factor=0.0), "capacity_factor"),
        (dict(routing="auxfree", score_func="relu"), "score_func"),
        (dict(routing="auxfree", norm_topk_prob=True), "norm_topk_prob"),  # k*G = 1: gates all 1
    ],
)
def test_bad_arguments_name_the_argument(kw, name):
    """The backbone's checks are ModelConfig's, a routing method's own options its check_arch (method_of runs it,
    as building the model does); either way the error names the field."""
    base = dict(preset_arch("tiny"), routing="remoe", vocab_size=100)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        method_of(ModelConfig(**{**base, **kw}))
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        Transformer(ModelConfig(**{**base, **kw}))


@pytest.mark.parametrize(
    "method,kw,name",
    [
        ("remoe", dict(lambda0=0.0), "lambda0"),
        ("remoe", dict(lambda0=1e-40), "lambda0"),  # a float32 subnormal: below the controller's floor
        ("remoe", dict(alpha=1.0), "alpha"),
        ("remoe", dict(regularizer="l2"), "regularizer"),
        ("remoe", dict(aux_loss_coef=0.1), "aux_loss_coef"),  # not a ReMoE knob
        ("topk", dict(aux_loss_coef=-1.0), "aux_loss_coef"),
        ("topk", dict(warmup_topk=9), "warmup_topk"),
        ("dense", dict(lambda0=1e-8), "lambda0"),
        ("auxfree", dict(bias_update_rate=-1.0), "bias_update_rate"),
        ("hash", dict(aux_loss_coef=0.01), "aux_loss_coef"),
    ],
)
def test_bad_method_knobs_name_the_knob(method, kw, name):
    cfg = preset("tiny", method, vocab_size=100)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        build_method(cfg, **kw)


def test_unknown_preset_and_method():
    with pytest.raises(ValueError, match="size"):
        preset("7b")
    with pytest.raises(ValueError, match="routing"):
        method_of(preset("tiny", "no_such_method"))


def test_checkpoint_format_is_checked_and_format_0_refused_in_one_line():
    """Issue 41: checkpoints carry a format version; format 0 (before the routing-method objects: `router`
    and the knobs in the model config) is refused by name, not translated; one from newer code too."""
    from remoe.checkpoint import FORMAT, FORMAT_KEY, CheckpointError, check_format

    model = preset("tiny", "remoe", vocab_size=100).to_dict()
    check_format({"hyper_parameters": {"model": model}, FORMAT_KEY: FORMAT}, "x.ckpt")
    check_format({"hyper_parameters": {"model": model}}, "x.ckpt")  # format 1 before the key was written
    old = {**{k: v for k, v in model.items() if k != "routing"}, "router": "relu", "lambda0": 1e-6}
    with pytest.raises(CheckpointError, match=r"format 0, this code reads format 1 .*a7cf893"):
        check_format({"hyper_parameters": {"model": old}}, "x.ckpt")
    with pytest.raises(CheckpointError, match="format 2.*newer code"):
        check_format({"hyper_parameters": {"model": model}, FORMAT_KEY: 2}, "x.ckpt")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict(old)


# ---- the method's central claim, end to end ----------------------------------------------------
def synthetic_batches(vocab, B, S, seed):
    """A learnable stream: each sequence repeats a random 8-token motif, shifted."""
    g = torch.Generator().manual_seed(seed)
    while True:
        motif = torch.randint(0, vocab, (B, 8), generator=g)
        yield motif.repeat(1, S // 8 + 1)[:, : S + 1]


@pytest.mark.parametrize("E,k,G", [(8, 1, 1), (8, 2, 1), (8, 1, 2)])
def test_remoe_reaches_target_sparsity(E, k, G):
    """The controller brings the step sparsity to 1 - k/E, fine-grained too: within 0.03 over the last 50 of
    300 steps on this synthetic data, whose sparsity still swings by ±0.05 around the target there (measured
    0.005 / 0.011-0.026 / 0.005 off for the three cases; the k=2 tail moves with the thread count, ReMoE being
    chaotic); real runs' 50-step tails land within 0.01 (reports/runs). Was 0.05."""
    torch.manual_seed(0)
    cfg = preset("tiny", "remoe", vocab_size=256, experts=E, topk=k, granularity=G)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    method = build_method(cfg)  # the paper's lambda0=1e-8, alpha=1.2
    traj = []
    data = synthetic_batches(256, 8, 64, seed=0)
    for step in range(300):
        batch = next(data)
        out = model(batch[:, :-1])
        lm = F.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
        loss = lm + method.coefficient() * method.loss(out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        stats = RoutingStats(step, *(t.numpy() for t in model.routing_counts()))
        model.reset_routing_counts()
        method.on_optimizer_step(stats)
        traj.append(stats.sparsity)
    tail = sum(traj[-50:]) / 50  # stage III: mean of the last 50 steps
    print(f"E={E} k={k} target={cfg.target_sparsity:.3f} sparsity every 25 steps:",
          [round(traj[i], 3) for i in range(0, 300, 25)], "tail mean", round(tail, 4), "lambda",
          method.coefficient())
    assert traj[0] < cfg.target_sparsity - 0.15  # ReLU at init: ~half the gates are zero, well below target
    assert abs(tail - cfg.target_sparsity) <= 0.03
    assert math.isfinite(lm.item())


def test_padded_groups_give_the_same_outputs_and_grads():
    """dispatch.pad_groups (used for CPU bf16) adds gate-0 dummy pairs: outputs and every gradient,
    including the router's through the gates, are unchanged (float64, exact to rounding)."""
    from remoe.model.dispatch import group_by_expert, pad_groups

    layer = make_layer("remoe", 8, 2, 1)
    x = torch.randn(70, 16, dtype=torch.float64)

    def run(pad):
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        gates = layer.router(xx).gates
        routing = group_by_expert(gates)
        if pad:
            routing = pad_groups(routing)
            assert (routing.counts >= group_by_expert(gates).counts).all() and routing.counts.sum() > len(gates[gates > 0])
        y = layer.experts(xx, routing)
        (y * torch.arange(16.0, dtype=torch.float64)).sum().backward()
        return [y.detach(), xx.grad] + [p.grad.clone() for p in layer.parameters()]

    for a, b in zip(run(False), run(True)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_pad_groups_bucket_sizes():
    from remoe.model.dispatch import Routing, pad_groups

    counts = torch.tensor([0, 1, 16, 17, 130, 511, 1000])
    E = counts.numel()
    expert_idx = torch.repeat_interleave(torch.arange(E), counts)
    r = pad_groups(Routing(torch.arange(expert_idx.numel()), expert_idx, torch.ones(expert_idx.numel()), counts))
    assert r.counts.tolist() == [0, 16, 16, 32, 144, 512, 1024]  # q = 16,16,16,16,16,32,64
    assert r.weights.sum() == counts.sum() and r.expert_idx.tolist() == sorted(r.expert_idx.tolist())


def test_controller_decides_below_target_on_counts_not_a_rounded_mean():
    """E=10, k=3 over 3 layers, every layer exactly at target 0.7: the float mean of the layer sparsities
    is 0.6999999999999998 < 0.7, which would multiply lambda; on counts it is at target: divide."""
    import numpy as np

    cfg = preset("tiny", "remoe", vocab_size=100, experts=10, topk=3, n_layer=3)
    counts = np.zeros((3, 10), dtype=np.int64)
    counts[:, :3] = 4096  # every token routed to 3 of 10 experts in every layer
    stats = RoutingStats(0, counts, np.full(3, 4096))
    assert stats.sparsity < cfg.target_sparsity  # the trap: a rounded mean
    assert not stats.below_target(cfg.n_active)
    method = build_method(cfg, lambda0=1.0, alpha=2.0)
    method.on_optimizer_step(stats)
    assert method.coefficient() == 0.5  # divided: at target
    counts[0, 3] = 1  # one pair more than target in one layer: denser, below target sparsity
    assert RoutingStats(1, counts, np.full(3, 4096)).below_target(cfg.n_active)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_recomputed_expert_stage_gives_the_same_numbers(dtype):
    """GroupedExperts.recompute_above (the Stage I memory ceiling) changes what is kept for backward, not
    the outputs or any gradient."""
    layer = make_layer("remoe", 8, 2, 2).to(dtype)
    x = torch.randn(50, 16, dtype=dtype)

    def run():
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        y, _ = layer(xx)
        (y * torch.arange(16.0, dtype=dtype)).sum().backward()
        return [y.detach(), xx.grad] + [p.grad.clone() for p in layer.parameters()]

    plain = run()
    layer.experts.recompute_above = 0.0
    again = run()
    assert all(torch.equal(a, b) for a, b in zip(plain, again))
