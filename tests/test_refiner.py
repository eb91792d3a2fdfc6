"""LocalCache, FeatureAggregator, FeatureAligner and TextRefiner against hand-computed numbers."""
import math

import pytest
import torch
import torch.nn.functional as F

from textrefiner.refiner import FeatureAggregator, FeatureAligner, LocalCache, TextRefiner


def unit(*values):
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def cache_with(rows, momentum=0.8, write_rule="released"):
    cache = LocalCache(len(rows), len(rows[0]), momentum, write_rule)
    cache.entries = torch.tensor(rows, dtype=torch.float32)
    return cache


def reference_write(entries, tokens, momentum, rule):
    """The write rule as a plain per-entry loop, in float64."""
    entries = entries.double().clone()
    x = F.normalize(tokens.double().reshape(-1, entries.shape[1]), dim=-1)
    scores = x @ entries.t()
    n_tokens, n_entries = scores.shape
    for j in range(n_entries):
        members = [i for i in range(n_tokens) if int(scores[i].argmax()) == j]
        if not members:
            continue
        total = torch.zeros(entries.shape[1], dtype=torch.float64)
        for i in members:
            if rule == "released":
                column = [math.exp(float(scores[k, j])) for k in range(n_tokens)]
                weight = column[i] / max(column)
            else:
                row = [math.exp(float(scores[i, m])) for m in range(n_entries)]
                weight = row[j] / sum(row)
            total += weight * x[i]
        entries[j] = momentum * entries[j] + (1 - momentum) * total
    return F.normalize(entries, dim=-1)


# --------------------------------------------------------------------------------------------
# LocalCache: initial state
# --------------------------------------------------------------------------------------------
def test_initial_entries_come_from_the_seeded_rng():
    torch.manual_seed(3)
    cache = LocalCache(7, 5)
    torch.manual_seed(3)
    expected = F.normalize(torch.rand(7, 5), dim=-1)
    assert torch.equal(cache.entries, expected)
    torch.manual_seed(3)
    assert torch.equal(LocalCache(7, 5).entries, cache.entries)
    torch.manual_seed(4)
    assert not torch.allclose(LocalCache(7, 5).entries, cache.entries)


def test_initial_entries_are_non_negative_unit_rows():
    torch.manual_seed(0)
    entries = LocalCache(25, 16).entries
    assert entries.shape == (25, 16) and entries.dtype == torch.float32
    assert (entries >= 0).all()
    assert torch.allclose(entries.norm(dim=1), torch.ones(25), atol=1e-6)
    assert not entries.requires_grad


# --------------------------------------------------------------------------------------------
# LocalCache: read
# --------------------------------------------------------------------------------------------
def test_read_on_a_hand_made_example():
    rows = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    cache = cache_with(rows)
    text = torch.tensor([[2.0, 0.0], [0.0, -3.0]])  # not normalised: read uses the cosine
    cosines = [[1.0, 0.0, 0.6], [0.0, -1.0, -0.8]]
    expected = []
    for cos in cosines:
        w = [math.exp(c) for c in cos]
        w = [v / sum(w) for v in w]
        expected.append([sum(w[m] * rows[m][k] for m in range(3)) for k in range(2)])
    assert torch.allclose(cache.read(text), torch.tensor(expected), atol=1e-6)


def test_read_equals_softmax_of_cosines_times_entries():
    torch.manual_seed(1)
    cache = LocalCache(6, 8)
    text = torch.randn(4, 8) * 5
    weights = (F.normalize(text, dim=1) @ cache.entries.t()).softmax(dim=1)
    assert torch.allclose(cache.read(text), weights @ cache.entries, atol=1e-6)


# --------------------------------------------------------------------------------------------
# LocalCache: write
# --------------------------------------------------------------------------------------------
# Entries A0..A3 and three tokens: z goes to A0, y to A1, x (scaled by 3) to A2; A3 gets nothing.
# Column 0's largest score belongs to x (0.6 > z's 0.5) although x goes to A2, so the released
# weight of z is exp(0.5 - 0.6), not 1.
HAND_ROWS = [[1.0, 0.0], [-1.0, 0.0], [0.6, -0.8], [0.0, -1.0]]
Z = [0.5, math.sqrt(0.75)]
X = [0.6, -0.8]
Y = [-0.8, 0.6]
HAND_TOKENS = torch.tensor([Z, [3 * v for v in X], Y])


