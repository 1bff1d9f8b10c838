"""The routing-method interface: every method in conf/model/ is a registered class whose knobs its yaml
sets, the summary contract is declared once, and the training loop's behaviour comes from the method."""

from dataclasses import fields

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from remoe.model import METHODS, ModelConfig, RoutingStats, build_method, preset
from remoe.train.record import RunSummary

MODEL_CONF = sorted((ROOT / "conf" / "model").glob("*.yaml"))


@pytest.mark.parametrize("path", MODEL_CONF, ids=lambda p: p.stem)
def test_each_model_yaml_is_one_method_with_its_knobs(path):
    """conf/model/<name>.yaml, as Hydra composes it: `name` is a registered method; every other key is a
    ModelConfig field or a field of that method's Knobs, whose defaults come from the dataclass alone (the
    yaml includes them from the ConfigStore: one definition), so adding a method is a class + a yaml."""
    import dataclasses

    from hydra import compose, initialize_config_dir

    from remoe.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        conf = OmegaConf.to_container(compose("config", overrides=[f"model={path.stem}"]).model, resolve=True)
    name = conf.pop("name")
    assert name in METHODS and (name == path.stem or path.stem == "dense8")
    cls = METHODS[name]
    arch = {f.name for f in fields(ModelConfig)}
    knob_fields = {f.name: f.default for f in dataclasses.fields(cls.Knobs)}
    knobs = {k: v for k, v in conf.items() if k not in arch}
    assert set(knobs) == set(knob_fields)  # every knob, and nothing else, is in the composed model group
    assert knobs == knob_fields  # at the dataclass defaults (load_balancing: the global switch, true)
    raw = OmegaConf.load(path)
    assert not set(raw) & (set(knob_fields) - {"load_balancing"}), "a knob default repeated in the yaml"
    cfg = preset("tiny", name, vocab_size=100, **{k: v for k, v in conf.items() if k in arch})
    method = build_method(cfg, **knobs)
    assert method.name == name and method.moe == cfg.is_moe and method.knobs == cls.Knobs()


def test_summary_fields_of_every_method_are_declared():
    from remoe.model import Transformer

    declared = set(RunSummary.keys())
    for name in METHODS:
        cfg = preset("tiny", name, vocab_size=100)
        method = build_method(cfg)
        stats = RoutingStats(0, np.array([[512, 0, 0, 0, 0, 0, 0, 0]] * 2), np.array([4096, 4096]))
        if method.moe:
            method.on_optimizer_step(stats, Transformer(cfg))
        assert set(method.summary()) <= declared, name
        RunSummary().update(**method.summary())  # the contract accepts them


def test_run_summary_contract():
    s = RunSummary(model="remoe", seed=1).update(**{"lambda": 0.5, "steps": 3})
    d = s.to_json()
    assert d["lambda"] == 0.5 and "lambda_" not in d and d["experts"] is None
    assert RunSummary.from_json({**d, "from_a_newer_version": 1}).to_json() == d
    with pytest.raises(KeyError, match="no_such_field"):
        s.update(no_such_field=1)
    assert {"model", "size", "experts", "topk", "granularity", "seed", "lambda0", "alpha"} <= \
        set(RunSummary.keys(identity=True))
    assert "val_loss" in RunSummary.keys(required=True) and "val_loss" not in RunSummary.keys(identity=True)
    # a record from before router_lr_scale existed trained every weight at one LR: it reads as 1.0
    assert RunSummary.from_json({"model": "remoe"}).router_lr_scale == 1.0
    assert RunSummary.from_json({"model": "remoe", "router_lr_scale": 0.1}).router_lr_scale == 0.1
    assert RunSummary.from_json({"model": "dense"}).ffn_down_lr == "same"


def first_adamw_step(cfg, o: dict):
    """Each weight's change in the first AdamW step on one fixed batch, and the optimizer's group LRs over
    the whole schedule (warm-up, cosine, floor)."""
    import torch

    from remoe.model import Transformer
    from remoe.train.optim import build_optimizer

    torch.manual_seed(0)
    model = Transformer(cfg)
    opt, sched = build_optimizer(model, o, total=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.nn.functional.cross_entropy(model(idx)[0].flatten(0, 1), idx.flatten()).backward()
    opt.step()
    lrs = []
    for _ in range(5):
        lrs.append([g["lr"] for g in opt.param_groups])
        sched.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}, lrs


