"""The reconstruction engine: partition arithmetic, the lam schedule, stages, and that training
really lowers the module error; REM, LKD and MREM-S are one code path with different settings."""

import copy
import itertools
import math
import random

import pytest
import torch

from conftest import build_tiny
from mrem_dist.config import MethodConfig
from mrem_dist.scheme import QuantScheme
from mrem_dist.data import Batch
from mrem_dist.engine import (
    ActivationStore,
    ReconSettings,
    Stage,
    choose_cache,
    epoch_order,
    lam_at,
    layer_costs,
    mix_inputs,
    partition,
    reconstruct_sequential,
    split_contiguous,
    trainable_groups,
)
from mrem_dist.models import FAMILIES
from mrem_dist.context import recon_settings
from mrem_dist.engine.sequential import EngineOptions
from mrem_dist.quantize import calibrate_activations, quantize_model
from mrem_dist.scoring import run_batch

# -- partition --------------------------------------------------------------------------------


def _sizes(ranges):
    return [b - a for a, b in ranges]


def test_equal_costs_split_evenly_with_smaller_modules_first():
    assert _sizes(split_contiguous([1.0] * 12, 4)) == [3, 3, 3, 3]
    assert _sizes(split_contiguous([1.0] * 6, 4)) == [1, 1, 2, 2]
    assert _sizes(split_contiguous([1.0] * 6, 6)) == [1] * 6
    assert split_contiguous([1.0] * 5, 1) == [(0, 5)]


def test_split_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        L, n = rng.randint(1, 9), None
        n = rng.randint(1, L)
        costs = [rng.uniform(0.1, 10) for _ in range(L)]
        ranges = split_contiguous(costs, n)
        assert ranges[0][0] == 0 and ranges[-1][1] == L and all(a < b for a, b in ranges)
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(n - 1))
        got = max(sum(costs[a:b]) for a, b in ranges)
        best = min(
            max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, L)))
            for cuts in itertools.combinations(range(1, L), n - 1)
        )
        assert got == pytest.approx(best)


def test_heavy_first_layer_gets_its_own_module():
    assert split_contiguous([10, 1, 1, 1, 1], 2) == [(0, 1), (1, 5)]


def test_more_modules_than_layers_is_a_clear_error():
    with pytest.raises(ValueError, match=r"cannot cut 4 layers into 5 modules.*method.modules<=4"):
        split_contiguous([1.0] * 4, 5)
    model = build_tiny("bert", head=False)  # 4 layers
    with pytest.raises(ValueError, match="cannot cut 4 layers into 7 modules"):
        partition(model, FAMILIES["bert"], 7)


def test_partition_specs_cover_the_model():
    model = build_tiny("bert", head=True)
    specs = partition(model, FAMILIES["bert"], 0)
    assert [(s.start, s.stop) for s in specs] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert specs[0].first and not specs[0].last and specs[-1].last
    assert specs[0].describe() == "module 0: embeddings + layers 0-0"
    assert specs[-1].describe() == "module 3: layers 3-3 + head"
    two = partition(model, FAMILIES["bert"], 2)
    assert [(s.start, s.stop) for s in two] == [(0, 2), (2, 4)]


def test_param_balance_charges_the_embeddings_to_the_first_layer():
    model = build_tiny("bert", head=False)
    family = FAMILIES["bert"]
    by_params = layer_costs(model, family, "params")
    emb = sum(p.numel() for p in family.embeddings(model).parameters())
    assert by_params[0] == pytest.approx(by_params[1] + emb)
    # The table is huge in parameters but a lookup in compute: the cost balance keeps layers even.
    assert _sizes([(s.start, s.stop) for s in partition(model, family, 2, "cost")]) == [2, 2]
    assert _sizes([(s.start, s.stop) for s in partition(model, family, 2, "params")]) == [1, 3]


# -- schedule ---------------------------------------------------------------------------------