def hand_expected(weights):
    g = 0.8
    new = [
        unit(*(g * a + (1 - g) * weights["z"] * t for a, t in zip(HAND_ROWS[0], Z))),
        unit(*(g * a + (1 - g) * weights["y"] * t for a, t in zip(HAND_ROWS[1], Y))),
        unit(*(g * a + (1 - g) * weights["x"] * t for a, t in zip(HAND_ROWS[2], X))),
        HAND_ROWS[3],
    ]
    return torch.tensor(new)


def test_released_write_on_a_hand_made_example():
    cache = cache_with(HAND_ROWS, write_rule="released")
    assert cache.write(HAND_TOKENS) == 3
    # column maxima: col 0 -> x (0.6), col 1 -> y (0.8), col 2 -> x (1.0)
    weights = {"z": math.exp(0.5 - 0.6), "y": 1.0, "x": 1.0}
    assert torch.allclose(cache.entries, hand_expected(weights), atol=1e-6)


def test_paper_write_on_a_hand_made_example():
    cache = cache_with(HAND_ROWS, write_rule="paper")
    cache.write(HAND_TOKENS)

    def softmax_at(token, j):
        row = [math.exp(dot(token, a)) for a in HAND_ROWS]
        return row[j] / sum(row)

    weights = {"z": softmax_at(Z, 0), "y": softmax_at(Y, 1), "x": softmax_at(X, 2)}
    assert 0.2 < weights["z"] < 0.5  # far from the released rule's value, so the test can tell
    assert torch.allclose(cache.entries, hand_expected(weights), atol=1e-6)


@pytest.mark.parametrize("rule", ["released", "paper"])
@pytest.mark.parametrize("momentum", [0.8, 0.0, 0.5])
def test_write_equals_a_per_entry_loop(rule, momentum):
    torch.manual_seed(5)
    cache = LocalCache(5, 4, momentum=momentum, write_rule=rule)
    cache.entries = F.normalize(torch.randn(5, 4), dim=-1)  # spread out, so many entries get tokens
    expected = cache.entries.clone()
    for step in range(3):
        tokens = torch.randn(2, 7, 4) * (step + 1)
        scores = F.normalize(tokens.reshape(-1, 4), dim=-1) @ expected.float().t()
        assert scores.argmax(dim=1).unique().numel() >= 2
        expected = reference_write(expected, tokens, momentum, rule)
        assert cache.write(tokens) == 14
        assert torch.allclose(cache.entries.double(), expected, atol=1e-5)


def test_entries_without_tokens_keep_their_value():
    rows = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    cache = cache_with(rows)
    cache.write(torch.tensor([[1.0, 0.1, 0.0], [0.9, 0.0, 0.2]]))  # both go to entry 0
    assert torch.equal(cache.entries[1:], torch.tensor(rows[1:]))
    assert not torch.allclose(cache.entries[0], torch.tensor(rows[0]))


@pytest.mark.parametrize("rule", ["released", "paper"])
def test_rows_stay_unit_norm_after_writes(rule):
    torch.manual_seed(2)
    cache = LocalCache(9, 6, write_rule=rule)
    for _ in range(5):
        cache.write(torch.randn(3, 11, 6) * 10 + 1)
        assert torch.allclose(cache.entries.norm(dim=1), torch.ones(9), atol=1e-6)


def test_write_accepts_batched_and_flat_tokens():
    torch.manual_seed(6)
    tokens = torch.randn(3, 4, 5)
    batched, flat = LocalCache(4, 5), LocalCache(4, 5)
    flat.entries = batched.entries.clone()
    assert batched.write(tokens) == 12
    assert flat.write(tokens.reshape(12, 5)) == 12
    assert torch.equal(batched.entries, flat.entries)


