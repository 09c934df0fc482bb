"""Decoder LLMs through the family protocol (tiny random configs, seconds each): Llama, Qwen2 (q/k/v
biases), Mistral (sliding-window attention) and GPT-2 (Conv1D projections, learned positions) run
piece by piece exactly as Hugging Face runs them whole; every projection is quantized; a tied
embedding / LM head survives release and the streamed export as one tensor; perplexity and the
agreement metrics equal their definitions computed by hand; groups of input columns."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mrem_dist.artifact import export_quantized
from mrem_dist.artifact.export import mrem_shard, write_mrem
from mrem_dist.artifact.shard import ExportInfo, Manifest
from mrem_dist.data import Batch
from mrem_dist.engine import partition
from mrem_dist.engine.gptq import gptq_model
from mrem_dist.quant.gptq import GptqOptions
from mrem_dist.engine.shard import holds, release_unowned, tensor_owner
from mrem_dist.engine.reconstruct import ModuleTrainer, ReconSettings, frozen_keys, load_snapshot, snapshot
from mrem_dist.engine.stage import Stage
from mrem_dist.models import CausalLM, family_for
from mrem_dist.models import tasks
from mrem_dist.models.tasks import PerplexityState
from mrem_dist.quant import QuantLinear, WeightQuantizer
from mrem_dist.quantize import copy_to_quantize, quantize_model
from mrem_dist.scheme import QuantScheme

VOCAB = 120
W4G16 = QuantScheme(name="w4a16_g16", w_bits=4, e_bits=None, a_bits=None, w_symmetric=False,
                    w_granularity="input_group", w_group_size=16)


def tiny_decoder_config(kind: str):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
    if kind == "llama":  # grouped-query attention, tied embeddings (SmolLM2's layout)
        return LlamaConfig(**common, tie_word_embeddings=True)
    if kind == "qwen2":  # biases on q/k/v
        return Qwen2Config(**common, tie_word_embeddings=False)
    if kind == "mistral":  # a window shorter than the sequences: the sliding mask matters
        return MistralConfig(**common, sliding_window=5)
    if kind == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0,
                          eos_token_id=1)
    raise ValueError(kind)


def build_decoder(kind: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_decoder_config(kind)).eval()


def _batch(n: int = 2, length: int = 12, seed: int = 1) -> Batch:
    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    return Batch(ids, torch.ones_like(ids))


KINDS = ("llama", "qwen2", "mistral", "gpt2")
PROJECTIONS = {"llama": 7, "qwen2": 7, "mistral": 7, "gpt2": 4}


@pytest.mark.parametrize("kind", KINDS)
def test_the_stage_chain_reproduces_the_whole_models_logits(kind):
    model = build_decoder(kind)
    family = family_for(model.config.model_type)
    batch = _batch()
    with torch.no_grad():
        reference = model(input_ids=batch.input_ids).logits
        torch.testing.assert_close(family.forward(model, batch), reference, rtol=0, atol=0)
        for modules in (2, 3):
            hidden = None
            for spec in partition(model, family, modules):
                out = Stage(model, family, spec)(hidden, batch)
                hidden = out.hidden[-1]
            torch.testing.assert_close(out.logits, reference, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_every_projection_is_quantized(kind):
    model = build_decoder(kind)
    family = family_for(model.config.model_type)
    n_layers = len(family.layers(model))
    q = quantize_model(copy.deepcopy(model), family, W4G16)
    quantized = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == PROJECTIONS[kind] * n_layers
    assert not any(type(m) is nn.Linear for layer in family.layers(q) for m in layer.modules())
    assert type(q.lm_head) is nn.Linear  # the LM head stays in full precision
    if kind == "qwen2":
        assert all(q.model.layers[0].self_attn.get_submodule(p).bias is not None for p in ("q_proj", "k_proj", "v_proj"))
    with torch.no_grad():  # 4 bits, groups of 16: close to, not equal to, full precision
        batch = _batch()
        fp, out = family.forward(model, batch), family.forward(q, batch)
    assert 0 < (out - fp).norm() / fp.norm() < 0.5


def test_the_final_norm_and_the_lm_head_belong_to_the_last_module():
    model = build_decoder("llama")
    family = family_for("llama")
    specs = partition(model, family, 2)
    owner = tensor_owner(model, family, specs)
    assert owner("model.norm.weight") == 1 and owner("lm_head.weight") == 1
    assert owner("model.embed_tokens.weight") == 0
    gpt2 = build_decoder("gpt2")
    g_owner = tensor_owner(gpt2, family_for("gpt2"), partition(gpt2, family_for("gpt2"), 2))
    assert g_owner("transformer.wpe.weight") == 0 and g_owner("transformer.ln_f.weight") == 1


@pytest.mark.parametrize("kind", ("llama", "gpt2"))
def test_tied_embeddings_survive_release_and_the_streamed_export_byte_for_byte(kind, tmp_path):
    """Two ranks' shards of a model with a tied embedding / LM head, merged from their manifests and
    written tensor by tensor (what an MREM-P coordinator does), give the artifact one process writes
    from the whole model, byte for byte; the tied table is stored once and re-tied on load."""
    import mrem_dist
    from transformers import AutoTokenizer

    from conftest import minilm_dir

    model = build_decoder(kind)
    family = family_for(model.config.model_type)
    embed = family.word_embeddings(model).weight
    assert model.lm_head.weight is embed
    specs = partition(model, family, 2)
    owner = tensor_owner(model, family, specs)
    shards = {}
    for rank in (0, 1):
        shard = copy.deepcopy(model)
        release_unowned(shard, owner, {rank})
        assert shard.lm_head.weight is family.word_embeddings(shard).weight
        assert shard.lm_head.weight.numel() == VOCAB * 32  # both end modules keep the tied table
        q = quantize_model(shard, family, W4G16, layers=set(specs[rank].layers), embeddings=rank == 0)
        shards[rank] = mrem_shard(q, holds(q, owner, {rank}))
    embed_name = next(n for n, t in model.state_dict(keep_vars=True).items() if t is embed)
    assert all(embed_name in s.tensors for s in shards.values())  # sent by both, written once
    merged = Manifest.merge({rank: s.manifest(rank) for rank, s in shards.items()})
    stream = [item for s in shards.values() for item in s.tensors.items()]
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    write_mrem(tmp_path / "streamed", merged, stream, model, ExportInfo(tokenizer, W4G16, "causal_lm", family.name))
    single = quantize_model(copy.deepcopy(model), family, W4G16)
    export_quantized(single, tokenizer, W4G16, "causal_lm", tmp_path / "whole")
    for name in ("model.safetensors", "quantization.json"):
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    from safetensors import safe_open

    with safe_open(str(tmp_path / "streamed" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names  # stored once, under the embedding's name, re-tied on load
    art = mrem_dist.load_quantized(tmp_path / "streamed")
    assert art.task.kind == "causal_lm" and art.meta.scheme.w_group_size == 16
    assert art.model.lm_head.weight is family.word_embeddings(art.model).weight
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(family.forward(art.model, batch), family.forward(single, batch))


@pytest.mark.parametrize("positions", [None, 3])
def test_perplexity_and_agreement_equal_their_definitions_by_hand(positions, monkeypatch):
    """None: every position of a window at once; 3: three positions at a time (a 49K vocabulary's
    chunks), the same sums."""
    if positions:
        monkeypatch.setattr(tasks, "_CHUNK_ELEMENTS", positions * VOCAB)
    torch.manual_seed(0)
    batches = [_batch(3, 9, seed=s) for s in (1, 2)]
    fp = [torch.randn(3, 9, VOCAB) * 2 for _ in batches]
    q = [f + 0.7 * torch.randn_like(f) for f in fp]
    whole = PerplexityState()
    parts = [PerplexityState(), PerplexityState()]
    for i, b in enumerate(batches):
        whole.update(fp[i], q[i], b)
        parts[i].update(fp[i], q[i], b)
    fp_metrics, q_metrics = whole.compute()

    def nll(logits):  # position t predicts token t+1
        return torch.cat([F.cross_entropy(x[:, :-1].reshape(-1, VOCAB), b.input_ids[:, 1:].reshape(-1), reduction="none")
                          for x, b in zip(logits, batches)])

    assert fp_metrics["perplexity"] == pytest.approx(torch.exp(nll(fp).mean()).item(), rel=1e-6)
    assert q_metrics["perplexity"] == pytest.approx(torch.exp(nll(q).mean()).item(), rel=1e-6)
    assert q_metrics["perplexity_ratio"] == pytest.approx(q_metrics["perplexity"] / fp_metrics["perplexity"])
    p = torch.cat([F.log_softmax(x[:, :-1], -1).reshape(-1, VOCAB) for x in fp])
    r = torch.cat([F.log_softmax(x[:, :-1], -1).reshape(-1, VOCAB) for x in q])
    kl = F.kl_div(r, p, log_target=True, reduction="batchmean").item()  # KL(FP || quantized) per token
    assert q_metrics["kl"] == pytest.approx(kl, rel=1e-5)
    assert q_metrics["top1_agreement"] == pytest.approx((p.argmax(-1) == r.argmax(-1)).float().mean().item())
    merged = parts[0].merge(parts[1]).compute()
    assert merged[0] == pytest.approx(fp_metrics) and merged[1] == pytest.approx(q_metrics)
    alone = PerplexityState()
    alone.update(None, q[0], batches[0])
    assert alone.compute()[0] is None and set(alone.compute()[1]) == {"perplexity"}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_copy_to_quantize_shares_only_the_unquantized_embeddings_and_head(kind):
    """W-A16: the quantized copy's word embeddings and LM head (tied in Llama, not in Qwen2) are the
    full-precision model's tensors, not copies; training the first module leaves them as loaded,
    its snapshot leaves them out and restores the rest exactly. A quantized embedding (e_bits) is
    the copy's own."""
    model = build_decoder(kind).requires_grad_(False)
    family = family_for(kind)
    emb, head = family.word_embeddings(model).weight, model.get_output_embeddings().weight
    loaded = emb.clone()
    q = quantize_model(copy_to_quantize(model, family, W4G16), family, W4G16)
    assert family.word_embeddings(q).weight is emb and q.get_output_embeddings().weight is head
    assert not any(p is m for p in q.parameters() for m in model.parameters() if p is not emb and p is not head)
    spec = partition(model, family, 2)[0]
    student, teacher = Stage(q, family, spec), Stage(model, family, spec)
    assert frozen_keys(student) == {"embeddings.weight"}
    initial = snapshot(student)
    assert "embeddings.weight" not in initial and len(initial) > 1
    trainer = ModuleTrainer(student, teacher, ReconSettings(steps=2), progress=False)
    for t in range(2):
        trainer.train_step(t, _batch(seed=t), None, None)
    assert torch.equal(emb, loaded) and not emb.requires_grad
    trained = q.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(trained, initial["layers.0.self_attn.q_proj.weight"])
    load_snapshot(student, initial)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in initial.items())
    e8 = QuantScheme(w_bits=4, e_bits=8)
    own = quantize_model(copy_to_quantize(model, family, e8), family, e8)
    assert family.word_embeddings(own).weight is not emb


