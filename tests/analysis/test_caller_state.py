"""What the Python analysis API leaves behind in the caller's process: the model as it was (BatchNorm statistics of a
model in train mode, its device), torch's global random state, and clear refusals of arguments that failed late."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fp8probe.analysis.pipeline import analyze
from fp8probe.analysis.sweeps import sweep_blocksize, sweep_both, sweep_threshold


def _bn_model() -> nn.Module:
    torch.manual_seed(31)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.Linear(16, 4)).train()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(32)
    return [torch.randn(16, 8, generator=g) * 3 + 1 for _ in range(2)]


@pytest.mark.parametrize("call", [
    lambda m, xs: analyze(m, xs, ["global", "int8"], e2e=True),
    lambda m, xs: sweep_blocksize(m, xs, blocksizes=[32, 64], e2e=True),
    lambda m, xs: sweep_threshold(m, xs, thresholds=[0, 6], e2e=True),
    lambda m, xs: sweep_both(m, xs, blocksizes=[64], thresholds=[0, 6], e2e=True),
], ids=["analyze", "sweep_blocksize", "sweep_threshold", "sweep_both"])
def test_a_model_in_train_mode_keeps_its_batchnorm_statistics_and_the_global_rng_is_the_caller_s(call) -> None:
    """Every capture, end-to-end and sensitivity pass moved BatchNorm's running statistics (num_batches_tracked 0 ->
    26), and the run's torch.manual_seed(seed) stayed in force: every later draw repeated seed 0's."""
    model, xs = _bn_model(), _batches()
    bn = model[1]
    objects = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1234)
    want = torch.rand(4)
    torch.manual_seed(1234)
    res = call(model, xs)
    assert torch.equal(torch.rand(4), want)  # the caller's stream goes on as if no analysis ran
    assert all(r.metadata["train_mode"] is True for r in (res if isinstance(res, tuple) else (res,)))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert (bn.running_mean, bn.running_var, bn.num_batches_tracked) == objects  # the same tensor objects
    assert all(m.training for m in model.modules())


def test_a_failing_run_puts_the_statistics_back_too() -> None:
    model, xs = _bn_model(), _batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def loss(out, batch):  # the second batch fails after the first has run the model
        if loss.calls == 1:
            raise RuntimeError("loss failed")
        loss.calls += 1
        return out.square().mean()
    loss.calls = 0
    with pytest.raises(Exception, match="loss failed"):
        analyze(model, xs, "global", e2e=False, loss=loss)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("device", ["meta", "tpu", "cuda:x", 3.5])
def test_devices_other_than_cpu_and_cuda_are_refused_before_the_model_moves(device) -> None:
    """device="meta" moved the caller's model to meta (its weights gone) and failed inside the replay."""
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    w = model[0].weight.detach().clone()
    for call in (lambda: analyze(model, torch.randn(2, 8), "global", e2e=False, device=device),
                 lambda: sweep_blocksize(model, torch.randn(2, 8), blocksizes=[32], e2e=False, device=device)):
        with pytest.raises(ValueError, match=r"device must be 'cpu' or 'cuda' \(or 'cuda:N'\), got"):
            call()
    assert model[0].weight.device.type == "cpu" and torch.equal(model[0].weight, w)


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -0.5])
def test_a_threshold_that_is_not_finite_is_refused_before_any_work(threshold) -> None:
    """NaN passed `threshold < 0` (then 'cannot merge censuses with thresholds nan and nan' with two batches), Inf
    failed every int8 layer and, with e2e, crashed after the whole isolated analysis."""
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0, got"):
        analyze(model, [torch.randn(2, 8), torch.randn(2, 8)], ["int8", "global"], threshold=threshold)


