"""The fused model (ckptkd.training.fusion): N members computed as one equal each member computed alone (forward,
gradients, BatchNorm statistics, optimizer steps), per-member state in and out, and refusals that say what cannot
fuse.

Tolerances: in float64 a fused model equals its members to 1e-9; only the order of the arithmetic differs."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ckptkd.errors import UserError
from ckptkd.models import create
from ckptkd.training.engines import choose_engine
from ckptkd.training.fusion import FusedModel, fusable, fuse
from ckptkd.training.fusion import model as fusion_model
from ckptkd.training.fusion.rewrite import Rewriter
from ckptkd.training.fusion.ops import Unsupported

# (name, kwargs, channels, size): every family of the zoo, small.
ARCHITECTURES = [("resnet8", {}, 3, 8), ("wrn_10_1", {}, 3, 8), ("vgg8", {}, 3, 32), ("MobileNetV2", {}, 3, 16),
                 ("ShuffleV1", {}, 3, 16), ("ShuffleV2", {}, 3, 16), ("cnn", {"channels": [4, 8], "hidden": 16}, 1, 8),
                 ("mlp", {"widths": [16], "batch_norm": True, "dropout": 0.0}, 1, 8), ("lenet5", {}, 1, 8)]
FX_NODE_OPS = {"placeholder", "get_attr", "call_module", "call_function", "call_method", "output"}


@pytest.mark.parametrize("name,kwargs,channels,size", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_a_fused_model_is_its_members_exactly(name, kwargs, channels, size):
    """float64, so only the arithmetic's order could differ: forward in train and eval mode, the gradient of the
    summed losses (each member's own), an SGD step with momentum and BatchNorm statistics all equal the separate
    models'. (Over many steps on random labels even float64 rounding grows, ~1000x a step in MobileNetV2's
    BatchNorm over few values: the equivalence is of each step.)"""
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(create(name, num_classes=5, in_channels=channels, image_size=(size, size), **kwargs).double())
    _assert_fused_steps_equal_separate_steps(models, (channels, size, size), num_classes=5, channels_last=True)


class Handmade(nn.Module):
    """What the zoo does not use: convolutions that pad themselves (reflect, circular, asymmetric 'same'), a
    parameter and buffers read directly in forward, an unused parameter, a non-persistent buffer, a tensor computed
    in forward from no member tensor (the same in every member), functional dropout following self.training, tensor
    methods, and two outputs."""

    def __init__(self, num_classes=4, in_channels=2):
        super().__init__()
        self.reflect = nn.Conv2d(in_channels, 4, 3, padding=(1, 2), padding_mode="reflect")
        self.circular = nn.Conv2d(4, 4, 4, padding="same", padding_mode="circular", bias=False)
        self.line = nn.Conv1d(4, 4, 2, padding="same", padding_mode="replicate")
        self.norm = nn.BatchNorm2d(4)
        self.scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.unused = nn.Parameter(torch.randn(3))
        self.register_buffer("shift", torch.randn(4, 1, 1))
        self.register_buffer("scratch", torch.randn(2), persistent=False)
        self.head = nn.Linear(4, num_classes)
        self.weight = nn.Parameter(torch.randn(num_classes, 4) * 0.1)

    def forward(self, x):
        x = self.circular(F.relu(self.reflect(x)))
        x = self.norm(x) * self.scale + self.shift
        x = self.line(x.flatten(2)).unflatten(2, (-1, x.shape[-1]))
        x = F.dropout(x, p=0.5, training=self.training) * torch.tensor(2.0, dtype=x.dtype)
        features = x.amax((2, 3))
        return self.head(features), F.linear(features, self.weight)


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "channels-first"])
def test_a_handmade_model_fuses_exactly_in_either_layout(channels_last):
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(Handmade().double())
    for model in models:
        model.eval()  # dropout draws other masks fused; in eval mode it is the identity in both
    _assert_fused_steps_equal_separate_steps(models, (2, 6, 6), num_classes=4, channels_last=channels_last)


def _assert_fused_steps_equal_separate_steps(models, input_shape, num_classes, channels_last):
    """Two SGD steps (momentum, Nesterov, weight decay) of the fused model on the summed member losses against each
    member's own steps, then a forward in eval mode; every output of a model that returns several is compared."""
    n = len(models)
    separate = [copy.deepcopy(m) for m in models]
    fused = fuse(models, channels_last=channels_last)
    opt = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4) for m in separate]
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # the second step uses the momentum of the first
        x = torch.randn(n, 16, *input_shape, generator=gen, dtype=torch.float64)
        y = torch.randint(num_classes, (n, 16), generator=gen)
        opt.zero_grad()
        (n * sum(F.cross_entropy(out.flatten(0, 1), y.flatten()) for out in _outputs(fused(x)))).backward()
        opt.step()
        for i, (m, o) in enumerate(zip(separate, opts)):
            o.zero_grad()
            sum(F.cross_entropy(out, y[i]) for out in _outputs(m(x[i]))).backward()
            o.step()
    for member, model in zip(fused.state_dicts(), separate):
        assert list(member) == list(model.state_dict())
        for key, value in model.state_dict().items():
            assert torch.allclose(member[key].double(), value.double(), atol=1e-9, rtol=1e-9), key
    fused.eval()
    x = torch.randn(n, 4, *input_shape, dtype=torch.float64)
    expected = [torch.stack(outs) for outs in zip(*(_outputs(m.eval()(x[i])) for i, m in enumerate(separate)))]
    for out, want in zip(_outputs(fused(x)), expected, strict=True):
        assert torch.allclose(out, want, atol=1e-9)