def test_a_snapshot_takes_the_weights_a_module_starts_from_from_its_teacher():
    """From an RTN start a latent weight is the full-precision weight: the snapshot is the
    teacher's tensor (no second copy of the module's weights), the step sizes are copies, and a
    trained module still returns to its start exactly. A weight that differs from the teacher's
    (GPTQ's, here a changed one) is copied, so that training cannot change the teacher."""
    model = build_decoder("llama").requires_grad_(False)
    family = family_for("llama")
    q = quantize_model(copy_to_quantize(model, family, W4G16), family, W4G16)
    spec = partition(model, family, 2)[1]
    student, teacher = Stage(q, family, spec), Stage(model, family, spec)
    moved_key = "layers.0.mlp.down_proj.weight"
    with torch.no_grad():
        student.layers[0].mlp.down_proj.weight.add_(1e-3)
    initial = snapshot(student, teacher)
    fp = teacher.state_dict()
    shared = {k for k, v in initial.items() if k in fp and v.data_ptr() == fp[k].data_ptr()}
    assert shared == set(fp) - {moved_key} and any(k.endswith("q_proj.weight") for k in shared)
    assert all(v.data_ptr() != student.state_dict()[k].data_ptr() for k, v in initial.items())
    before = {k: v.clone() for k, v in fp.items()}
    trainer = ModuleTrainer(student, teacher, ReconSettings(steps=2), progress=False)
    x = torch.randn(2, 12, model.config.hidden_size)
    for t in range(2):
        trainer.train_step(t, _batch(seed=t), x, x)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not torch.equal(student.layers[0].self_attn.q_proj.weight, initial["layers.0.self_attn.q_proj.weight"])
    load_snapshot(student, initial)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in initial.items())
    assert torch.equal(initial[moved_key], fp[moved_key] + 1e-3)


