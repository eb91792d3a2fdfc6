"""The float operations PromptSRC's and PromptKD's codebases compute in an order of their own,
checked here bit for bit without the codebases (tests/test_codebase_runs.py runs them where
TEXTREFINER_CODEBASES names them): the logit scale before the product, one normalisation of the
image features, PromptSRC's template mean of the stack and its loss summed in its codebase's
order, PromptKD's projector as 1x1 convolutions. Each test also shows that its input tells the
two orders apart, so that it fails if the order changes back."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from test_promptsrc import build, perturb
from textrefiner.clip_backbone import ImageOutput, encode_text, load_clip, tokenize
from textrefiner.methods.base import image_text_logits
from textrefiner.methods.promptkd import ConvProjector
from textrefiner.methods.promptsrc import self_consistency_kl
from textrefiner.methods.templates import IMAGENET_TEMPLATES


@pytest.fixture(scope="module")
def base_clip(clip_path):
    return load_clip(clip_path, "fp32")


def unit_rows(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("per_image", [False, True], ids=["shared", "per-image"])
def test_logit_scale_multiplies_the_features_before_the_product(per_image):
    """`logit_scale * image_features @ text_features.t()`, as the codebases write it."""
    features = unit_rows(8, 512, seed=1)
    classifier = unit_rows(*((8,) if per_image else ()), 10, 512, seed=2)
    scale = torch.tensor(4.6052).exp()
    product = torch.einsum("bd,bcd->bc", scale * features, classifier) if per_image \
        else scale * features @ classifier.t()
    assert torch.equal(image_text_logits(features, classifier, scale), product)
    assert not torch.equal(scale * image_text_logits(features, classifier), product)


def codebase_projector(ours):
    """PromptKD's Feature_Trans_Module_two_layer (Conv2d 1x1, BatchNorm2d, ReLU, Conv2d 1x1 over
    [B, d, 1, 1]) holding `ours`'s weights."""
    fc1, fc2 = ours.fc1, ours.fc2
    convs = nn.Sequential(nn.Conv2d(fc1.in_features, fc1.out_features, 1),
                          nn.BatchNorm2d(fc1.out_features), nn.ReLU(inplace=True),
                          nn.Conv2d(fc2.in_features, fc2.out_features, 1))
    with torch.no_grad():
        for conv, linear in ((convs[0], fc1), (convs[3], fc2)):
            conv.weight.copy_(linear.weight[:, :, None, None])
            conv.bias.copy_(linear.bias)
    return convs