def _outputs(result):
    return list(result) if isinstance(result, tuple) else [result]


def test_functional_dropout_follows_the_fused_models_train_and_eval_mode():
    torch.manual_seed(0)
    fused = fuse([Handmade().double() for _ in range(2)])
    x = torch.randn(2, 8, 2, 6, 6, dtype=torch.float64)
    fused.eval()
    assert torch.equal(fused(x)[0], fused(x)[0])
    fused.train()
    torch.manual_seed(1)
    first = fused(x)[0]
    torch.manual_seed(2)
    assert not torch.equal(first, fused(x)[0])  # random masks drawn: the flag is read at each call, not traced


def test_fuse_refuses_models_of_different_architectures_and_says_what_cannot_fuse():
    a = create("resnet8", num_classes=10, in_channels=3)
    b = create("resnet14", num_classes=10, in_channels=3)
    with pytest.raises(UserError, match="different architectures"):
        fuse([a, b])

    class Branchy(torch.nn.Module):
        def __init__(self, num_classes, in_channels=3):
            super().__init__()
            self.fc = torch.nn.Linear(in_channels * 64, num_classes)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: not one graph
                return self.fc(x.flatten(1))
            return -self.fc(x.flatten(1))

    ok, why = fusable(Branchy(10))
    assert not ok and "trace" in why
    spec = {"name": "branchy", "in_channels": 3, "image_size": [8, 8]}
    engine, reason = choose_engine(Branchy(10), spec, torch.device("cpu"))
    assert engine == "looped" and "cannot be fused" in reason


class _Applies(nn.Module):
    """A linear layer, then `op` on its output: one op the rewrite may not know."""

    def __init__(self, op, layer=None):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.layer = layer
        self.op = op

    def forward(self, x):
        return self.op(self, self.fc(x))


