"""TextRefiner's losses against hand-computed numbers."""
import math

import pytest
import torch
import torch.nn.functional as F

from textrefiner.losses import (kd_loss, regularization_loss, select_semantic_tokens,
                                semantic_kd_loss, semantic_loss)


def log_softmax_rows(logits):
    """Row-wise log-softmax written out with math, on a list of lists."""
    out = []
    for row in logits:
        top = max(row)
        log_z = top + math.log(sum(math.exp(v - top) for v in row))
        out.append([v - log_z for v in row])
    return out


def hand_cross_entropy(logits, labels):
    logp = log_softmax_rows(logits.double().tolist())
    return -sum(row[y] for row, y in zip(logp, labels)) / len(labels)


def hand_kd(student, teacher, t):
    log_s = log_softmax_rows((student.double() / t).tolist())
    log_t = log_softmax_rows((teacher.double() / t).tolist())
    total = sum(math.exp(lt) * (lt - ls)
                for row_s, row_t in zip(log_s, log_t) for ls, lt in zip(row_s, row_t))
    return total * t * t / student.numel()


# --------------------------------------------------------------------------------------------
# regularization_loss
# --------------------------------------------------------------------------------------------
def test_regularization_loss_on_a_hand_made_example():
    refined = torch.tensor([[3.0, 4.0], [0.0, -2.0]])   # normalised: [.6, .8], [0, -1]
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = (0.4 + 0.8 + 0.0 + 2.0) / 4
    assert regularization_loss(refined, text).item() == pytest.approx(expected, abs=1e-6)


def test_regularization_loss_equals_mean_abs_difference():
    torch.manual_seed(0)
    refined, text = torch.randn(5, 7) * 3, F.normalize(torch.randn(5, 7), dim=-1)
    expected = (F.normalize(refined, dim=-1) - text).abs().mean()
    assert torch.allclose(regularization_loss(refined, text), expected, atol=1e-7)
    assert regularization_loss(text * 4, text).item() == pytest.approx(0.0, abs=1e-6)


def test_regularization_loss_gradient_reaches_refined_only():
    torch.manual_seed(1)
    refined = torch.randn(3, 4, requires_grad=True)
    regularization_loss(refined, F.normalize(torch.randn(3, 4), dim=-1)).backward()
    assert refined.grad is not None and refined.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# select_semantic_tokens
# --------------------------------------------------------------------------------------------
def test_select_semantic_tokens_on_a_hand_made_example():
    # image b, token t holds [10 * b + t, -t]; token 0 is CLS, tokens 1..4 are patches
    tokens = torch.tensor([[[10.0 * b + t, -float(t)] for t in range(5)] for b in range(2)])
    attention = torch.tensor([[0.10, 0.40, 0.05, 0.30],
                              [0.50, 0.02, 0.03, 0.20]])
    out = select_semantic_tokens(tokens, attention, k=2)
    assert out.shape == (2, 4, 2)
    expected = torch.tensor([
        [[0.0, 0.0], [2.0, -2.0], [4.0, -4.0], [2.0, -2.0]],      # CLS, patch 2, patch 4, mean
        [[10.0, 0.0], [11.0, -1.0], [14.0, -4.0], [12.0, -2.0]],  # CLS, patch 1, patch 4, mean
    ])
    assert torch.equal(out, expected)


def test_select_semantic_tokens_order_and_size():
    torch.manual_seed(2)
    tokens = torch.randn(3, 10, 6)
    attention = torch.rand(3, 9)
    out = select_semantic_tokens(tokens, attention)          # k = 5 by default
    assert out.shape == (3, 7, 6)
    for b in range(3):
        order = sorted(range(9), key=lambda n: -float(attention[b, n]))[:5]
        assert torch.equal(out[b, 0], tokens[b, 0])
        for slot, n in enumerate(order, start=1):
            assert torch.equal(out[b, slot], tokens[b, n + 1])
        assert torch.allclose(out[b, 6], tokens[b].mean(dim=0), atol=1e-6)


def test_select_semantic_tokens_k_equal_to_patches_and_too_large():
    tokens, attention = torch.randn(1, 4, 2), torch.tensor([[0.2, 0.5, 0.1]])
    assert select_semantic_tokens(tokens, attention, k=3).shape == (1, 5, 2)
    with pytest.raises(ValueError, match="4"):
        select_semantic_tokens(tokens, attention, k=4)


# --------------------------------------------------------------------------------------------
# semantic_loss (CE form)
# --------------------------------------------------------------------------------------------
def test_semantic_loss_on_a_hand_made_example():
    sem = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],
                        [[0.5, 0.5], [-1.0, 0.0]]])          # B=2, K=2
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([2, 0])
    scale = 10.0
    rows = [[10.0, 0.0, 6.0], [0.0, 10.0, 8.0], [5.0, 5.0, 7.0], [-10.0, 0.0, -6.0]]
    targets = [2, 2, 0, 0]
    expected = -sum(r[y] - math.log(sum(math.exp(v) for v in r)) for r, y in zip(rows, targets)) / 4
    assert semantic_loss(sem, text, labels, scale).item() == pytest.approx(expected, rel=1e-5)