OPTIM = dict(lr=1e-2, min_lr=1e-3, warmup=2, weight_decay=0.01, betas=[0.9, 0.999], eps=1e-8, fused="auto")


@pytest.mark.parametrize(("method", "extra", "mult"), [
    ("dense", {"ffn_mult": 8}, 1 / 8),  # Dense x8: W2's fan-in 8 x 4d
    ("topk", {"granularity": 2, "experts": 16, "topk": 2}, 2.0),  # G=2 experts: fan-in 4d / 2
    ("dense", {}, None), ("topk", {}, None), ("remoe", {}, None)])  # the paper's 4d FFN: nothing moves
def test_ffn_down_lr_fan_in_scales_each_w2_by_4d_over_its_fan_in(method, extra, mult):
    """optim.ffn_down_lr=fan_in (muP's Adam rule on the FFN's down-projection): W2 steps exactly
    4 d_model / fan-in times as far as under one LR, on every step of the schedule; every other weight takes
    bitwise the same step. Where every FFN is 4 d_model wide the optimizer is exactly the paper's two groups."""
    import torch

    cfg = preset("tiny", routing=method, vocab_size=64, max_seq_len=16, **extra)
    same, lr_same = first_adamw_step(cfg, {**OPTIM, "ffn_down_lr": "same"})
    fan, lr_fan = first_adamw_step(cfg, {**OPTIM, "ffn_down_lr": "fan_in"})
    w2 = [n for n in same if n.endswith("w2") or n.endswith("w2.weight")]
    assert len(w2) == cfg.n_layer
    if mult is None:
        assert lr_fan == lr_same and len(lr_fan[0]) == 2
        assert all(torch.equal(fan[n], same[n]) for n in same)
        return
    for moved, plain in zip(lr_fan, lr_same):
        assert moved[:2] == plain and moved[2] == pytest.approx(mult * plain[0], rel=1e-12)
    for n in same:
        if n in w2:  # the same gradient, so the same Adam direction, at mult times the step
            torch.testing.assert_close(fan[n], mult * same[n], rtol=1e-4, atol=1e-8)  # steps ~5e-3
        else:
            assert torch.equal(fan[n], same[n]), n


@pytest.mark.parametrize("method", ["remoe", "topk"])
def test_router_lr_scale_moves_only_the_routers_at_that_multiple(method):
    """optim.router_lr_scale: the routers' weights take exactly `scale` times the AdamW step (LR and decay
    both scale with the LR) on every step of the schedule; every other weight the same step as at 1. At 1
    the optimizer has exactly the paper-exact two groups."""
    import torch

    cfg = preset("tiny", routing=method, vocab_size=64, max_seq_len=16)
    deltas, lrs = {}, {}
    for scale in (1.0, 0.1):
        deltas[scale], lrs[scale] = first_adamw_step(cfg, {**OPTIM, "router_lr_scale": scale})
        assert len(lrs[scale][0]) == (2 if scale == 1 else 3)
    for with_router, plain in zip(lrs[0.1], lrs[1.0]):
        assert with_router[:2] == plain and with_router[2] == pytest.approx(0.1 * plain[0], rel=1e-12)
    routers = [n for n in deltas[1.0] if ".router." in n]
    assert len(routers) == cfg.n_layer
    for n in routers:  # the same gradient, so the same Adam direction, at a tenth of the step
        torch.testing.assert_close(deltas[0.1][n], 0.1 * deltas[1.0][n], rtol=1e-4, atol=1e-9)
    first = next(n for n in deltas[1.0] if n not in routers)
    torch.testing.assert_close(deltas[0.1][first], deltas[1.0][first], rtol=0, atol=0)


def test_remoe_controller_state_and_logs():
    cfg = preset("tiny", "remoe", vocab_size=100)  # target 0.875
    m = build_method(cfg, lambda0=1e-4, alpha=2.0)
    below = RoutingStats(0, np.full((2, 8), 1024), np.array([4096, 4096]))  # 2 experts per token: 0.75
    assert m.on_optimizer_step(below) == {"train/lambda": pytest.approx(1e-4)}  # the lambda used in that step
    assert m.coefficient() == pytest.approx(2e-4)
    state = m.state_dict()
    n = build_method(cfg, lambda0=1.0, alpha=2.0)
    n.load_state_dict(state)
    assert n.coefficient() == m.coefficient() and n.controller.steps == 1
    assert m.rank_state() == {"lambda": pytest.approx(2e-4), "sparsity": 0.75}