def test_promptkd_projector_computes_as_its_codebase():
    """Output, input gradient, weight gradients and BatchNorm statistics equal to the bit;
    `nn.Linear`s round otherwise."""
    torch.manual_seed(0)
    ours = ConvProjector(512, 768).train()
    theirs = codebase_projector(ours).train()
    features = 3 * torch.randn(16, 512, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(16, 768, generator=torch.Generator().manual_seed(4))
    inputs = [features.clone().requires_grad_() for _ in range(2)]
    ours_out = ours(inputs[0])
    theirs_out = theirs(inputs[1][:, :, None, None]).squeeze(-1).squeeze(-1)
    assert torch.equal(ours_out, theirs_out)
    (ours_out * weights).sum().backward()
    (theirs_out * weights).sum().backward()
    assert torch.equal(inputs[0].grad, inputs[1].grad)
    assert torch.equal(ours.fc1.weight.grad, theirs[0].weight.grad.flatten(1))
    assert torch.equal(ours.fc2.weight.grad, theirs[3].weight.grad.flatten(1))
    assert torch.equal(ours.norm.running_mean, theirs[1].running_mean)
    assert torch.equal(ours.norm.running_var, theirs[1].running_var)
    assert not torch.equal(ours.fc1(features), theirs[0](features[:, :, None, None]).flatten(1))


def test_promptsrc_fixed_embeddings_are_the_mean_of_the_template_stack(base_clip):
    """The codebase's `torch.cat(per-template features [C, 1, d], 1).mean(1)`, not a running
    sum over the 60 templates."""
    model = build(base_clip)
    names = [name.replace("_", " ") for name in model.classnames]
    with torch.no_grad():
        per_template = []
        for template in IMAGENET_TEMPLATES:
            tokens = tokenize([template.format(name) for name in names], "cpu")
            per_template.append(encode_text(model.text_encoder, model.token_embedding(tokens),
                                            tokens.argmax(dim=-1)))
        stacked = torch.cat([f.unsqueeze(1) for f in per_template], dim=1).mean(dim=1)
        running = sum(per_template) / len(per_template)
    assert torch.equal(model.zero_shot_text_features(), F.normalize(stacked, dim=-1))
    assert not torch.equal(stacked, running)


@pytest.fixture
def trained_model(base_clip):
    """A PromptSRC model at non-initial prompts, with its codebase's loss weights."""
    model = build(base_clip, "TRAINER.PROMPTSRC.TEXT_LOSS_WEIGHT", "25",
                  "TRAINER.PROMPTSRC.IMAGE_LOSS_WEIGHT", "10")
    perturb(model)
    return model.train()


def leaf_batch(model, seed):
    """A batch, and the model's image encoder made to return its features for that batch as a
    leaf tensor (so the test reads their gradient): (images, labels, leaf)."""
    gen = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(5, (4,), generator=gen)
    with torch.no_grad():
        leaf = type(model).encode_images(model, images).features.clone().requires_grad_()
    model.encode_images = lambda images, return_tokens=False: ImageOutput(leaf, None, None)
    return images, labels, leaf


def codebase_losses(model, images, labels, features, normalisations=1):
    """PromptSRC's codebase loss (CustomCLIP.forward, then the trainer's forward_backward) from
    un-normalised image features, its parts in its order; with normalisations=2 the L1 term reads a
    second normalisation of the features."""
    with torch.no_grad():
        text = model.text_features()
        fixed = model.zero_shot_text_features()
        zs_features = model.zero_shot_image_features(images)
    scale = model.logit_scale.exp()
    image_ft = F.normalize(features, dim=-1)
    logits = scale * image_ft @ text.t()
    zero_shot_logits = scale * zs_features @ fixed.t()
    loss_ce = F.cross_entropy(logits, labels)
    l1_features = image_ft if normalisations == 1 else F.normalize(features, dim=-1)
    loss_scl_text = F.l1_loss(text, fixed) * model.text_weight
    loss_scl_image = F.l1_loss(l1_features, zs_features) * model.image_weight
    kl = self_consistency_kl(logits, zero_shot_logits)
    return loss_ce, kl, loss_scl_text, loss_scl_image


def test_promptsrc_loss_is_summed_in_its_codebase_order(trained_model):
    """On every batch; the batches tell the orders apart (on one at least: a sum of four scalars
    may round alike in both orders)."""
    reordered_alike = []
    for seed in range(64):
        images, labels, leaf = leaf_batch(trained_model, seed)
        loss, _ = trained_model.forward_train(images, labels)
        ce, kl, text, image = codebase_losses(trained_model, images, labels, leaf)
        assert torch.equal(loss, ce + (kl + text + image))
        reordered_alike.append(torch.equal(ce + kl + text + image, loss))
    assert not all(reordered_alike)


def test_promptsrc_normalises_the_image_features_once(trained_model):
    """The classification and L1 terms read one normalisation, whose backward then runs once on
    the summed gradient, as in the codebase; two normalisations round the gradient otherwise."""
    images, labels, leaf = leaf_batch(trained_model, 0)
    loss, _ = trained_model.forward_train(images, labels)
    ours = torch.autograd.grad(loss, leaf)[0]
    grads = []
    for normalisations in (1, 2):
        ce, kl, text, image = codebase_losses(trained_model, images, labels, leaf, normalisations)
        grads.append(torch.autograd.grad(ce + (kl + text + image), leaf)[0])
    assert torch.equal(ours, grads[0])
    assert not torch.equal(grads[0], grads[1])