def test_semantic_loss_equals_cross_entropy_with_interleaved_labels():
    torch.manual_seed(3)
    sem = torch.randn(3, 7, 8)
    text = F.normalize(torch.randn(5, 8), dim=-1)
    labels = torch.tensor([4, 0, 2])
    scale = torch.tensor(100.0).log().exp()
    logits = scale * sem.reshape(21, 8) @ text.t()
    expected = hand_cross_entropy(logits, [4] * 7 + [0] * 7 + [2] * 7)
    got = semantic_loss(sem, text, labels, scale)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_semantic_loss_with_per_image_text_features():
    """CoCoOp: image b's K vectors against its own E_b [C, d]; rows in the same order as the
    shared form, so the loss is the mean of the per-image losses."""
    torch.manual_seed(5)
    sem = torch.randn(3, 7, 8)
    text = F.normalize(torch.randn(3, 5, 8), dim=-1)   # [B, C, d]
    labels = torch.tensor([4, 0, 2])
    scale = 20.0
    rows = torch.cat([scale * sem[b] @ text[b].t() for b in range(3)])
    expected = hand_cross_entropy(rows, [4] * 7 + [0] * 7 + [2] * 7)
    assert semantic_loss(sem, text, labels, scale).item() == pytest.approx(expected, rel=1e-5)
    same = text[:1].expand(3, -1, -1)  # one E for every image: the shared form's value
    assert torch.allclose(semantic_loss(sem, same, labels, scale),
                          semantic_loss(sem, text[0], labels, scale), atol=1e-6)
    teacher = torch.randn(3, 5)
    expected_kd = hand_kd(rows, teacher.repeat_interleave(7, dim=0), 2.0)
    assert semantic_kd_loss(sem, text, teacher, scale, 2.0).item() == pytest.approx(expected_kd,
                                                                                  rel=1e-5)


def test_regularization_loss_with_per_image_text_features():
    torch.manual_seed(6)
    refined, text = torch.randn(2, 4, 3), F.normalize(torch.randn(2, 4, 3), dim=-1)
    per_image = [regularization_loss(refined[b], text[b]) for b in range(2)]
    # float32 means summed in another order (ATen's scalar kernels): a few ulps of 0.53 apart
    assert regularization_loss(refined, text).item() == pytest.approx(
        float(sum(per_image)) / 2, rel=1e-6)


# --------------------------------------------------------------------------------------------
# kd_loss and semantic_kd_loss
# --------------------------------------------------------------------------------------------
def test_kd_loss_on_a_hand_made_example():
    student = torch.tensor([[2.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0]])
    # T = 2: student probs softmax([1, 0]), teacher probs softmax([0, 1])
    e = math.e
    ps, pt = [e / (e + 1), 1 / (e + 1)], [1 / (e + 1), e / (e + 1)]
    kl = sum(q * math.log(q / p) for p, q in zip(ps, pt))
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(kl * 4 / 2, rel=1e-5)


@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_kd_loss_equals_scaled_kl_sum(t):
    torch.manual_seed(4)
    student, teacher = torch.randn(4, 6) * 3, torch.randn(4, 6) * 3
    assert kd_loss(student, teacher, t).item() == pytest.approx(hand_kd(student, teacher, t),
                                                               rel=1e-5)


def test_kd_loss_default_temperature_is_one_and_zero_for_equal_logits():
    torch.manual_seed(5)
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    assert kd_loss(student, teacher).item() == pytest.approx(hand_kd(student, teacher, 1.0),
                                                            rel=1e-5)
    assert kd_loss(student, student.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_gradient_reaches_student_only():
    torch.manual_seed(6)
    student = torch.randn(2, 3, requires_grad=True)
    teacher = torch.randn(2, 3, requires_grad=True)
    kd_loss(student, teacher.detach()).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_semantic_kd_loss_equals_kd_against_repeated_teacher(t):
    torch.manual_seed(7)
    sem = torch.randn(3, 7, 8)
    text = F.normalize(torch.randn(5, 8), dim=-1)
    teacher = torch.randn(3, 5) * 4
    scale = 20.0
    student_logits = scale * sem.reshape(21, 8) @ text.t()
    repeated = torch.stack([teacher[b] for b in range(3) for _ in range(7)])
    expected = hand_kd(student_logits, repeated, t)
    got = semantic_kd_loss(sem, text, teacher, scale, temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------
# float16
# --------------------------------------------------------------------------------------------
def test_losses_run_in_float16_close_to_float32():
    torch.manual_seed(8)
    refined = torch.randn(5, 8)
    text = F.normalize(torch.randn(5, 8), dim=-1)
    tokens, attention = torch.randn(2, 10, 8) * 0.2, torch.rand(2, 9)
    labels = torch.tensor([1, 3])
    teacher = torch.randn(2, 5) * 3
    student = torch.randn(2, 5) * 3

    def all_losses(dtype):
        sem = select_semantic_tokens(tokens.to(dtype), attention.to(dtype), k=5)
        return [
            regularization_loss(refined.to(dtype), text.to(dtype)),
            semantic_loss(sem, text.to(dtype), labels, 10.0),
            kd_loss(student.to(dtype), teacher.to(dtype), 2.0),
            semantic_kd_loss(sem, text.to(dtype), teacher.to(dtype), 10.0, 2.0),
        ]

    for half, full in zip(all_losses(torch.float16), all_losses(torch.float32)):
        assert half.dtype == torch.float16
        assert torch.isfinite(half)
        assert half.float().item() == pytest.approx(full.item(), rel=2e-2, abs=2e-3)