def test_lam_schedules():
    assert [lam_at("zero", t, 10) for t in (0, 5, 9)] == [0.0, 0.0, 0.0]
    assert [lam_at("one", t, 10) for t in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [lam_at("anneal", t, 100, 40) for t in (0, 10, 20, 40, 99)] == [1.0, 0.75, 0.5, 0.0, 0.0]
    assert [lam_at("anneal", t, 10, 20, finish_steps=3) for t in (0, 6, 7, 9)] == [1.0, 0.7, 0.0, 0.0]  # finish: 0
    assert lam_at("anneal", 75, 100) == 0.5 and lam_at("anneal", 99, 100) == pytest.approx(1 / 3, abs=0.01)  # t0=0: 1.5x the steps
    with pytest.raises(ValueError, match="not one of"):
        lam_at("linear", 0, 10)


def test_modules_are_checked_on_the_inputs_of_the_final_model():
    from mrem_dist.engine import check_lam

    # MREM-P's default anneal ends at lam 1/3, but the final model feeds each module the quantized
    # upstream only: that is what the never-worse check measures; LKD never computes that stream.
    assert lam_at("anneal", 9, 10) > 0.3 and check_lam(ReconSettings(steps=10, lam="anneal")) == 0.0
    assert check_lam(ReconSettings(lam="zero")) == 0.0 and check_lam(ReconSettings(lam="one")) == 1.0


def test_mix_inputs():
    fp, q = torch.ones(2, 3), torch.zeros(2, 3)
    assert mix_inputs(0.25, fp, q).eq(0.25).all()
    assert mix_inputs(1.0, fp, q) is fp and mix_inputs(0.0, fp, q) is q
    assert mix_inputs(0.5, None, None) is None


def test_epoch_order_visits_every_batch_once_per_epoch():
    order = list(epoch_order(5, 12, seed=3))
    assert len(order) == 12
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))
    assert order == list(epoch_order(5, 12, seed=3)) and order != list(epoch_order(5, 12, seed=4))


# -- stages -----------------------------------------------------------------------------------


