import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fxprune.errors import ConfigError, DataError
from fxprune.finetune import evaluate, finetune


def blobs(n=400, classes=4, seed=0):
    """Well separated Gaussian blobs in 8-D: a tiny model can reach ~100 %."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, 8, generator=g) * 4
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, 8, generator=g), y


def mlp(seed, hidden=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 4))


def test_finetune_improves_accuracy():
    data = blobs()
    model = mlp(0)
    before = evaluate(model, data)
    out = finetune(model, data, epochs=5, lr=0.05, batch_size=32, progress=False)
    after = evaluate(model, data)
    assert out is model and not model.training
    assert after > max(before, 0.9)


def test_dataloader_input():
    x, y = blobs()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = finetune(mlp(1), loader, epochs=3, lr=0.05, progress=False)
    assert evaluate(model, loader) > 0.9


def test_distillation_moves_student_toward_teacher():
    x, y = blobs()
    teacher = finetune(mlp(0, hidden=32), (x, y), epochs=5, lr=0.05, progress=False).train()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = mlp(1)

    def gap():
        with torch.no_grad():
            t = F.log_softmax(teacher.eval()(x) / 4.0, dim=1)
            s = F.log_softmax(student.eval()(x) / 4.0, dim=1)
            teacher.train()
            return F.kl_div(s, t, reduction="batchmean", log_target=True).item()

    before = gap()
    wrong = torch.zeros_like(y)  # alpha=1: labels must not matter, only the teacher does
    finetune(student, (x, wrong), epochs=5, lr=0.05, batch_size=32, teacher=teacher, alpha=1.0, progress=False)
    assert gap() < 0.2 * before
    assert evaluate(student, (x, y)) > 0.9  # it learned the true classes from the teacher alone
    assert teacher.training  # the teacher's own mode is given back
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())


def test_max_steps_honored():
    calls = []
    model = mlp(0)
    model.register_forward_hook(lambda m, i, o: calls.append(m.training))
    finetune(model, blobs(), epochs=10, batch_size=16, max_steps=3, progress=False)
    assert calls.count(True) == 3


def test_seeded_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a = finetune(mlp(0), blobs(), epochs=1, progress=False)
    b = finetune(mlp(0), blobs(), epochs=1, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_evaluate_restores_flag():
    model = mlp(0).train()
    acc = evaluate(model, blobs(), batch_size=50)
    assert 0.0 <= acc <= 1.0 and model.training


def test_bad_arguments():
    data = blobs()
    for kwargs in (dict(lr=0), dict(epochs=0), dict(alpha=1.5), dict(temperature=0), dict(max_steps=0)):
        with pytest.raises(ConfigError):
            finetune(mlp(0), data, progress=False, **kwargs)
    with pytest.raises(DataError):
        finetune(mlp(0), (data[0], data[1][:-1]), progress=False)
    with pytest.raises(DataError):
        evaluate(mlp(0), (data[0][:0], data[1][:0]))
    with pytest.raises(ConfigError, match="max_steps"):
        finetune(mlp(0), iter([data]), progress=False)  # no length: the schedule needs max_steps


def test_setup_hook_sees_the_optimizer_and_the_step_budget():
    from fxprune.finetune import finetune
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    data = (torch.randn(20, 1, 2, 2), torch.randint(0, 2, (20,)))
    seen = []
    finetune(model, data, epochs=2, batch_size=8, progress=False, setup=lambda opt, steps: seen.append((opt, steps)))
    (opt, steps), = seen
    assert isinstance(opt, torch.optim.SGD) and steps == 6  # 3 batches per epoch, 2 epochs
    assert any(p is model[1].weight for g in opt.param_groups for p in g["params"])