class _ModeBranching(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if self.training else -self.fc(x)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


class _NamedLikeFusedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.member = nn.Linear(4, 4)

    def forward(self, x):
        return self.member(x)


@pytest.mark.parametrize("model, reason", [
    (_Applies(lambda self, x: self.layer(x), nn.LayerNorm(4)), "'layer' (LayerNorm): no fused form of this layer"),
    (_Applies(lambda self, x: torch.cumsum(x, 1)), "torch.cumsum: not an op the fused rewrite knows"),
    (_Applies(lambda self, x: x.cumsum(1)), "Tensor.cumsum: not an op the fused rewrite knows"),
    (_Applies(lambda self, x: x.sum()), "sum without a dim"),
    (_Applies(lambda self, x: x.T), "Tensor attribute 'T'"),
    (_ModeBranching(), "branches on self.training"),
    (_Tied(), "ties"),
    (_NamedLikeFusedModel(), "top-level attribute 'member'"),
    ("not a model", "not a torch.nn.Module (str)"),
], ids=["module", "function", "method", "reduction-over-all", "attribute", "mode-branch", "tied", "reserved-name",
        "not-a-module"])
def test_fusable_refuses_what_the_rewrite_does_not_know_and_names_it(model, reason):
    ok, why = fusable(model)
    assert not ok and reason in why
    if isinstance(model, nn.Module):
        with pytest.raises(UserError, match="cannot fuse"):
            fuse([model, copy.deepcopy(model)])


def test_the_rewriter_dispatches_exactly_the_six_fx_node_ops():
    traced = torch.fx.symbolic_trace(_Applies(lambda self, x: x.relu()))
    handlers = Rewriter(traced, 2, set(), channels_last=False).handlers
    assert set(handlers) == FX_NODE_OPS
    # Each op reaches its own handler: every traced op is one of the six, and the table has no other.
    assert {node.op for node in traced.graph.nodes} <= FX_NODE_OPS
    assert len({handler.__func__ for handler in handlers.values()}) == len(FX_NODE_OPS)


def test_a_graph_node_of_an_unknown_op_makes_fusable_say_so(monkeypatch):
    real_trace = fusion_model.trace

    def trace_with_an_unknown_op(model):
        traced, training_nodes = real_trace(model)
        next(node for node in traced.graph.nodes if node.op == "call_module").op = "call_custom"
        return traced, training_nodes

    monkeypatch.setattr(fusion_model, "trace", trace_with_an_unknown_op)
    ok, why = fusable(_Applies(lambda self, x: x))
    assert not ok and "call_custom" in why and "'fc'" in why
    with pytest.raises(Unsupported, match="call_custom"):
        traced, _ = trace_with_an_unknown_op(_Applies(lambda self, x: x))
        Rewriter(traced, 2, set(), channels_last=False).run()


def test_members_state_dicts_come_out_and_go_back_in_bit_exactly():
    torch.manual_seed(0)
    models = [Handmade() for _ in range(3)]
    fused = fuse(models)
    assert isinstance(fused, FusedModel) and fused.num_members == 3
    for member, model in zip(fused.state_dicts(), models):
        original = model.state_dict()
        assert list(member) == list(original)  # the non-persistent buffer is in neither
        assert all(torch.equal(member[key], original[key]) for key in original)
    assert {key: tuple(v.shape) for key, v in fused.state_dict().items()} == {
        key: (3, *v.shape) for key, v in models[0].state_dict().items()}
    # The original names (in the order the forward first uses each layer, not the order of the original).
    assert sorted(name for name, _ in fused.named_parameters()) == sorted(
        name for name, _ in models[0].named_parameters())

    others = [Handmade().state_dict() for _ in range(3)]
    fused.load_state_dicts(others)
    assert all(torch.equal(fused.member(i)[key], others[i][key]) for i in range(3) for key in others[i])
    replacement = Handmade().state_dict()
    fused.load_member(1, replacement)
    assert all(torch.equal(fused.member(1)[key], replacement[key]) for key in replacement)
    assert all(torch.equal(fused.member(i)[key], others[i][key]) for i in (0, 2) for key in others[i])
    member = fused.member(0)
    member["norm.running_mean"] += 1  # a copy: changing it leaves the model alone
    assert torch.equal(fused.member(0)["norm.running_mean"], others[0]["norm.running_mean"])


def test_loading_a_state_dict_of_the_wrong_keys_shapes_or_count_is_refused_naming_it():
    fused = fuse([Handmade() for _ in range(2)])
    good = Handmade().state_dict()
    with pytest.raises(UserError, match="3 state dicts for 2 members"):
        fused.load_state_dicts([good] * 3)
    with pytest.raises(UserError, match=r"member 1: missing keys \['scale'\]"):
        fused.load_state_dicts([good, {k: v for k, v in good.items() if k != "scale"}])
    with pytest.raises(UserError, match="'head.bias' has shape"):
        fused.load_member(0, {**good, "head.bias": torch.zeros(5)})


def test_fuse_refuses_cumulative_batchnorm_averages_whose_counters_differ():
    models = [nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=None)) for _ in range(2)]
    models[1](torch.randn(8, 4))  # one more batch counted
    with pytest.raises(UserError, match="num_batches_tracked differ"):
        fuse(models)


def test_a_fused_model_survives_deepcopy_and_pickle():
    """The generated forward is not picklable itself: it is rebuilt from the graph, reading the copy's tensors."""
    torch.manual_seed(0)
    fused = fuse([Handmade().double() for _ in range(2)]).eval()
    x = torch.randn(2, 3, 2, 6, 6, dtype=torch.float64)
    expected = fused(x)
    for copied in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert all(torch.equal(a, b) for a, b in zip(copied(x), expected, strict=True))
        with torch.no_grad():
            copied.head.bias.add_(1)
        assert torch.equal(copied(x)[0], expected[0] + 1) and torch.equal(fused(x)[0], expected[0])


def test_a_fused_model_refuses_an_input_without_one_batch_per_member():
    fused = fuse([Handmade() for _ in range(2)])
    with pytest.raises(ValueError, match=r"takes x of shape \[2, B, \.\.\.\] \(one batch per member\), got \(5, 2"):
        fused(torch.randn(5, 2, 6, 6))