def _batches(n=3, b=4, s=12, seed=0, vocab=30522):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, vocab, (b, s), generator=g)
        mask = torch.ones(b, s, dtype=torch.long)
        mask[0, s // 2:] = 0  # one padded sequence
        out.append(Batch(ids, mask, torch.zeros_like(ids)))
    return out


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("head", [False, True])
def test_chained_stages_equal_the_whole_model(family, head):
    model = build_tiny(family, head=head)
    family = FAMILIES[family]
    batch = _batches(1)[0]
    if family == "distilbert":
        batch = Batch(batch.input_ids, batch.attention_mask)
    with torch.no_grad():
        whole = run_batch(model, family, batch)
        hidden = None
        for spec in partition(model, family, 2):
            out = Stage(model, family, spec)(hidden, batch)
            hidden = out.hidden[-1]
        result = out.logits if head else hidden
    assert torch.equal(result, whole)


# -- training ---------------------------------------------------------------------------------


def _setup(head=False, w_bits=2, seed=0, family="bert"):
    model = build_tiny(family, head=head, seed=seed)
    family = FAMILIES[family]
    q = quantize_model(copy.deepcopy(model), family, QuantScheme(name="t", w_bits=w_bits, w_clip="mse"), learnable=True)
    batches = _batches(4)
    calibrate_activations(q, lambda m, b: run_batch(m, family, b), batches)
    return model, q, family, batches


def _run(method: MethodConfig, head=False, **kw):
    model, q, family, batches = _setup(head=head)
    specs = partition(model, family, method.modules)
    holdout = _batches(2, seed=1)  # other random sequences: the held-out check never trains on them
    result = reconstruct_sequential(model, q, family, specs, batches, holdout, recon_settings(method),
                                    EngineOptions(seed=0, **kw))
    return q, result


def test_reconstruction_lowers_every_module_error():
    q, result = _run(MethodConfig(name="mrem_s", modules=2, steps=60, lam="zero", lr_weight=3e-4))
    assert result.cache == "memory" and len(result.modules) == 2
    for m in result.modules:
        # Measured on held-out sequences (random tokens, other than the four training batches).
        assert m.error_after < 0.75 * m.error_before and m.kept == "trained", m
        assert len(m.losses) == 60 and all(math.isfinite(x) for x in m.losses)
        assert sum(m.losses[-10:]) < sum(m.losses[:10])


def test_reconstruction_with_a_head_and_kd():
    # lr_weight is absolute: the default (1e-3, measured on MiniLM) overshoots on this tiny random
    # model's weights in 30 steps, so the test uses a smaller one.
    q, result = _run(MethodConfig(name="mrem_s", modules=2, steps=30, kd_weight=1.0, lr_weight=3e-4), head=True)
    assert all(m.error_after < m.error_before for m in result.modules)


def _quant_state(q):
    return {k: v.clone() for k, v in q.state_dict().items()}


def test_methods_are_settings_of_one_engine():
    rem, lkd, mrem = (recon_settings(MethodConfig(name=n, modules=m, lam=lam, steps=20))
                      for n, m, lam in (("rem", 0, "zero"), ("lkd", 0, "one"), ("mrem_s", 2, "zero")))
    assert rem == ReconSettings(steps=20, lam="zero") and lkd == ReconSettings(steps=20, lam="one")
    # MREM-S with one layer per module *is* REM: the same weights, bit for bit.
    q_rem, _ = _run(MethodConfig(name="rem", modules=0, steps=15, lam="zero"))
    q_ms, _ = _run(MethodConfig(name="mrem_s", modules=4, steps=15, lam="zero"))
    a, b = _quant_state(q_rem), _quant_state(q_ms)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # LKD differs from REM only in where the inputs come from: from module 1 on the weights differ.
    q_lkd, _ = _run(MethodConfig(name="lkd", modules=0, steps=15, lam="one"))
    c = _quant_state(q_lkd)
    layer0 = [k for k in a if ".layer.0." in k or "embeddings" in k]
    layer2 = [k for k in a if ".layer.2." in k and k.endswith("weight")]
    assert all(torch.equal(a[k], c[k]) for k in layer0)
    assert not all(torch.equal(a[k], c[k]) for k in layer2)


def test_disk_cache_gives_the_same_result_and_cleans_up(tmp_path):
    q_mem, res_mem = _run(MethodConfig(name="mrem_s", modules=2, steps=10), cache="memory")
    q_disk, res_disk = _run(MethodConfig(name="mrem_s", modules=2, steps=10), cache="disk", cache_dir=tmp_path)
    assert res_disk.cache == "disk"
    a, b = _quant_state(q_mem), _quant_state(q_disk)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert list(tmp_path.iterdir()) == []


def test_auto_cache_spills_to_disk_over_the_budget():
    assert choose_cache("auto", 2**30, 2.0) == "memory"
    assert choose_cache("auto", 3 * 2**30, 2.0) == "disk"
    assert choose_cache("disk", 1, 2.0) == "disk"
    with pytest.raises(ValueError, match="not one of"):
        choose_cache("ram", 1, 1.0)
    _, res = _run(MethodConfig(name="mrem_s", modules=2, steps=2), cache_memory_gb=1e-9)
    assert res.cache == "disk"


def test_activation_store_round_trip(tmp_path):
    store = ActivationStore("disk", tmp_path)
    t = torch.randn(2, 3, 4)
    store.put(0, t)
    assert torch.equal(store.get(0), t) and len(store) == 1
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_only_weights_and_scales_train_by_default():
    model, q, family, _ = _setup()
    stage = Stage(q, family, partition(q, family, 2)[1])
    names = {id(p): n for n, p in stage.named_parameters()}
    default = [names[id(p)] for g in trainable_groups(stage, ReconSettings()) for p in g["params"]]
    assert default and all(n.endswith(".weight") and "LayerNorm" not in n or n.endswith(".scale") for n in default)
    assert not any(n.endswith(".bias") for n in default)
    more = [names[id(p)] for g in trainable_groups(stage, ReconSettings(train_bias=True, train_layernorm=True)) for p in g["params"]]
    assert any("LayerNorm" in n for n in more) and any(n.endswith(".bias") for n in more)


def test_weight_lr_is_relative_to_each_grid_step_unless_set():
    from mrem_dist.quant import QuantLinear

    model, q, family, _ = _setup()
    stage = Stage(q, family, partition(q, family, 2)[1])
    linears = [m for m in stage.modules() if isinstance(m, QuantLinear)]
    rule = [g for g in trainable_groups(stage, ReconSettings(lr_weight_rel=0.03)) if g["name"] == "weights"]
    assert len(rule) == len(linears)
    for g, m in zip(rule, linears):
        assert g["params"][0] is m.weight
        assert g["lr"] == pytest.approx(0.03 * m.weight_quantizer.scale.abs().mean().item())
    assert len({g["lr"] for g in rule}) > 1  # per tensor, not one rate
    fixed = [g for g in trainable_groups(stage, ReconSettings(lr_weight=1e-3)) if g["name"] == "weights"]
    assert len(fixed) == 1 and fixed[0]["lr"] == 1e-3 and len(fixed[0]["params"]) == len(linears)


def test_learned_scales_stay_positive():
    # A huge scale learning rate would drive step sizes negative without the clamp.
    q, _ = _run(MethodConfig(name="mrem_s", modules=2, steps=5, lr_scale=50.0))
    scales = [p for n, p in q.named_parameters() if n.endswith(".scale")]
    assert scales and all((s > 0).all() for s in scales)


@pytest.mark.parametrize("never_worse", [True, False])
def test_a_module_that_training_made_worse_keeps_its_initial_state(never_worse):
    # A planted learning rate that diverges (10 on weights of scale 0.02): the loss stays finite (the
    # weight codes clamp to the grid) but every module ends far worse on the held-out batches.
    model, q, family, batches = _setup()
    initial = _quant_state(q)
    specs = partition(model, family, 2)
    settings = recon_settings(MethodConfig(name="mrem_s", modules=2, steps=10, lr_weight=10.0, never_worse=never_worse))
    result = reconstruct_sequential(model, q, family, specs, batches, _batches(2, seed=1), settings, EngineOptions())
    assert all(m.error_after > m.error_before for m in result.modules)
    final = _quant_state(q)
    if never_worse:
        assert [m.kept for m in result.modules] == ["initial", "initial"]
        assert final.keys() == initial.keys() and all(torch.equal(final[k], initial[k]) for k in final)
    else:
        assert [m.kept for m in result.modules] == ["trained", "trained"]
        assert not all(torch.equal(final[k], initial[k]) for k in final)


def test_keep_trained_rule():
    from mrem_dist.engine.records import keep_trained

    assert keep_trained(1.0, 0.5, True) and keep_trained(1.0, 1.0, True) and not keep_trained(1.0, 1.5, True)
    assert not keep_trained(1.0, float("nan"), True) and keep_trained(float("inf"), 2.0, True)
    assert keep_trained(1.0, 1.5, False) and keep_trained(1.0, float("nan"), False)


def test_diverging_training_names_the_module():
    with pytest.raises(FloatingPointError, match=r"module 0: embeddings \+ layers 0-1.*lower method.lr_weight"):
        _run(MethodConfig(name="mrem_s", modules=2, steps=20, lr_weight=float("inf")))


def test_module_trainer_steps_return_the_streams_for_the_next_module():
    from mrem_dist.engine import ModuleTrainer

    model, q, family, batches = _setup()
    specs = partition(model, family, 2)
    first = ModuleTrainer(Stage(q, family, specs[0]), Stage(model, family, specs[0]), ReconSettings(steps=3, lam="anneal"))
    second = ModuleTrainer(Stage(q, family, specs[1]), Stage(model, family, specs[1]), ReconSettings(steps=3, lam="anneal"))
    for t in range(3):  # lockstep: both modules step on the same batch, module 0's outputs feeding module 1
        teacher_out, student_out = first.train_step(t, batches[t], None, None)
        with torch.no_grad():
            assert torch.equal(teacher_out.hidden[-1], Stage(model, family, specs[0])(None, batches[t]).hidden[-1])
        second.train_step(t, batches[t], teacher_out.hidden[-1], student_out.hidden[-1].detach())
    results = [first.finish(), second.finish()]
    assert [r.lams for r in results] == [[1.0, 0.75, 0.5]] * 2  # anneal over 1.5x the 3 steps: t0 = 4
    assert all(len(r.losses) == 3 for r in results)
    assert not any(p.requires_grad for tr in (first, second) for p in tr.student.parameters())


# -- tensor ownership (what a rank of MREM-P keeps, what the coordinator assembles) -------------


def test_every_tensor_has_exactly_one_owning_module():
    from mrem_dist.engine import tensor_owner

    model = build_tiny("bert", head=True)
    family = FAMILIES["bert"]
    specs = partition(model, family, 2)  # layers 0-1 | 2-3
    owner = tensor_owner(model, family, specs)
    owners = {name: owner(name) for name in model.state_dict()}
    assert owners["bert.embeddings.word_embeddings.weight"] == 0
    assert owners["bert.encoder.layer.1.output.dense.weight"] == 0
    assert owners["bert.encoder.layer.2.attention.self.query.weight"] == 1
    assert owners["classifier.weight"] == 1 and owners["bert.pooler.dense.weight"] == 1
    assert set(owners.values()) == {0, 1}


def test_a_rank_keeps_only_its_modules_and_they_still_run():
    from mrem_dist.engine import owned_state, release_unowned, tensor_owner

    model = build_tiny("bert", head=True)
    family = FAMILIES["bert"]
    specs = partition(model, family, 2)
    whole = copy.deepcopy(model)
    batch = _batches(1)[0]
    hidden = torch.randn(*batch.input_ids.shape, 32)
    expected = Stage(whole, family, specs[1])(hidden, batch)
    owner = tensor_owner(model, family, specs)
    total = sum(p.numel() for p in model.parameters())
    freed = release_unowned(model, owner, {1})
    assert 0 < freed < total + 1000
    assert model.bert.embeddings.word_embeddings.weight.numel() == 0
    assert model.bert.encoder.layer[0].attention.self.query.weight.numel() == 0
    got = Stage(model, family, specs[1])(hidden, batch)
    assert torch.equal(got.logits, expected.logits)
    state = owned_state(model, owner, {1})
    assert state and all(owner(k) == 1 and v.numel() > 0 for k, v in state.items())


# -- MREM-P's finish phase ----------------------------------------------------------------------


def _pipeline_run(method: MethodConfig):
    """MREM-P in one process (every module in lockstep) on _run's model and data."""
    from mrem_dist.engine.parallel import RankPipeline
    from mrem_dist.layout import ParallelLayout

    model, q, family, batches = _setup()
    specs = partition(model, family, method.modules)
    settings = recon_settings(method)
    pipe = RankPipeline(model, q, family, specs, ParallelLayout.single(len(specs)), torch.device("cpu"))
    initial = pipe.initial_states()
    results, decisions, _ = pipe.train(batches, list(epoch_order(len(batches), settings.steps, 0)), settings,
                                       _batches(2, seed=1), initial)
    return q, results, decisions


@pytest.mark.parametrize("revert", [None, 1], ids=["all-trained", "module-1-kept-initial"])
def test_finish_phase_over_every_step_with_quantized_inputs_is_mrem_s(monkeypatch, revert):
    # finish_steps = steps: every module trains all its steps on the finished upstream modules'
    # outputs, which is what MREM-S does: the same weights, losses and held-out errors, bit for bit.
    # revert=1: the never-worse check (planted) keeps module 1 at its initial state, so module 2
    # must train on the initial module 1's outputs in both.
    if revert is not None:
        from mrem_dist.engine import parallel, sequential

        calls = []

        def planted(before, after, never_worse):
            calls.append(1)
            return (len(calls) - 1) % 3 != revert  # the n-th check of each run (3 modules)

        monkeypatch.setattr(parallel, "keep_trained", planted)
        monkeypatch.setattr(sequential, "keep_trained", planted)
    steps = 6
    q_p, results, decisions = _pipeline_run(MethodConfig(name="mrem_p", modules=3, steps=steps, lam="zero",
                                                        finish_steps=steps, lr_weight=3e-4))
    q_s, seq = _run(MethodConfig(name="mrem_s", modules=3, steps=steps, lam="zero", lr_weight=3e-4))
    a, b = _quant_state(q_p), _quant_state(q_s)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r.losses for r in results] == [m.losses for m in seq.modules]
    assert [(before, after) for before, after, _ in decisions] == [(m.error_before, m.error_after) for m in seq.modules]
    assert [kept for *_, kept in decisions] == [m.kept for m in seq.modules]
    if revert is not None:
        assert [m.kept for m in seq.modules] == ["trained", "initial", "trained"]


def test_finish_phase_trains_the_last_steps_on_the_finished_upstream():
    # The parallel phase is the plain lockstep run's; from step steps - finish_steps on, module 0
    # (nothing upstream) trains as before and the later modules on other inputs.
    plain = _pipeline_run(MethodConfig(name="mrem_p", modules=3, steps=8, lam="anneal", lr_weight=3e-4))[1]
    finish = _pipeline_run(MethodConfig(name="mrem_p", modules=3, steps=8, lam="anneal", finish_steps=3,
                                        lr_weight=3e-4))[1]
    assert finish[0].losses == plain[0].losses
    for p, f in zip(plain[1:], finish[1:]):
        assert f.losses[:5] == p.losses[:5] and f.losses[5:] != p.losses[5:]
        assert f.lams == p.lams[:5] + [0.0] * 3  # the finish steps: the finished quantized upstream alone
