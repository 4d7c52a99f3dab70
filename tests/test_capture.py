"""Capture failures are one clear error and nothing else: no torch.export log spam on stderr (checked in a fresh
interpreter, where torch's log handlers write to the real stderr), an input dtype that does not match the model
named up front, a Hugging Face causal LM that returns its key/value cache told to use use_cache=False."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fxprune
from conftest import assert_unchanged, snapshot
from fxprune import zoo
from fxprune.errors import CaptureError

def run_python(code: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_wrong_input_size_prints_nothing_but_the_error():
    r = run_python("""
        import torch, fxprune
        from fxprune import zoo
        try:
            fxprune.prune(zoo.build("lenet5"), torch.randn(2, 1, 32, 32), "l1", amount=0.5, progress=False)
        except fxprune.CaptureError as e:
            print(str(e).splitlines()[0])
        """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr == "", f"{len(r.stderr.splitlines())} lines on stderr, starting: {r.stderr[:500]}"
    assert r.stdout.startswith("torch.export could not capture LeNet5 with inputs [2, 1, 32, 32] float32: "
                               "RuntimeError: a and b must have same reduction dim"), r.stdout


def test_cli_wrong_input_size_is_one_line(tmp_path):
    (tmp_path / "tinynet.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))\n")
    r = subprocess.run([sys.executable, "-m", "fxprune.cli", "prune", "tinynet:build", "--input-shape", "1,30,30",
                        "--method", "l1", "--amount", "0.5"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) <= 2, r.stderr[:3000]  # the "pruning ..." progress line, the error
    assert lines[-1].startswith("fxprune: error: torch.export could not capture Sequential with inputs "
                                "[2, 1, 30, 30] float32"), lines[-1]
    assert "What to try" in lines[-1]  # the advice is on the same line


def mlp():
    torch.manual_seed(0)
    return zoo.build("mlp").eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_input_dtype_other_than_the_model_is_named(dtype):
    model = mlp()  # linear layers: torch.export itself lets a float64 input through, the failure came later
    snap = snapshot(model)
    with pytest.raises(CaptureError) as err:
        fxprune.prune(model, torch.randn(2, 1, 28, 28, dtype=dtype), "l1", amount=0.5, progress=False)
    msg = str(err.value)
    name = str(dtype).replace("torch.", "")
    assert f"example input 0 is {name} but MLP's parameters are float32" in msg and "\n" not in msg, msg
    assert "x.to(torch.float32)" in msg
    assert_unchanged(model, snap)


def test_conv_model_dtype_mismatch_is_named():
    model, x = zoo.build("lenet5").eval(), zoo.example_input("lenet5").double()
    with pytest.raises(CaptureError, match="example input 0 is float64 but LeNet5's parameters are float32"):
        fxprune.describe_groups(model, x)


class CastsItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x.to(self.a.weight.dtype))))


def test_a_model_that_casts_its_input_is_not_refused():
    torch.manual_seed(0)
    model = CastsItsInput().eval()
    res = fxprune.prune(model, torch.randn(4, 6, dtype=torch.float64), "l1", amount=0.5, round_to=None,
                        progress=False)
    assert res.model.a.out_features == 4


def tiny_causal_lm(kind: str, use_cache: bool):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=50, bos_token_id=0, eos_token_id=0, use_cache=use_cache)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, **common)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   hidden_size=16, intermediate_size=32, max_position_embeddings=32, **common)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_kv_cache_switched_off_for_the_capture(kind):
    """A causal LM built with its default config returns a key/value cache, which torch.export cannot return:
    the cache is switched off for the capture only, and the config comes back as it was."""
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    model = tiny_causal_lm(kind, use_cache=True)
    text = fxprune.describe_groups(model, ids)
    assert model.config.use_cache is True
    assert text == fxprune.describe_groups(tiny_causal_lm(kind, use_cache=False), ids)


class CachesAnchors(nn.Module):
    """Caches a tensor computed in forward on itself when absent or stale (RT-DETR's decoder caches its anchor
    grid this way); under torch.export the cached value would be a FakeTensor."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 2)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        if getattr(self, "anchors", None) is None or self.anchors.shape[0] != y.shape[-1]:
            self.anchors = torch.arange(y.shape[-1], dtype=y.dtype)
            self.calls = getattr(self, "calls", 0) + 1
        return self.fc((y * self.anchors).mean((2, 3)))


def _state(model: nn.Module) -> dict:
    """Every module's __dict__ (tensors by value), parameters and buffers."""
    out = {}
    for name, mod in model.named_modules():
        for k, v in vars(mod).items():
            if k in ("_parameters", "_buffers", "_modules"):
                v = {kk: (vv.detach().clone() if isinstance(vv, torch.Tensor) else type(vv)) for kk, vv in v.items()}
            elif isinstance(v, torch.Tensor):
                v = ("tensor", type(v), v.detach().clone())
            elif not isinstance(v, (int, float, str, bool, type(None))):
                continue  # hooks dicts etc.: compared by key below
            out[(name, k)] = v
    return out


