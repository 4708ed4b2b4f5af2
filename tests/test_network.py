import dataclasses
import io
import json

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bonescan_model.network import (
    ConvBNAct,
    DilatedResidualBlock,
    InceptionBlock,
    ModelConfig,
    RecurrentConvLayer,
    build_model,
    count_parameters,
)

WIDTH = 8  # small enough that every variant runs in well under a second on 2 cores

# Table 5 of the paper: which parts of the feature extractor each ablation case keeps.
ABLATION_CASES = {
    "1#": dict(dilated=False, inception=False, residual=False),
    "2#": dict(dilated=True, inception=False, residual=False),
    "3#": dict(dilated=True, inception=True, residual=False),
    "4#": dict(dilated=True, inception=True, residual=True),
}

VARIANTS = (
    [
        pytest.param(dict(recurrence=t, recurrent_weights=w), id=f"t{t}-{w}")
        for t in (1, 2, 3, 4)
        for w in ("shared", "unrolled")
    ]
    + [pytest.param(case, id=f"case{name}") for name, case in ABLATION_CASES.items()]
    + [pytest.param(dict(aggregation=a), id=f"agg-{a}") for a in ("none", "input", "features")]
    + [
        pytest.param(dict(arch="unet", unet_depth=3), id="unet"),
        pytest.param(dict(arch="unet", aggregation="input"), id="unet-agg-input"),
    ]
)


def _model(**overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(width=WIDTH, **overrides))


def _views(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.rand(batch, 2, height, width, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("overrides", VARIANTS)
def test_every_variant_maps_views_to_logits_at_input_resolution(overrides):
    model = _model(**overrides)
    logits = model(_views(2, 32, 48))
    assert logits.shape == (2, 1, 32, 48)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["recurrent", "unet"])
def test_full_size_crop(arch):
    model = _model(arch=arch).eval()
    with torch.no_grad():
        logits = model(_views(1, 256, 256))
    assert logits.shape == (1, 1, 256, 256)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(recurrence=3, recurrent_weights="shared"), id="complete-shared"),
        pytest.param(dict(recurrence=3, recurrent_weights="unrolled"), id="complete-unrolled"),
        pytest.param(dict(aggregation="features"), id="features"),
        pytest.param(dict(arch="unet", unet_depth=3), id="unet"),
    ],
)
def test_every_parameter_gets_a_gradient_and_outputs_hold_no_nan(overrides):
    model = _model(**overrides)
    views = _views(2, 32, 32)
    target = (views[:, :1] > 0.8).float()
    F.binary_cross_entropy_with_logits(model(views), target).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(views)).all()


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(),
        ModelConfig(width=12, recurrence=4, recurrent_weights="unrolled", aggregation="features", dilations=(1, 2)),
        ModelConfig(arch="unet", width=8, unet_depth=2, aggregation="input"),
    ],
    ids=["default", "custom", "unet"],
)
def test_a_checkpoint_alone_rebuilds_the_model(config):
    model = build_model(config).eval()
    buffer = io.BytesIO()
    torch.save({"model_config": dataclasses.asdict(config), "model": model.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)

    rebuilt_config = ModelConfig.from_dict(checkpoint["model_config"])
    assert rebuilt_config == config
    rebuilt = build_model(rebuilt_config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    rebuilt.load_state_dict(checkpoint["model"])  # strict
    rebuilt.eval()
    views = _views(1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(views), model(views))


def test_config_survives_json_which_turns_tuples_into_lists():
    config = ModelConfig(dilations=(1, 3, 9))
    assert ModelConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(config)))) == config


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="colour"):
        ModelConfig.from_dict({"width": 8, "colour": "red"})


@pytest.mark.parametrize(
    "field, value",
    [
        ("arch", "resnet"),
        ("width", 0),
        ("width", True),
        ("recurrence", 0),
        ("recurrence", 5),
        ("recurrent_weights", "tied"),
        ("dilated", 1),
        ("inception", "yes"),
        ("residual", None),
        ("aggregation", "max"),
        ("dilations", ()),
        ("dilations", (1, 0)),
        ("unet_depth", 0),
    ],
)
def test_bad_config_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict({field: value})