def test_write_keeps_entries_a_buffer_saved_in_the_state_dict():
    torch.manual_seed(7)
    cache = LocalCache(4, 3)
    cache.write(torch.randn(2, 5, 3))
    assert "entries" in dict(cache.named_buffers())
    assert torch.equal(cache.state_dict()["entries"], cache.entries)


def test_write_updates_the_buffer_in_place():
    torch.manual_seed(7)
    cache = LocalCache(4, 3)
    buffer, before = cache.entries, cache.entries.clone()
    cache.write(torch.randn(2, 5, 3))
    assert cache.entries is buffer and not torch.equal(buffer, before)


# --------------------------------------------------------------------------------------------
# LocalCache: no gradients
# --------------------------------------------------------------------------------------------
def test_write_takes_no_gradient_and_leaves_no_graph():
    torch.manual_seed(8)
    cache = LocalCache(4, 6)
    tokens = torch.randn(2, 5, 6, requires_grad=True)
    with torch.enable_grad():
        cache.write(tokens * 2)
    assert not cache.entries.requires_grad
    assert cache.entries.grad_fn is None
    assert tokens.grad is None
    assert list(cache.parameters()) == []


def test_backward_after_read_then_write_in_one_step():
    torch.manual_seed(9)
    refiner = TextRefiner(dim=6, cache_size=4)
    twin = TextRefiner(dim=6, cache_size=4)
    twin.load_state_dict(refiner.state_dict())
    text = F.normalize(torch.randn(3, 6), dim=-1).requires_grad_()  # as if from learned prompts
    twin_text = text.detach().clone().requires_grad_()
    tokens = torch.randn(2, 5, 6)

    aligned = refiner.align(tokens)
    loss = refiner.refine(text).square().sum() + aligned.sum()
    before = refiner.cache.entries.clone()
    refiner.update(aligned)
    assert not torch.equal(refiner.cache.entries, before)
    loss.backward()

    # The same step without the write: the gradients must be those of the old cache.
    twin_loss = twin.refine(twin_text).square().sum() + twin.align(tokens).sum()
    twin_loss.backward()
    grad = refiner.aggregator.linear.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert torch.allclose(grad, twin.aggregator.linear.weight.grad, atol=1e-6)
    assert torch.allclose(refiner.aligner.fc1.weight.grad, twin.aligner.fc1.weight.grad, atol=1e-6)
    assert torch.allclose(text.grad, twin_text.grad, atol=1e-6)
    assert refiner.cache.entries.grad is None


# --------------------------------------------------------------------------------------------
# LocalCache: state and validation
# --------------------------------------------------------------------------------------------
def test_state_dict_round_trip():
    torch.manual_seed(10)
    cache = LocalCache(5, 4)
    cache.write(torch.randn(2, 6, 4))
    state = cache.state_dict()
    assert list(state) == ["entries"]
    torch.manual_seed(11)
    fresh = LocalCache(5, 4)
    assert not torch.equal(fresh.entries, cache.entries)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.entries, cache.entries)


def test_refiner_state_dict_holds_the_cache():
    torch.manual_seed(12)
    refiner = TextRefiner(dim=4, cache_size=3)
    refiner.update(torch.randn(2, 5, 4))
    fresh = TextRefiner(dim=4, cache_size=3)
    fresh.load_state_dict(refiner.state_dict())
    assert "cache.entries" in refiner.state_dict()
    assert torch.equal(fresh.cache.entries, refiner.cache.entries)


def test_to_float64_moves_the_buffer_and_writes_keep_it():
    torch.manual_seed(13)
    cache = LocalCache(3, 4)
    original = cache.entries.clone()
    cache = cache.to(torch.float64)
    assert cache.entries.dtype == torch.float64
    assert torch.allclose(cache.entries, original.double())
    cache.write(torch.randn(6, 4, dtype=torch.float64))
    assert cache.entries.dtype == torch.float64
    assert cache.state_dict()["entries"].dtype == torch.float64