def test_a_compiled_model_is_analysed_under_its_eager_layer_names() -> None:
    """Every layer of a torch.compile'd module was named '_orig_mod.…': --layers patterns and a compare against the
    eager run matched nothing."""
    torch.manual_seed(33)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(34))
    eager = analyze(base, x, "global", e2e=False)
    compiled = analyze(torch.compile(base), x, "global", e2e=False, layers="^2$")
    assert list(eager.tables["layers"]["layer"]) == ["0", "2"] and list(compiled.tables["layers"]["layer"]) == ["2"]
    assert compiled.tables["gemm"].to_dict("records") == eager.tables["gemm"][eager.tables["gemm"]["layer"] == "2"] \
        .reset_index(drop=True).to_dict("records")


def test_a_dropout_left_in_train_mode_inside_an_eval_model_is_train_mode() -> None:
    """metadata.train_mode read the root module only: the report said "eval (as for inference)" while dropout ran."""
    torch.manual_seed(35)
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 8)).eval()
    model[1].train()
    xs = [torch.randn(4, 16, generator=torch.Generator().manual_seed(36))]
    assert analyze(model, xs, "global", e2e=False).metadata.get("train_mode") is True
    model[1].eval()
    assert "train_mode" not in analyze(model, xs, "global", e2e=False).metadata


def test_the_outlier_census_at_threshold_zero_is_plain_int8() -> None:
    """At threshold 0 LLM.int8 keeps no column in 16-bit, but the outliers table counted every column (|x| >= 0)."""
    torch.manual_seed(37)
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(38))
    row = analyze(model, x, "int8", e2e=False, threshold=0).tables["outliers"].to_dict("records")[0]
    assert row["n_outlier_cols"] == 0 and row["frac_cols"] == 0.0 and row["frac_rows"] == 0.0
    assert row["top_dims"] == [] and max(row["col_amax"]) == pytest.approx(float(x.abs().max()))


@pytest.mark.parametrize("kwargs, error, message", [
    ({"strategy": None}, TypeError, "strategy must be a name, a comma-separated string or a list of names, got None"),
    ({"strategy": 5}, TypeError, "strategy must be a name"),
    ({"batches": 1.5}, ValueError, "batches must be an int >= 1 or None, got 1.5"),
    ({"batches": "2"}, ValueError, "batches must be an int >= 1 or None, got '2'"),
    ({"batches": True}, ValueError, "batches must be an int >= 1 or None, got True"),
    ({"seed": 2**70}, ValueError, r"seed must be an int in \[0, 2\*\*63\), got"),
    ({"seed": 1.5}, ValueError, "seed must be an int"),
    ({"progress": "yes"}, TypeError, r"progress must be True, False or a callable\(done, total\), got 'yes'"),
])
def test_api_arguments_of_the_wrong_type_are_named(kwargs, error, message) -> None:
    """Python or torch internals answered these ('NoneType' object is not iterable, slice indices must be integers,
    Overflow when unpacking long long), or they were taken silently (batches=True, seed=1.5, progress="yes")."""
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    with pytest.raises(error, match=message):
        analyze(model, torch.randn(2, 8), e2e=False, **kwargs)


def test_sweep_values_given_as_one_number_are_named() -> None:
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    with pytest.raises(TypeError, match="blocksizes must be a list of block sizes, got 64"):
        sweep_blocksize(model, torch.randn(2, 8), blocksizes=64)
    with pytest.raises(TypeError, match="thresholds must be a list of thresholds, got 6"):
        sweep_threshold(model, torch.randn(2, 8), thresholds=6)


def test_a_model_that_raises_in_its_own_forward_is_told_where_not_to_check_its_inputs() -> None:
    """A RuntimeError raised by the model's own code on batch 0 was answered "check the inputs' shape and dtype"
    against the first layer; a shape mismatch inside torch still gets that hint."""
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.lin(x)
            raise RuntimeError("boom in forward")

    from fp8probe.analysis.loading import LoadError

    with pytest.raises(LoadError, match=r"RuntimeError: boom in forward; raised in forward at .*test_caller_state\.py"):
        analyze(Boom(), torch.randn(2, 8), "global", e2e=False)
    with pytest.raises(LoadError, match="the model's first layer 0 is Linear.*check the inputs' shape and dtype"):
        analyze(nn.Sequential(nn.Linear(8, 4)), torch.randn(2, 6), "global", e2e=False)