def test_the_causal_lm_task_scores_logits_of_every_token():
    model = build_decoder("llama")
    task = CausalLM()
    out = task.output(family_for("llama"), model, _batch())
    assert out.shape == (2, 12, VOCAB)


def test_input_groups_are_consecutive_input_columns_of_a_row():
    torch.manual_seed(0)
    w = torch.randn(6, 32)
    w[2, 16:] *= 50  # one group of row 2 with a wide range: only its own scale widens
    wq = WeightQuantizer(4, symmetric=False, granularity="input_group", groups=16).init_from(w)
    scale, zp = wq.dequant_params()
    assert scale.shape == (12, 1) and zp.shape == (12, 1)
    per_group = scale.reshape(6, 2)
    assert per_group[2, 1] > 20 * per_group[2, 0] and per_group[2, 1] > 20 * per_group[3, 1]
    q = wq(w)
    for row in range(6):
        for g in range(2):
            block = w[row, 16 * g:16 * (g + 1)]
            step = (block.max() - block.min()) / 15
            assert (q[row, 16 * g:16 * (g + 1)] - block).abs().max() <= step / 2 + 1e-5
    with pytest.raises(ValueError, match="group_size=12 does not divide the 32 input columns"):
        WeightQuantizer(4, granularity="input_group", groups=12).init_from(w)


def test_gptq_over_a_decoder_beats_round_to_nearest_on_its_calibration_data():
    model = build_decoder("llama")
    family = family_for("llama")
    scheme = QuantScheme(name="w3a16_g16", w_bits=3, e_bits=None, a_bits=None, w_symmetric=False,
                         w_granularity="input_group", w_group_size=16)
    calib = [_batch(4, 16, seed=s) for s in range(4)]
    rtn = quantize_model(copy.deepcopy(model), family, scheme, learnable=False)
    gptq = quantize_model(copy.deepcopy(model), family, scheme, learnable=False)
    errors = gptq_model(gptq, family, calib, GptqOptions(block_size=8))
    assert len(errors) == 7 * 4 and all(e >= 0 for e in errors.values())
    with torch.no_grad():
        fp = [family.forward(model, b) for b in calib]

        def err(m):
            return sum(((family.forward(m, b) - f) ** 2).sum().item() for b, f in zip(calib, fp))

        assert err(gptq) < 0.8 * err(rtn)
        for m in gptq.modules():  # the fake-quantized forward reproduces GPTQ's weights exactly
            if isinstance(m, QuantLinear):
                torch.testing.assert_close(m.weight_quantizer(m.weight), m.weight, rtol=0, atol=0)