def test_non_finite_tokens_are_skipped_and_counted():
    torch.manual_seed(14)
    tokens = torch.randn(2, 4, 3)
    bad = tokens.clone()
    bad[0, 1, 0] = float("nan")
    bad[1, 2, 2] = float("inf")
    bad[1, 3, 1] = -float("inf")
    cache, clean = LocalCache(3, 3), LocalCache(3, 3)
    clean.entries = cache.entries.clone()
    assert cache.write(bad) == 5
    assert cache.skipped_tokens == 3
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[0, 1] = keep[1, 2] = keep[1, 3] = False
    clean.write(tokens[keep])
    assert torch.isfinite(cache.entries).all()
    assert torch.allclose(cache.entries, clean.entries, atol=1e-7)

    before = cache.entries.clone()
    assert cache.write(torch.full((2, 3), float("nan"))) == 0
    assert cache.skipped_tokens == 5
    assert torch.equal(cache.entries, before)


@pytest.mark.parametrize("kwargs", [
    dict(momentum=1.0), dict(momentum=-0.1), dict(momentum=1.5),
    dict(write_rule="Released"), dict(write_rule="average"), dict(num_entries=0),
])
def test_invalid_cache_settings_raise(kwargs):
    args = dict(num_entries=4, dim=3) | kwargs
    with pytest.raises(ValueError):
        LocalCache(**args)


def test_momentum_zero_is_allowed():
    assert LocalCache(2, 3, momentum=0.0).momentum == 0.0


# --------------------------------------------------------------------------------------------
# FeatureAggregator
# --------------------------------------------------------------------------------------------
def test_aggregator_equals_alpha_linear_plus_text():
    torch.manual_seed(15)
    agg = FeatureAggregator(6, alpha=0.3)
    assert agg.linear.bias is None
    assert agg.linear.weight.shape == (6, 12)
    text, detail = torch.randn(4, 6), torch.randn(4, 6)
    weight = agg.linear.weight
    expected = 0.3 * (text @ weight[:, :6].t() + detail @ weight[:, 6:].t()) + text
    assert torch.allclose(agg(text, detail), expected, atol=1e-6)


def test_aggregator_alpha_zero_returns_text():
    torch.manual_seed(16)
    text = torch.randn(3, 5)
    assert torch.equal(FeatureAggregator(5, alpha=0.0)(text, torch.randn(3, 5)), text)
    with pytest.raises(ValueError):
        FeatureAggregator(5, alpha=-0.1)


# --------------------------------------------------------------------------------------------
# FeatureAligner
# --------------------------------------------------------------------------------------------
def hand_aligner(aligner, tokens):
    flat = tokens.reshape(-1, tokens.shape[-1])
    h = flat @ aligner.fc1.weight.t() + aligner.fc1.bias
    mean = h.mean(dim=0)
    var = ((h - mean) ** 2).mean(dim=0)  # biased, over all B * T tokens
    h = (h - mean) / torch.sqrt(var + aligner.norm.eps) * aligner.norm.weight + aligner.norm.bias
    h = torch.clamp(h, min=0)
    out = h @ aligner.fc2.weight.t() + aligner.fc2.bias
    return out.reshape(*tokens.shape[:-1], -1)


def make_aligner(in_dim, out_dim):
    aligner = FeatureAligner(in_dim, out_dim).train()
    with torch.no_grad():  # non-trivial affine BatchNorm parameters
        aligner.norm.weight.uniform_(0.5, 1.5)
        aligner.norm.bias.uniform_(-0.5, 0.5)
    return aligner


def test_aligner_matches_a_hand_computation_on_batched_tokens():
    torch.manual_seed(17)
    aligner = make_aligner(5, 7)
    tokens = torch.randn(3, 4, 5) * 2 + 1
    out = aligner(tokens)
    assert out.shape == (3, 4, 7)
    assert torch.allclose(out, hand_aligner(aligner, tokens), atol=1e-5)
    # statistics over all tokens, not per image: the first image alone gives other numbers
    assert not torch.allclose(aligner(tokens[:1])[0], out[0], atol=1e-3)


def test_aligner_on_flat_tokens():
    torch.manual_seed(18)
    aligner = make_aligner(6, 4)
    tokens = torch.randn(10, 6)
    out = aligner(tokens)
    assert out.shape == (10, 4)
    assert torch.allclose(out, hand_aligner(aligner, tokens), atol=1e-5)
    assert torch.allclose(aligner(tokens.reshape(2, 5, 6)).reshape(10, 4), out, atol=1e-6)