def test_unet_rejects_feature_aggregation():
    with pytest.raises(ValueError, match="aggregation"):
        ModelConfig(arch="unet", aggregation="features")


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: DilatedResidualBlock(0, 8), "in_channels"),
        (lambda: DilatedResidualBlock(4, 8, dilation=0), "dilation"),
        (lambda: DilatedResidualBlock(4, 8, residual=1), "residual"),
        (lambda: InceptionBlock(4, 0), "out_channels"),
        (lambda: InceptionBlock(4, 8, branch_channels=0), "branch_channels"),
        (lambda: RecurrentConvLayer(4, 4, steps=0), "steps"),
        (lambda: ConvBNAct(4, 4, kernel_size=2), "kernel_size"),
    ],
)
def test_blocks_reject_bad_arguments_by_name(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


@pytest.mark.parametrize("arch", ["recurrent", "unet"])
def test_input_that_is_not_two_views_is_rejected(arch):
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        _model(arch=arch)(torch.rand(1, 1, 32, 32))


@pytest.mark.parametrize("size", [32, 33])
@pytest.mark.parametrize("dilation", [1, 2, 4])
def test_dilated_residual_block_keeps_the_grid(size, dilation):
    block = DilatedResidualBlock(2, 8, dilation=dilation)
    assert block(torch.rand(2, 2, size, size)).shape == (2, 8, size, size)


@pytest.mark.parametrize("size, half", [(32, 16), (33, 17)])
def test_inception_block_halves_the_grid(size, half):
    block = InceptionBlock(8, 16)
    assert block(torch.rand(2, 8, size, size)).shape == (2, 16, half, half)


@pytest.mark.parametrize("shared", [True, False])
def test_recurrent_layer_follows_eq5(shared):
    torch.manual_seed(0)
    layer = RecurrentConvLayer(3, 4, steps=3, shared=shared)
    for norm in layer.norms:  # non-trivial evaluation-mode normalization, different per step
        bn = norm[0]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        nn.init.uniform_(bn.weight, 0.5, 2)
        nn.init.uniform_(bn.bias, -1, 1)
    layer.eval()
    u = torch.randn(2, 3, 8, 8)

    def w_f(t):
        return layer.feedforward[0 if shared else t].weight

    def w_r(t):
        return layer.recurrent[0 if shared else t - 1].weight

    x = layer.norms[0](F.conv2d(u, w_f(0), padding=1))  # x(0) = 0: no recurrent term
    for t in (1, 2):
        x = layer.norms[t](F.conv2d(u, w_f(t), padding=1) + F.conv2d(x, w_r(t), padding=1))
    with torch.no_grad():
        torch.testing.assert_close(layer(u), x)


def test_one_step_is_plain_feed_forward():
    layer = RecurrentConvLayer(3, 4, steps=1)
    assert len(layer.recurrent) == 0


def test_unrolled_parameters_grow_with_t_and_shared_stay_flat():
    def params(t, weights):
        return count_parameters(_model(recurrence=t, recurrent_weights=weights))

    unrolled = [params(t, "unrolled") for t in (1, 2, 3, 4)]
    shared = [params(t, "shared") for t in (1, 2, 3, 4)]
    assert unrolled[0] == shared[0]  # t = 1 is the same feed-forward network
    assert all(a < b for a, b in zip(unrolled, unrolled[1:]))
    assert unrolled[3] > 1.5 * unrolled[0]
    # Shared: one W_R from t = 2 on; only the per-step BatchNorm/PReLU add a few parameters.
    assert max(shared[1:]) < 1.01 * min(shared[1:])


@pytest.mark.parametrize("case", ABLATION_CASES)
def test_ablation_switches_remove_what_they_name(case):
    switches = ABLATION_CASES[case]
    model = _model(**switches)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    blocks = [m for m in model.modules() if isinstance(m, DilatedResidualBlock)]
    assert any(c.dilation != (1, 1) for c in convs) == switches["dilated"]
    assert any(isinstance(m, InceptionBlock) for m in model.modules()) == switches["inception"]
    assert all((b.shortcut is not None) == switches["residual"] for b in blocks)


def _table5_models() -> dict[str, nn.Module]:
    """The four cases of tune_spaces/ablation.yaml, as each trial builds its model."""
    from bonescan_platform.search_space import case_name, load_space

    space = load_space(Path(__file__).resolve().parents[1] / "tune_spaces" / "ablation.yaml")
    cases = space.param_space()["case"]["grid_search"]
    return {case_name(c): build_model(space.trial_config({"case": c}).model) for c in cases}


def test_each_table5_case_builds_the_network_its_row_names():
    models = _table5_models()
    assert set(models) == set(ABLATION_CASES)
    counts = {}
    for name, model in models.items():
        switches = ABLATION_CASES[name]
        blocks = [m for m in model.modules() if isinstance(m, DilatedResidualBlock)]
        rates = {c.dilation for b in blocks for c in b.modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)}
        # Every residual block dilated, or none: the switch ablates all of them.
        assert rates == ({(2, 2)} if switches["dilated"] else {(1, 1)}), name
        assert any(isinstance(m, InceptionBlock) for m in model.modules()) == switches["inception"]
        assert all((b.shortcut is not None) == switches["residual"] for b in blocks)
        width = model.config.width
        assert not model.config.long_skip and model.head[0][0].in_channels == width  # the paper's shape
        counts[name] = count_parameters(model)
    # Dilation changes no parameter count; the inception block and the 1x1 shortcuts add some.
    assert counts["1#"] == counts["2#"] < counts["3#"] < counts["4#"], counts


@pytest.mark.parametrize("long_skip", [True, False])
def test_long_skip_switch_changes_only_the_head_input(long_skip):
    model = _model(long_skip=long_skip)
    assert model.head[0][0].in_channels == (2 if long_skip else 1) * WIDTH
    assert model(_views(1, 32, 32)).shape == (1, 1, 32, 32)


@pytest.mark.parametrize("arch, aggregation", [("recurrent", "input"), ("recurrent", "features"), ("unet", "input")])
def test_aggregated_views_are_symmetric_in_ant_and_post(arch, aggregation):
    # Eq. 4 adds the views, so which one is called ANT must not matter; without aggregation it does.
    views = _views(2, 32, 32)
    swapped = views.flip(1)
    model = _model(arch=arch, aggregation=aggregation).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(swapped), model(views))
    plain = _model(arch=arch).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(swapped), plain(views))
