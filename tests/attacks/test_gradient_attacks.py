"""Gradient attacks, the attack context, the schedule and the registry (btard.attacks)."""

from __future__ import annotations

import math
import textwrap
from dataclasses import replace
from statistics import NormalDist

import pytest
import torch

import btard.attacks as attacks
from btard.attacks import (
    ALIE,
    IPM,
    Attack,
    AttackContext,
    AttackKind,
    AttackSchedule,
    DelayedGradient,
    GaussianNoise,
    GradientAttack,
    LabelFlip,
    NaNAttack,
    RandomDirection,
    SignFlip,
    alie_z,
    apply_attack,
    flat_slices,
    flip_labels,
    get_attack,
    list_attacks,
    register_attack,
    resolve_attack,
)
from btard.attacks import registry as registry_module

N, B, H, D = 16, 7, 9, 24
BYZ_IDS = tuple(f"byz-{i}".encode() for i in range(B))


def _honest(step: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(H, D, generator=g) + torch.linspace(-1.0, 1.0, D)


def _own(step: int, peer_index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * (peer_index + 1) + step)
    return torch.randn(D, generator=g)


def make_ctx(step: int = 5, peer_index: int = 0, **kw) -> AttackContext:
    fields = dict(
        step=step,
        peer_index=peer_index,
        peer_id=BYZ_IDS[peer_index % B],
        byzantine_ids=BYZ_IDS,
        own_gradient=_own(step, peer_index),
        n=N,
        b=B,
        seed=42,
        honest_gradients=_honest(step),
    )
    fields.update(kw)
    return AttackContext(**fields)


def _flipped_gradient(ctx_own: torch.Tensor):
    """A stand-in for the task: the label-flipped gradient is a fixed, recognisable function of the input."""

    def compute_gradient(*, label_flip: bool = False) -> torch.Tensor:
        return ctx_own.flip(0) * 3.0 if label_flip else ctx_own.clone()

    return compute_gradient


# --- table -------------------------------------------------------


def _sign_flip_ok(ctx, v):
    return torch.equal(v, -1000.0 * ctx.own_gradient)


def _ipm_ok(ctx, v):
    mu = ctx.honest_gradients.double().mean(0)
    cos = torch.nn.functional.cosine_similarity(v.double(), mu, dim=0)
    return torch.allclose(v.double(), -0.1 * mu, atol=1e-6) and math.isclose(cos.item(), -1.0, abs_tol=1e-6)


def _ipm_large_ok(ctx, v):
    return torch.allclose(v.double(), -100.0 * ctx.honest_gradients.double().mean(0), atol=1e-4)


def _alie_ok(ctx, v):
    hg = ctx.honest_gradients.double()
    mu = hg.mean(0)
    sigma = ((hg - mu) ** 2).mean(0).sqrt()  # population std, written out independently
    z = float(torch.special.ndtri(torch.tensor(14 / 16, dtype=torch.float64)))
    return torch.allclose(v.double(), mu - z * sigma, atol=1e-6)


def _alie_unbiased_ok(ctx, v):
    hg = ctx.honest_gradients.double()
    mu = hg.mean(0)
    sigma = (((hg - mu) ** 2).sum(0) / (H - 1)).sqrt()
    z = float(torch.special.ndtri(torch.tensor(7 / 9, dtype=torch.float64)))
    return torch.allclose(v.double(), mu - z * sigma, atol=1e-6)


def _random_direction_ok(ctx, v):
    return math.isclose(v.norm().item(), 1000.0 * ctx.own_gradient.norm().item(), rel_tol=1e-5)


def _label_flip_ok(ctx, v):
    return torch.equal(v, ctx.own_gradient.flip(0) * 3.0)


def _gaussian_ok(ctx, v):
    return bool(torch.isfinite(v).all()) and not torch.equal(v, ctx.own_gradient)


def _all_nan(ctx, v):
    return bool(torch.isnan(v).all())


def _all_inf(ctx, v):
    return bool(torch.isposinf(v).all())


def _one_neg_inf(ctx, v):
    bad = ~torch.isfinite(v)
    return (
        int(bad.sum()) == 1
        and bool(torch.isneginf(v[bad]).all())
        and torch.equal(v[~bad], ctx.own_gradient[~bad])
    )


def _delayed_without_history_is_honest(ctx, v):
    return torch.equal(v, ctx.own_gradient)


TABLE = [
    ("sign-flip", {}, _sign_flip_ok),
    ("ipm", {}, _ipm_ok),
    ("ipm", {"eps": 100.0}, _ipm_large_ok),
    ("alie", {}, _alie_ok),
    ("alie", {"variant": "honest", "unbiased": True}, _alie_unbiased_ok),
    ("random-direction", {}, _random_direction_ok),
    ("label-flip", {}, _label_flip_ok),
    ("gaussian", {"sigma": 100.0}, _gaussian_ok),
    ("nan", {}, _all_nan),
    ("nan", {"value": "inf"}, _all_inf),
    ("nan", {"value": "-inf", "fraction": 1e-9}, _one_neg_inf),
    ("delayed-gradient", {"delay": 3, "length": 2}, _delayed_without_history_is_honest),
]


@pytest.mark.parametrize(("spec", "params", "holds"), TABLE, ids=[f"{s}-{p}" for s, p, _ in TABLE])
def test_attack_table(spec, params, holds):
    ctx = make_ctx(peer_index=2)
    ctx = replace(ctx, compute_gradient=_flipped_gradient(ctx.own_gradient))
    own_before = ctx.own_gradient.clone()
    honest_before = ctx.honest_gradients.clone()
    attack = get_attack(spec, **params)
    v = apply_attack(attack, ctx)
    assert v.shape == (D,) and v.dtype == ctx.own_gradient.dtype
    assert holds(ctx, v)
    # inputs never modified in place, and the output never aliases them
    assert torch.equal(ctx.own_gradient, own_before) and torch.equal(ctx.honest_gradients, honest_before)
    assert v.data_ptr() != ctx.own_gradient.data_ptr()


@pytest.mark.parametrize("name", list_attacks("gradient"))
def test_every_builtin_is_deterministic_given_the_context(name):
    ctx = make_ctx(step=7, peer_index=1)
    ctx = replace(ctx, compute_gradient=_flipped_gradient(ctx.own_gradient))
    v1, v2 = get_attack(name)(ctx), get_attack(name)(ctx)
    assert torch.equal(v1, v2) or (torch.isnan(v1).all() and torch.isnan(v2).all())


# --- sign flip ---------------------------------------------------


def test_sign_flip_scale_and_dtype():
    ctx = make_ctx(own_gradient=torch.tensor([1.0, -3.0, 0.5], dtype=torch.float64), honest_gradients=None)
    assert torch.equal(SignFlip(k=2)(ctx), torch.tensor([-2.0, 6.0, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="finite"):
        SignFlip(k=math.inf)


# --- random direction --------------------------------------------


def test_random_direction_shared_by_all_attackers_of_a_step():
    attack = RandomDirection(k=1000)
    vs = [attack(make_ctx(step=11, peer_index=p)) for p in range(B)]
    units = [v / v.norm() for v in vs]
    for p, v in enumerate(vs):
        assert torch.allclose(units[p], units[0], atol=1e-6)
        assert math.isclose(v.norm().item(), 1000 * _own(11, p).norm().item(), rel_tol=1e-5)
    # same own gradient → exactly the same vector for every attacker
    own = torch.ones(D)
    same = [attack(make_ctx(step=11, peer_index=p, own_gradient=own)) for p in range(B)]
    assert all(torch.equal(s, same[0]) for s in same)


def test_random_direction_changes_with_step_and_run_seed():
    attack = RandomDirection(k=1.0)
    own = torch.ones(D)
    v = attack(make_ctx(step=3, own_gradient=own))
    other_step = attack(make_ctx(step=4, own_gradient=own))
    other_run = attack(make_ctx(step=3, own_gradient=own, seed=43))
    own_seed = RandomDirection(k=1.0, seed=7)(make_ctx(step=3, own_gradient=own))
    same_seed_other_run = RandomDirection(k=1.0, seed=7)(make_ctx(step=3, own_gradient=own, seed=99))
    for w in (other_step, other_run, own_seed):
        assert abs(torch.dot(v / v.norm(), w / w.norm()).item()) < 0.9
    assert torch.equal(own_seed, same_seed_other_run)  # an explicit seed replaces the run seed


@pytest.mark.parametrize("via", ["constructor", "context"])
def test_random_direction_per_tensor_norms(via):
    params = [torch.zeros(3, 2), torch.zeros(5), torch.zeros(0), torch.zeros(13)]
    slices = flat_slices(params)
    assert slices == ((0, 6), (6, 11), (11, 11), (11, 24))
    own = _own(0, 0)
    own[6:11] *= 1e-3  # very different scales per tensor
    if via == "constructor":
        attack, ctx = RandomDirection(k=1000, slices=slices), make_ctx(own_gradient=own)
    else:
        attack, ctx = RandomDirection(k=1000), make_ctx(own_gradient=own, param_slices=slices)
    v = attack(ctx)
    for start, end in slices:
        if end > start:
            expected = 1000 * own[start:end].norm().item()
            assert math.isclose(v[start:end].norm().item(), expected, rel_tol=1e-5)
    whole = RandomDirection(k=1000)(make_ctx(own_gradient=own))
    assert not math.isclose(whole[6:11].norm().item(), 1000 * own[6:11].norm().item(), rel_tol=0.1)


@pytest.mark.parametrize("bad", [((0, 5),), ((0, 10), (11, 24)), ((0, 10), (10, 30)), ((5, 24),)])
def test_random_direction_rejects_slices_that_do_not_tile(bad):
    with pytest.raises(ValueError, match="slice"):
        RandomDirection(slices=bad)(make_ctx())
    with pytest.raises(ValueError, match="slice"):
        make_ctx(param_slices=bad)


# --- ALIE / IPM --------------------------------------------------


def test_alie_z_values():
    assert alie_z(16, 7) == pytest.approx(1.15, abs=5e-3)
    assert alie_z(16, 7, "honest") == pytest.approx(0.77, abs=1e-2)
    assert alie_z(16, 7) == pytest.approx(
        float(torch.special.ndtri(torch.tensor(0.875, dtype=torch.float64)))
    )
    assert alie_z(16, 7, "honest") == pytest.approx(
        float(torch.special.ndtri(torch.tensor(7 / 9, dtype=torch.float64)))
    )
    assert ALIE().z_for(16, 7) == alie_z(16, 7) and ALIE(z=1.5).z_for(16, 7) == 1.5


@pytest.mark.parametrize(("n", "b", "variant"), [(16, 9, "standard"), (4, 0, "standard"), (16, 7, "median")])
def test_alie_z_undefined_or_invalid(n, b, variant):
    with pytest.raises(ValueError):
        alie_z(n, b, variant)


@pytest.mark.parametrize(("n", "b"), [(13, 7), (16, 9), (16, 16), (4, 0), (1, 1), (2, 1), (3, 0), (16, 20)])
@pytest.mark.parametrize("variant", ["standard", "honest"])
def test_alie_z_clamped_is_finite_for_any_counts(n, b, variant):
    z = alie_z(n, b, variant, clamp=True)
    assert math.isfinite(z)
    if 0 < b < n and 0 < math.floor(n / 2 + 1) - b < (n if variant == "standard" else n - b):
        assert z == alie_z(n, b, variant)  # inside the formula's domain the clamp changes nothing


def test_alie_z_clamp_extends_the_formula_monotonically():
    # a Byzantine majority (s ≤ 0): half a peer's worth beyond μ − zσ, more extreme than s = 1
    assert alie_z(16, 9, clamp=True) == pytest.approx(NormalDist().inv_cdf(31 / 32))
    assert alie_z(16, 9, clamp=True) > alie_z(16, 8) > alie_z(16, 7)
    assert alie_z(13, 7, clamp=True) == pytest.approx(NormalDist().inv_cdf(25 / 26))


def test_alie_never_raises_on_the_steps_counts():
    """Issue 11: the built-in ALIE raised ValueError (z undefined for n=13, b=7) when a step's contributors were
    a Byzantine majority."""
    hg = _honest(3)
    for n, b in [(13, 7), (16, 9), (8, 8)]:
        v = ALIE()(make_ctx(step=3, n=n, b=b, byzantine_ids=(), honest_gradients=hg))
        assert bool(torch.isfinite(v).all())
        v = ALIE(variant="honest")(make_ctx(step=3, n=n, b=b, byzantine_ids=(), honest_gradients=hg))
        assert bool(torch.isfinite(v).all())


def test_alie_all_attackers_send_the_same_vector():
    attack = ALIE()
    hg = _honest(3)
    vs = [attack(make_ctx(step=3, peer_index=p, honest_gradients=hg)) for p in range(B)]
    assert all(torch.equal(v, vs[0]) for v in vs)


def test_omniscient_attacks_refuse_to_run_without_honest_gradients():
    ctx = make_ctx(honest_gradients=None)
    for attack in (IPM(), ALIE()):
        assert attack.needs_honest_gradients
        with pytest.raises(RuntimeError, match="honest gradients"):
            apply_attack(attack, ctx)
    assert not SignFlip.needs_honest_gradients
    apply_attack(SignFlip(), ctx)
    with pytest.raises(ValueError, match="at least 2"):
        ALIE(unbiased=True)(make_ctx(honest_gradients=_honest()[:1]))


# --- label flip --------------------------------------------------


def test_label_flip_uses_the_task_and_flip_labels():
    assert LabelFlip.label_flip and not SignFlip.label_flip
    with pytest.raises(RuntimeError, match="compute_gradient"):
        LabelFlip()(make_ctx())
    y = torch.tensor([0, 3, 9, 5])
    assert torch.equal(flip_labels(y, 10), torch.tensor([9, 6, 0, 4]))
    assert torch.equal(y, torch.tensor([0, 3, 9, 5]))
    with pytest.raises(ValueError):
        flip_labels(torch.tensor([10]), 10)


# --- delayed gradient --------------------------------------------


def test_delayed_gradient_resends_the_vector_observed_delay_steps_earlier():
    delay, length, start = 4, 3, 6
    attack = DelayedGradient(delay=delay, length=length)
    schedule = AttackSchedule(start=start)
    sent = {}
    for step in range(16):
        for p in (0, 1):  # one instance serves two Byzantine peers, histories must not mix
            ctx = make_ctx(step=step, peer_index=p)
            attack.observe(ctx)
            if schedule.active(step, p):
                sent[step, p] = attack(ctx)
        assert all(len(h) <= delay + 1 for h in attack._history.values())  # bounded history
    for p in (0, 1):
        for step in range(start, start + length):
            assert torch.equal(sent[step, p], _own(step - delay, p))
        for step in range(start + length, 16):  # L stale sends done → honest again
            assert torch.equal(sent[step, p], _own(step, p))
        assert attack.sent(BYZ_IDS[p]) == length


def test_delayed_gradient_without_history_sends_honestly_and_reset_forgets():
    attack = DelayedGradient(delay=2, length=None)
    for step in range(3):
        attack.observe(make_ctx(step=step))
    assert torch.equal(attack(make_ctx(step=3)), _own(1, 0))
    assert torch.equal(attack(make_ctx(step=10)), _own(10, 0))  # steps 4..9 never observed
    attack.reset()
    assert torch.equal(attack(make_ctx(step=4)), _own(4, 0)) and attack.sent(BYZ_IDS[0]) == 0
    with pytest.raises(ValueError):
        DelayedGradient(delay=0)


# --- Gaussian / NaN ----------------------------------------------


def test_gaussian_noise_is_seeded_per_peer_and_step():
    attack = GaussianNoise(sigma=1.0)
    v = attack(make_ctx(step=2, peer_index=0))
    assert torch.equal(v, GaussianNoise(sigma=1.0)(make_ctx(step=2, peer_index=0)))
    assert not torch.equal(v, attack(make_ctx(step=2, peer_index=1)))
    assert not torch.equal(v, attack(make_ctx(step=3, peer_index=0)))
    assert not torch.equal(v, attack(make_ctx(step=2, peer_index=0, seed=b"another run")))
    big = GaussianNoise(sigma=100.0)(make_ctx(own_gradient=torch.zeros(40_000), honest_gradients=None))
    assert big.mean().abs().item() < 2.0 and big.std().item() == pytest.approx(100.0, rel=0.03)


def test_nan_attack_validation():
    with pytest.raises(ValueError):
        NaNAttack(value="zero")
    with pytest.raises(ValueError):
        NaNAttack(fraction=0.0)
    v = NaNAttack(fraction=0.25)(make_ctx())
    assert int(torch.isnan(v).sum()) == D // 4


# --- schedule ----------------------------------------------------

SCHEDULES = [
    (AttackSchedule(), 0, 0, True),
    (AttackSchedule(start=1000), 999, 0, False),
    (AttackSchedule(start=1000), 1000, 6, True),
    (AttackSchedule(start=1000, every=10), 1010, 0, True),
    (AttackSchedule(start=1000, every=10), 1015, 0, False),
    (AttackSchedule(start=5, every=10), 10, 0, False),
    (AttackSchedule(start=1000, stop=1500), 1499, 0, True),
    (AttackSchedule(start=1000, stop=1500), 1500, 0, False),
    (AttackSchedule(peers=frozenset({0, 2})), 3, 2, True),
    (AttackSchedule(peers=frozenset({0, 2})), 3, 1, False),
    (AttackSchedule(start=2, every=2, stop=8, peers=[1]), 6, 1, True),
    (AttackSchedule(start=2, every=2, stop=8, peers=[1]), 6, 0, False),
]


@pytest.mark.parametrize(("schedule", "step", "peer", "expected"), SCHEDULES)
def test_schedule(schedule, step, peer, expected):
    assert schedule.active(step, peer) is expected


@pytest.mark.parametrize("kwargs", [{"start": -1}, {"every": 0}, {"start": 5, "stop": 4}, {"peers": [-1]}])
def test_schedule_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        AttackSchedule(**kwargs)


# --- context -----------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"peer_index": 7, "peer_id": b"byz-7"},
        {"step": -1},
        {"b": 17},
        {"own_gradient": torch.zeros(2, 3)},
        {"honest_gradients": torch.zeros(3, D + 1)},
        {"peer_id": b"someone else"},
    ],
)
def test_context_rejects_inconsistent_fields(kwargs):
    with pytest.raises(ValueError):
        make_ctx(**kwargs)


def test_context_generators_shared_versus_per_peer():
    a, b = make_ctx(peer_index=0), make_ctx(peer_index=1)
    draw = lambda g: torch.randn(8, generator=g)  # noqa: E731
    assert torch.equal(draw(a.shared_generator("x")), draw(b.shared_generator("x")))
    assert not torch.equal(draw(a.shared_generator("x")), draw(a.shared_generator("y")))
    assert not torch.equal(draw(a.peer_generator("x")), draw(b.peer_generator("x")))


def test_apply_attack_checks_the_shape():
    class Short(GradientAttack):
        def __call__(self, ctx):
            return ctx.own_gradient[:-1] * 2

    assert Short.name == "test_apply_attack_checks_the_shape.<locals>.Short"
    with pytest.raises(ValueError, match="shape"):
        apply_attack(Short(), make_ctx())


# --- registry ----------------------------------------------------


@pytest.fixture
def isolated_registry(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


BUILTINS = {
    "sign-flip": SignFlip,
    "random-direction": RandomDirection,
    "label-flip": LabelFlip,
    "delayed-gradient": DelayedGradient,
    "ipm": IPM,
    "alie": ALIE,
    "gaussian": GaussianNoise,
    "nan": NaNAttack,
}


def test_builtin_names():
    assert set(BUILTINS) <= set(list_attacks())
    for name, cls in BUILTINS.items():
        assert resolve_attack(name) is cls and cls.name == name and cls.kind is AttackKind.GRADIENT
    assert set(BUILTINS) <= set(list_attacks(kind="gradient"))
    assert get_attack("sign-flip", k=3) == SignFlip(k=3)


def test_unknown_name_lists_the_registered_names():
    with pytest.raises(ValueError) as err:
        get_attack("sign-flop")
    for name in BUILTINS:
        assert name in str(err.value)


def test_bad_parameters_name_the_attack():
    with pytest.raises(TypeError, match="sign-flip"):
        get_attack("sign-flip", scale=3)


USER_MODULE = """
import torch
from btard.attacks import GradientAttack, Attack, AttackKind

class HalfFlip(GradientAttack):
    name = "half-flip"

    def __init__(self, k=1.0):
        self.k = k

    def __call__(self, ctx):
        return torch.cat([-self.k * ctx.own_gradient[: ctx.d // 2], ctx.own_gradient[ctx.d // 2 :]])

class NotAnAttack:
    def __call__(self, ctx):
        return ctx.own_gradient

class Incomplete(GradientAttack):
    pass

class Silence(Attack):
    kind = AttackKind.PROTOCOL
    name = "silence"
"""


def test_load_user_attack_from_module_and_file(tmp_path, monkeypatch, isolated_registry):
    (tmp_path / "my_user_attacks.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    ctx = make_ctx()
    for spec in ("my_user_attacks:HalfFlip", f"{tmp_path / 'my_user_attacks.py'}:HalfFlip"):
        attack = get_attack(spec, k=2.0)
        assert isinstance(attack, GradientAttack) and attack.name == "half-flip"
        v = apply_attack(attack, ctx)
        half = D // 2
        assert torch.equal(v[:half], -2.0 * ctx.own_gradient[:half]) and torch.equal(
            v[half:], ctx.own_gradient[half:]
        )
    with pytest.raises(TypeError, match="not an attack class"):
        get_attack("my_user_attacks:NotAnAttack")
    with pytest.raises(TypeError, match="abstract"):
        get_attack("my_user_attacks:Incomplete")
    with pytest.raises(AttributeError, match="Missing"):
        get_attack("my_user_attacks:Missing")
    with pytest.raises(ImportError):
        get_attack(f"{tmp_path / 'absent.py'}:HalfFlip")
    # register by name, lazily by path (how protocol attacks join), and filter by kind
    register_attack("half-flip", "my_user_attacks:HalfFlip")
    register_attack("silence", "my_user_attacks:Silence")
    assert "half-flip" in list_attacks(kind=AttackKind.GRADIENT) and "silence" not in list_attacks(
        kind="gradient"
    )
    assert "silence" in list_attacks(kind="protocol") and "wrong-aggregate" in list_attacks(kind="protocol")
    assert isinstance(get_attack("silence"), Attack)
    with pytest.raises(ValueError, match="already registered"):
        register_attack("half-flip", SignFlip)
    register_attack("half-flip", SignFlip, replace=True)
    assert resolve_attack("half-flip") is SignFlip
    with pytest.raises(ValueError, match="hyphens"):
        register_attack("Half Flip", SignFlip)
    with pytest.raises(TypeError, match="not an attack class"):
        register_attack("plain", object)  # type: ignore[arg-type]


def test_the_documented_example_runs(isolated_registry):
    doc = attacks.__doc__
    block = doc.split("Example::\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line)
    namespace: dict = {}
    exec(compile(textwrap.dedent("\n".join(lines)), "<btard.attacks docstring>", "exec"), namespace)
    ctx = make_ctx()
    v = apply_attack(get_attack("scaled-mean", k=3), ctx)
    mu = ctx.honest_gradients.mean(0)
    assert torch.allclose(v, -3 * mu, atol=0.1) and not torch.allclose(v, -3 * mu, atol=1e-6)