def test_aligner_layers_have_bias():
    aligner = FeatureAligner(3, 5)
    assert aligner.fc1.bias is not None and aligner.fc2.bias is not None
    assert (aligner.fc1.in_features, aligner.fc1.out_features) == (3, 5)
    assert (aligner.fc2.in_features, aligner.fc2.out_features) == (5, 5)


# --------------------------------------------------------------------------------------------
# TextRefiner
# --------------------------------------------------------------------------------------------
def test_refiner_defaults():
    refiner = TextRefiner(dim=8)
    assert refiner.cache.entries.shape == (25, 8)
    assert refiner.cache.momentum == 0.8
    assert refiner.cache.write_rule == "released"
    assert refiner.aggregator.alpha == 0.2
    assert refiner.topk == 5
    assert refiner.aligner.fc1.in_features == 8 and refiner.aligner.fc2.out_features == 8
    assert TextRefiner(dim=8, token_dim=12).aligner.fc1.in_features == 12
    with pytest.raises(ValueError):
        TextRefiner(dim=8, topk=0)


def test_refine_equals_aggregator_of_cache_read():
    torch.manual_seed(19)
    refiner = TextRefiner(dim=6, cache_size=4, alpha=0.5)
    text = F.normalize(torch.randn(3, 6), dim=-1)
    detail = refiner.cache.read(text)
    expected = 0.5 * refiner.aggregator.linear(torch.cat([text, detail], dim=1)) + text
    assert torch.allclose(refiner.refine(text), expected, atol=1e-6)


def test_refine_per_image_text_features_equals_one_refine_per_image():
    """CoCoOp's E [B, C, d]: every image's classes read the cache and aggregate on their own."""
    torch.manual_seed(23)
    refiner = TextRefiner(dim=6, cache_size=4)
    text = F.normalize(torch.randn(3, 5, 6), dim=-1)
    refined = refiner.refine(text)
    assert refined.shape == (3, 5, 6)
    for b in range(3):
        assert torch.allclose(refined[b], refiner.refine(text[b]), atol=1e-6)


def test_update_writes_the_cache():
    torch.manual_seed(20)
    refiner = TextRefiner(dim=6, cache_size=4, momentum=0.7, write_rule="paper")
    tokens = torch.randn(2, 5, 6)
    expected = reference_write(refiner.cache.entries, tokens, 0.7, "paper")
    assert refiner.update(tokens) == 10
    assert torch.allclose(refiner.cache.entries.double(), expected, atol=1e-5)


# --------------------------------------------------------------------------------------------
# float16
# --------------------------------------------------------------------------------------------
def test_modules_run_in_float16_close_to_float32():
    torch.manual_seed(21)
    refiner32 = TextRefiner(dim=16, token_dim=12, cache_size=5).train()
    refiner16 = TextRefiner(dim=16, token_dim=12, cache_size=5).train()
    refiner16.load_state_dict(refiner32.state_dict())
    refiner16.to(torch.float16)
    assert refiner16.cache.entries.dtype == torch.float16
    text = F.normalize(torch.randn(4, 16), dim=-1)
    tokens = torch.randn(2, 6, 12)

    refined16 = refiner16.refine(text.half())
    aligned16 = refiner16.align(tokens.half())
    assert refined16.dtype == aligned16.dtype == torch.float16
    assert torch.allclose(refined16.float(), refiner32.refine(text), atol=1e-2)
    assert torch.allclose(aligned16.float(), refiner32.align(tokens), atol=3e-2)

    for _ in range(3):
        refiner16.update(refiner16.align(tokens.half()))
        refiner32.update(refiner32.align(tokens))
    entries = refiner16.cache.entries
    assert entries.dtype == torch.float16
    assert torch.allclose(entries.float().norm(dim=1), torch.ones(5), atol=2e-3)
    assert torch.allclose(entries.float(), refiner32.cache.entries, atol=1e-2)