def test_topk_warmup_sets_every_router_then_returns_to_k():
    from remoe.model import Transformer

    cfg = preset("tiny", "topk", vocab_size=100, experts=8, topk=1, granularity=2)
    model, m = Transformer(cfg), build_method(cfg, warmup_topk=6, warmup_steps=3)
    m.on_train_step_start(0, model)
    assert m.k == 12 and all(layer.router.k == 12 for layer in model.moe_layers())
    m.on_train_step_start(3, model)
    assert m.k == 2 and all(layer.router.k == 2 for layer in model.moe_layers())


def test_load_balancing_off_is_each_methods_ablation():
    remoe = build_method(preset("tiny", "remoe", vocab_size=100), load_balancing=False)
    topk = build_method(preset("tiny", "topk", vocab_size=100), load_balancing=False)
    assert remoe.regularizer == "l1" and topk.coefficient() == 0.0


def _stats(step, per_layer_nnz, T=4096, E=8):
    """RoutingStats whose layer l routed per_layer_nnz[l] (token, expert) pairs of T tokens."""
    counts = np.zeros((len(per_layer_nnz), E), dtype=np.int64)
    counts[:, 0] = per_layer_nnz
    return RoutingStats(step, counts, np.full(len(per_layer_nnz), T))


def test_per_layer_lambda_drives_each_layer_from_its_own_counts():
    import torch

    from remoe.model import ModelOutput
    from remoe.model.routers import RouterOutput

    cfg = preset("tiny", "remoe", vocab_size=100)  # 2 layers, target 0.875: k*T = 4096 pairs
    m = build_method(cfg, lambda0=1.0, alpha=2.0, lambda_per_layer=True)
    logs = m.on_optimizer_step(_stats(0, [8192, 1024]))  # layer 0 too dense, layer 1 too sparse
    assert logs == {"train/lambda": 1.0, "lambda/layer_0": 1.0, "lambda/layer_1": 1.0}
    assert [c.value for c in m.controllers] == [2.0, 0.5]
    gates = [torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([[2.0, 2.0], [0.0, 0.0]])]
    out = ModelOutput(torch.zeros(1), tuple(RouterOutput(g, None) for g in gates))
    value, weighted = m.weighted_loss(out)
    per = [m.REGULARIZERS["lb_l1"](g, 1) for g in gates]
    assert value.item() == pytest.approx((per[0] + per[1]).item() / 2)
    assert weighted.item() == pytest.approx((2.0 * per[0] + 0.5 * per[1]).item() / 2)
    n = build_method(cfg, lambda0=1.0, alpha=2.0, lambda_per_layer=True)
    n.load_state_dict(m.state_dict())
    assert [c.value for c in n.controllers] == [2.0, 0.5]
    with pytest.raises(ValueError, match="lambda_per_layer cannot change on resume"):
        build_method(cfg, lambda_per_layer=False).load_state_dict(m.state_dict())
    s = m.summary()
    assert s["lambda"] is None and s["layer_lambda"] == [2.0, 0.5] and s["lambda_per_layer"] is True
    assert m.rank_state() == {"lambda_l0": 2.0, "lambda_l1": 0.5, "sparsity": pytest.approx(1 - 9216 / 65536)}


def test_a_collapsing_layer_is_warned_once_and_recorded(caplog):
    import logging

    cfg = preset("tiny", "remoe", vocab_size=100)
    m = build_method(cfg)
    caplog.set_level(logging.WARNING, logger="remoe")
    for step in range(60):  # layer 0: 1 expert per token; layer 1: 0.05 (< 0.1 k)
        m.on_optimizer_step(_stats(step, [4096, 205]))
    warnings = [r for r in caplog.records if "collapsing" in r.getMessage()]
    assert len(warnings) == 1 and "MoE layer 1" in warnings[0].getMessage()
    s = m.summary()
    assert s["collapsed_layers"] == [1]
    assert s["layer_sparsity"] == [pytest.approx(0.875), pytest.approx(1 - 205 / 4096 / 8)]
    n = build_method(cfg)
    n.load_state_dict(m.state_dict())  # the window resumes with the run
    assert n.summary()["collapsed_layers"] == [1]
    top = build_method(preset("tiny", "topk", vocab_size=100))
    top.on_optimizer_step(_stats(0, [4096, 4096]))
    assert top.summary()["collapsed_layers"] == []