def _assert_same_state(before: dict, after: dict):
    assert before.keys() == after.keys()
    for key, v in before.items():
        w = after[key]
        if isinstance(v, dict):
            assert v.keys() == w.keys(), key
            for kk in v:
                assert (torch.equal(v[kk], w[kk]) and type(v[kk]) is type(w[kk])) if isinstance(v[kk], torch.Tensor) \
                    else v[kk] == w[kk], (key, kk)
        elif isinstance(v, tuple):
            assert w[1] is v[1] is torch.Tensor and torch.equal(v[2], w[2]), key
        else:
            assert v == w, key


@pytest.mark.parametrize("forward_first", [False, True])
def test_a_module_that_caches_a_tensor_in_forward_is_left_as_it_was(forward_first):
    """Capture restores what the traced forward assigned: after a successful prune and after a failing one the
    user's model holds no FakeTensor, equals its state before, deep-copies; the pruned model runs and caches its
    own anchors."""
    import copy
    from torch._subclasses.fake_tensor import FakeTensor
    torch.manual_seed(0)
    model, x = CachesAnchors().eval(), torch.randn(2, 3, 10, 10)
    if forward_first:
        model(x)
    before = _state(model)
    res = fxprune.prune(model, x, "l1", amount=0.5, round_to=None, progress=False)
    _assert_same_state(before, _state(model))
    assert not any(isinstance(v, FakeTensor) for m in model.modules() for v in vars(m).values())
    copy.deepcopy(model)
    assert res.model.c1.out_channels == 4 and res.verified < 1e-4
    with torch.no_grad():
        assert res.model(torch.randn(2, 3, 12, 12)).shape == (2, 2)  # a new size recomputes the slim model's cache
    with pytest.raises(fxprune.CaptureError):  # fails inside torch.export, after the forward assigned
        fxprune.prune(model, torch.randn(2, 3, 2, 2), "l1", amount=0.5, round_to=None, progress=False)
    _assert_same_state(before, _state(model))
    copy.deepcopy(model)


class CachesInADict(nn.Module):
    """Fills a dict attribute in forward (LeViT's attention_bias_cache, keyed by device): under torch.export the
    dict itself stays the same object but gains a FakeTensor entry."""

    def __init__(self):
        super().__init__()
        self.c1, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)
        self.cache = {}

    def forward(self, x):
        y = torch.relu(self.c1(x))
        key = str(y.device)
        if key not in self.cache:
            self.cache[key] = torch.ones(y.shape[-1], dtype=y.dtype)
        return self.fc((y * self.cache[key]).mean((2, 3)))


def test_a_dict_cache_filled_in_forward_is_left_as_it_was():
    import copy
    model, x = CachesInADict().eval(), torch.randn(2, 3, 10, 10)
    res = fxprune.prune(model, x, "l1", amount=0.5, round_to=None, progress=False)
    assert model.cache == {}  # before the fix: {'cpu': FakeTensor(...)}, and deepcopy below raised
    copy.deepcopy(model)
    assert res.model.c1.out_channels == 4 and res.verified < 1e-4


class RecordsStagesWithHooks(nn.Module):
    """transformers' output capturing: the first forward registers a forward hook on each stage that appends the
    stage's output to a collector, and sets a flag so later forwards do not register them again; the head reads
    the collected outputs in order, one projection per stage."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()),
                                     nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU())])
        self.heads = nn.ModuleList([nn.Linear(8, 4), nn.Linear(16, 4)])
        self.collected = None

    def _install(self):
        for stage in self.stages:
            stage.register_forward_hook(lambda mod, args, out: self.collected.append(out))
        self._hooks_installed = True

    def forward(self, x):
        if not getattr(self, "_hooks_installed", False):
            self._install()
        self.collected = []
        for stage in self.stages:
            x = stage(x)
        return sum(head(h.mean((2, 3))) for h, head in zip(self.collected, self.heads))


def test_hooks_a_forward_installs_are_removed_with_its_flag():
    model, x = RecordsStagesWithHooks().eval(), torch.randn(2, 3, 10, 10)
    res = fxprune.prune(model, x, "l1", amount=0.5, round_to=None, progress=False)
    # before the fix the flag was removed but the hooks kept: the slim model's first forward installed a second
    # set, collected [s0, s0, s1, s1] and its second head read stage 0's 4 channels ("shapes cannot be multiplied")
    assert all(len(s._forward_hooks) == 0 for s in model.stages) and not hasattr(model, "_hooks_installed")
    assert res.model.stages[0][0].out_channels == 4 and res.verified < 1e-4
    model(x)
    assert all(len(s._forward_hooks) == 1 for s in model.stages)
