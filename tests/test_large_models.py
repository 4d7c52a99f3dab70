"""Language models as users bring them: bfloat16 / float16 weights, the default config (key/value cache on),
calibration sequences longer than the example and tokenizer-style batches. Small random Llama (grouped-query
attention) and GPT-2 configs; the reference is independent of fxprune: the full-width model in float32 with forward
pre-hooks that zero / reconstruct the consumers' pruned input channels (conftest.consumer_reference)."""

import numpy as np
import pytest
import torch

import fxprune
from conftest import consumer_reference, rel_err
from fxprune.errors import CaptureError, DataError, VerificationError
from fxprune.rewrite import Plan
from fxprune.verify import verify

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()
from test_transformers import reinit  # noqa: E402 - needs transformers

VOCAB = 64


def lm(kind: str, dtype=torch.float32, **cfg):
    torch.manual_seed(0)
    if kind == "llama":  # 4 query heads sharing 2 kv heads
        c = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **cfg)
        model = T.LlamaForCausalLM(c)
    else:
        c = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **cfg)
        model = T.GPT2LMHeadModel(c)
    return reinit(model).eval().to(dtype)


def ids(n=2, length=12, seed=1):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["l1", "id"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_half_precision_lm_pruned_in_its_dtype(kind, dtype, method):
    model = lm(kind, dtype)
    before = state(model)
    x = ids()
    res = fxprune.prune(model, x, method, amount=0.5, round_to=None, progress=False,
                        calib=ids(16, 12, seed=2) if method == "id" else None)
    assert res.verified is not None and res.decisions
    assert all(p.dtype == dtype for p in res.model.parameters()), "pruned in the model's dtype, not float32"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the user's model changed"
    # The slim half model against the float32 masked full-width model: they differ by the half dtype's rounding
    # only (each of the ~10 matmul / norm outputs of two layers rounds once, eps/2 relative); a wrong channel
    # or a wrong fold gives O(1).
    ref = consumer_reference(model, res.analysis, res.decisions, dtype=torch.float32)
    with torch.no_grad():
        got, want = res.model(x).logits.float(), ref(x).logits
    assert rel_err(got, want) <= 8 * torch.finfo(dtype).eps, rel_err(got, want)
    out = res.model.generate(x[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, x.shape[1] + 4)


def test_half_verification_catches_a_wrong_channel():
    model = lm("llama", torch.bfloat16, use_cache=False)
    x = ids()
    res = fxprune.prune(model, x, "l1", amount=0.5, round_to=None, progress=False)
    plan = Plan(res.analysis, res.decisions)
    assert max(c.certified for c in verify(plan, res.analysis.gm, res.graph, res.model, (x,))) <= 1e-4  # float32
    w = res.graph.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert w is res.model.get_submodule("model.layers.0.self_attn.q_proj").weight  # one slim tensor, shared
    with torch.no_grad():  # two kept query rows swapped
        w[[0, 1]] = w[[1, 0]].clone()
    with pytest.raises(VerificationError, match="q_proj.weight' is not the rewrite"):
        verify(plan, res.analysis.gm, res.graph, res.model, (x,))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_default_config_with_cache_on(kind):
    model = lm(kind)  # use_cache=True, as HF builds it
    assert model.config.use_cache is True
    x = ids()
    res = fxprune.prune(model, x, "l1", amount=0.5, round_to=None, progress=False)
    assert model.config.use_cache is True and res.model.config.use_cache is True, "config restored"
    with torch.no_grad():
        full = res.model(x, use_cache=False).logits
        out = res.model.generate(x[:1], max_new_tokens=5, do_sample=False, use_cache=True)
        # greedy decoding with the cache gives the tokens the full forward (no cache) picks
        step = res.model(out[:, :-1], use_cache=False).logits[0, x.shape[1] - 1:].argmax(-1)
    assert torch.equal(step, out[0, x.shape[1]:]), (step, out)
    assert full.shape[-1] == VOCAB


def test_cache_config_restored_when_pruning_fails():
    model = lm("llama")
    with pytest.raises(CaptureError):  # float64 "token ids": the capture fails with the cache switched off
        fxprune.prune(model, torch.randn(2, 12, dtype=torch.float64), "l1", amount=0.5, progress=False)
    assert model.config.use_cache is True


def test_calibration_longer_than_the_example():
    model = lm("llama")
    x = ids(2, 8)
    res = fxprune.prune(model, x, "id", amount=0.5, round_to=None, progress=False, calib=ids(16, 24, seed=3))
    assert res.calib_samples == 16 and res.verified is not None
    # the id decision depends on the long sequences: a second route computes the same fit from a tokenizer-style
    # list of dicts holding the same tokens
    batches = [{"input_ids": t, "attention_mask": torch.ones_like(t)} for t in ids(16, 24, seed=3).split(4)]
    two_inputs = fxprune.prune(_WithMask(model), (x, torch.ones_like(x)), "id", amount=0.5, round_to=None,
                               progress=False, calib=batches)
    for g, d in res.decisions.items():
        mods = res.analysis.groups[g].modules
        g2 = next(h.gid for h in two_inputs.analysis.groups if tuple(m.removeprefix("m.") for m in h.modules) == mods)
        np.testing.assert_array_equal(two_inputs.decisions[g2].keep, d.keep)


class _WithMask(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def test_calibration_dict_without_input_ids_is_refused():
    model = lm("llama")
    with pytest.raises(DataError, match="input_ids"):
        fxprune.prune(model, ids(), "id", amount=0.5, progress=False, calib=[{"tokens": ids()}])


@pytest.mark.parametrize("dtype,method", [(torch.float32, "l1"), (torch.bfloat16, "id")])
def test_inplace_leaves_exactly_the_slim_model_in_the_users_object(dtype, method):
    x, calib = ids(), ids(16, 12, seed=2)
    kw = dict(amount=0.5, round_to=None, progress=False, calib=calib if method == "id" else None)
    copy = fxprune.prune(lm("llama", dtype), x, method, **kw)  # the second route: a slim copy
    model = lm("llama", dtype)
    modules = dict(model.named_modules())
    res = fxprune.prune(model, x, method, inplace=True, **kw)
    assert res.model is model and all(modules[n] is m for n, m in model.named_modules())
    want, got = copy.model.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert model.config.to_dict() == copy.model.config.to_dict()
    assert model.generate(x[:1], max_new_tokens=3, do_sample=False).shape == (1, x.shape[1] + 3)


def test_copy_shares_nothing_with_the_users_model():
    model = lm("llama")
    res = fxprune.prune(model, ids(), "l1", amount=0.5, round_to=None, progress=False)
    users = {t.data_ptr() for t in model.state_dict().values()}
    assert not users & {t.data_ptr() for t in res.model.state_dict().values()}
    slim = dict(res.model.named_parameters())
    for name, p in res.graph.named_parameters():  # the slim graph holds the slim model's own tensors
        assert p is slim[name], name


def test_half_parameters_are_upcast_one_op_at_a_time():
    """torch.export puts every get_attr at the top of the graph; verification's float32 interpreters upcast a
    half parameter when it is fetched, so fetching in graph order held a float32 copy of the whole model (per
    interpreter). compare._steps fetches each parameter just before its first reader and frees it after its last:
    at most one layer's weight and bias are alive, and the outputs are those of the plain interpreter."""
    from torch import nn
    from fxprune.analysis import analyze
    from fxprune.capture import capture
    from fxprune.compare import _steps
    from fxprune.precision import Float32
    layers = [m for _ in range(6) for m in (nn.Linear(16, 16), nn.ReLU())]
    model, x = nn.Sequential(*layers).to(torch.bfloat16).eval(), torch.randn(2, 16, dtype=torch.bfloat16)
    gm = analyze(capture(model, x)).gm
    assert sum(n.op == "get_attr" for n in list(gm.graph.nodes)[:12]) == 12  # all of them first, as exported

    class Up(Float32, torch.fx.Interpreter):
        pass

    interp, alive = Up(gm, half=torch.bfloat16), []
    for node, value in _steps(interp, (x,)):
        alive.append(sum(1 for n in interp.env if n.op == "get_attr"))
        out = value
    assert max(alive) <= 2, alive
    want = Up(gm, half=torch.bfloat16).run(x)  # Interpreter.run: graph order
    first = lambda v: v[0] if isinstance(v, (tuple, list)) else v  # noqa: E731 - the graph's one output
    assert torch.equal(first(out), first(want))


def test_big_half_weights_are_upcast_a_block_at_a_time(monkeypatch):
    """An embedding and an LM head above precision.BIG elements are read in float32 a block of rows at a time (a
    float32 copy of a language model's head was 0.3x of the model); the outputs are the whole-weight upcast's, and
    the pruned model still verifies."""
    import transformers as T
    from fxprune import precision
    from fxprune.analysis import analyze
    from fxprune.capture import capture
    cfg = T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    torch.manual_seed(0)
    model = reinit(T.LlamaForCausalLM(cfg)).to(torch.bfloat16).eval()
    ids = torch.randint(0, 96, (2, 10))
    gm = analyze(capture(model, ids)).gm

    class Up(precision.Float32, torch.fx.Interpreter):
        pass

    whole = Up(gm, half=torch.bfloat16).run(ids)[0]
    monkeypatch.setattr(precision, "BIG", 100)  # every weight here is "big": 32 x 96 blocks of 3 rows
    seen = []
    monkeypatch.setattr(Up, "_blockwise", lambda self, *a, _f=Up._blockwise: seen.append(a[3]) or _f(self, *a))
    blocks = Up(gm, half=torch.bfloat16).run(ids)[0]
    assert {"rows", "gather"} <= set(seen)
    assert blocks.dtype == torch.float32 and rel_err(blocks, whole) < 1e-5  # float32 sums over 32-64 terms
    res = fxprune.prune(model, ids, "l1", amount=0.5, progress=False)
    assert res.verified is not None and res.verified <= 1e-4