def _feed(method, nnz_per_step):
    """Run a routing method's per-step bookkeeping over a constructed series of per-layer nnz counts."""
    for step, nnz in enumerate(nnz_per_step):
        method.on_optimizer_step(_stats(step, nnz))
    return method.summary()


S = lambda nnz: 1 - nnz / (4096 * 8)  # noqa: E731 - a layer's sparsity from its nnz (T=4096, E=8)


@pytest.mark.parametrize("case", ["step", "noisy", "late_excursion", "never"])
def test_settling_and_tail_sparsity_against_hand_computed_series(case):
    """The numbers the report reads (summary.json sparsity, settling_step, sparsity_final, layer_sparsity) on
    constructed series of 400 steps, against values computed here by hand: the tail is the last 10% (40
    steps), not the head; settling is the first step from which |S - 0.875| <= 0.05 holds to the end."""
    on, hi, lo, off = 4096, 4096 - 500, 4096 + 500, 16384  # S = 0.875, 0.890, 0.860, 0.5
    series = {"step": [[off, off]] * 100 + [[on, on]] * 300,
              "noisy": [[off, off]] * 100 + [[hi, lo] if i % 2 else [lo, hi] for i in range(300)],
              "late_excursion": [[off, off]] * 100 + [[on, on]] * 290 + [[off, off]] + [[on, on]] * 9,
              "never": [[off, off]] * 400}[case]
    series = [list(x) for x in series]
    if case == "noisy":
        series[150] = [8192, 8192]  # S = 0.75: out of the band once, then in it to the end
    s = _feed(build_method(preset("tiny", "remoe", vocab_size=100)), series)
    per_step = [sum(S(n) for n in row) / 2 for row in series]
    tail = per_step[-40:]
    expect_settle = {"step": 100, "noisy": 151, "late_excursion": 391, "never": None}[case]
    assert s["settling_step"] == expect_settle
    assert s["sparsity"] == pytest.approx(sum(tail) / 40, abs=1e-12)
    assert s["sparsity"] != pytest.approx(sum(per_step[:40]) / 40) or case == "never"  # the tail, not the head
    assert s["sparsity_final"] == pytest.approx(per_step[-1])
    layer = [sum(S(row[i]) for row in series[-40:]) / 40 for i in (0, 1)]
    assert s["layer_sparsity"] == pytest.approx(layer, abs=1e-12) and s["collapsed_layers"] == []


def test_collapsed_layers_are_judged_on_the_tail_at_a_tenth_of_k():
    """A layer is collapsed when its mean experts per token over the tail window stays below 0.1 k: 0.09 is,
    0.11 is not; a collapse early in training that recovered is not in the record (G=2: k*G = 2, E*G = 16)."""
    cfg = preset("tiny", "remoe", vocab_size=100, granularity=2)
    T = 4096

    def stats(step, per_token):
        counts = np.zeros((2, 16), dtype=np.int64)
        counts[:, 0] = [round(p * T) for p in per_token]
        return RoutingStats(step, counts, np.full(2, T))

    m = build_method(cfg)
    for step in range(400):
        early = step < 100
        m.on_optimizer_step(stats(step, [0.01 if early else 2.0, 0.18 if step >= 360 else 0.5]))
    assert m.summary()["collapsed_layers"] == [1]  # 0.18 < 0.1 x 2 over the last 40 steps; layer 0 recovered
    n = build_method(cfg)
    for step in range(400):
        n.on_optimizer_step(stats(step, [2.0, 0.22 if step >= 360 else 0.5]))
    s = n.summary()
    assert s["collapsed_layers"] == [] and s["layer_sparsity"][1] == pytest.approx(1 - round(0.22 * T) / T / 16)


def test_only_dense_has_no_experts():
    """ModelConfig.is_moe reads the name (routing != dense, config.DENSE) so that the config needs no method
    registry; a method whose `moe` disagrees is refused when its class is defined."""
    from remoe.model.config import DENSE
    from remoe.model.routing import METHODS, RoutingMethod

    for name, cls in METHODS.items():
        assert cls.moe == (name != DENSE)
    with pytest.raises(TypeError, match="only 'dense' has no experts"):
        type("NoExperts", (RoutingMethod,), {"name": "noexperts_test", "moe": False})
    assert "noexperts_test" not in METHODS
