"""The object-count reward on real transformers OWL-ViT / OWLv2 detectors with random weights (CPU, offline)."""

import time

import pytest
import torch
from transformers import CLIPConfig, Owlv2Config, Owlv2ForObjectDetection, OwlViTConfig, OwlViTForObjectDetection

from alignprop.platform.models import build_tiny_tokenizer
from alignprop.rewards.object_count import (ObjectCount, detection_preprocess, parse_count_prompt, singularise,
                                            soft_count)

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)
MAX_TOKENS = 32  # the byte-level tiny tokenizer spends one token per character


def tiny_text(tokenizer):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=len(tokenizer), max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def save_detector(directory, config_cls, model_cls, **config):
    """A random-weight detector and the tiny tokenizer saved side by side, as a hub checkpoint is."""
    tokenizer = build_tiny_tokenizer(MAX_TOKENS)
    torch.manual_seed(0)
    # projection_dim must equal the text hidden size: the class head compares the two.
    model = model_cls(config_cls(text_config=tiny_text(tokenizer), vision_config=TINY_VISION, projection_dim=32,
                                 **config))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def owlvit_dir(tmp_path_factory):
    return save_detector(tmp_path_factory.mktemp("owlvit"), OwlViTConfig, OwlViTForObjectDetection)


def load(model_dir, **options):
    # Random weights put every box near p = 0.5: a soft step there keeps gradients alive.
    options = {"threshold": 0.5, "temperature": 4.0, **options}
    return ObjectCount(model=model_dir, local_files_only=True, **options).freeze()


def images(batch=3, h=40, w=48, grad=False):
    torch.manual_seed(2)
    return torch.rand(batch, 3, h, w).requires_grad_(grad)


PROMPTS = ["three apples", "a photo of 2 dogs", "one cat on a sofa"]


@pytest.mark.parametrize("prompt, expected", [
    ("three apples", (3, "apple")),
    ("3 red apples", (3, "red apple")),
    ("a photo of two dogs", (2, "dog")),
    ("one cat", (1, "cat")),
    ("Five Cherries on a plate", (5, "cherry")),
    ("a painting of 12 boxes, oil on canvas", (12, "box")),
    ("two sleeping cats in the sun", (2, "sleeping cat")),
    ("four people walking on a beach", (4, "person")),
    ("seven knives and a fork", (7, "knife")),
    ("ten glasses of wine", (10, "glass")),
    ("eleven buses parked", (11, "bus")),
    ("two shoes", (2, "shoe")),
    ("3 apple trees covered in snow", (3, "apple tree")),
    ("one canvas bag", (1, "canvas bag")),
    ("one of the birds", (None, None)),  # a number with no object after it is not a count
    ("a photo of a cat", (None, None)),
    ("someone bought apples", (None, None)),
])
def test_prompt_parser(prompt, expected):
    assert parse_count_prompt(prompt) == expected


def test_singularise():
    pairs = {"apples": "apple", "dogs": "dog", "cherries": "cherry", "benches": "bench", "dishes": "dish",
             "foxes": "fox", "glasses": "glass", "mice": "mouse", "children": "child", "sheep": "sheep",
             "cactus": "cactus", "cat": "cat", "tomatoes": "tomato", "leaves": "leaf"}
    assert {w: singularise(w) for w in pairs} == pairs


def test_soft_count_step_and_nms():
    box = torch.tensor([0.5, 0.5, 0.2, 0.2])
    far = torch.tensor([0.1, 0.1, 0.1, 0.1])
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.85, 0.0], [0.9, 0.85, 0.01]])
    boxes = torch.stack([torch.stack([box, box, far]), torch.stack([box, box * 1.01, far]),
                         torch.stack([box, far, far])])
    plain = soft_count(probs, boxes, threshold=0.1, temperature=100.0)
    nms = soft_count(probs, boxes, threshold=0.1, temperature=100.0, nms_iou=0.3)
    torch.testing.assert_close(plain[0], torch.tensor(1.0))  # step(1) = 1, step(0) = 0 exactly
    assert abs(plain[1] - 2) < 1e-3 and abs(nms[1] - 1) < 1e-3  # a duplicate box counts once under NMS
    assert abs(nms[2] - 2) < 1e-3  # separate boxes both count
    many = soft_count(torch.full((1, 3600), 1e-3), None, threshold=0.1, temperature=100.0)
    assert many.item() < 0.05  # thousands of background boxes add ~nothing


@pytest.mark.parametrize("owlv2", [False, True])
def test_preprocessing_matches_the_image_processors(owlv2):
    """Against transformers' PIL OWL-ViT / OWLv2 processors (square resize; OWLv2 pads first)."""
    import numpy as np
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil
    from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil

    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8), size=(96, 128), mode="bilinear")
    pixels = (smooth[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    processor = (Owlv2ImageProcessorPil if owlv2 else OwlViTImageProcessorPil)(size={"height": 64, "width": 64})
    expected = torch.tensor(np.array(processor(images=pixels, return_tensors="np")["pixel_values"]))
    ours = detection_preprocess(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255, 64, owlv2)
    assert ours.shape == expected.shape == (1, 3, 64, 64)
    assert (ours - expected).abs().max() < 0.05 and (ours - expected).abs().mean() < 0.01


def test_scores_are_differentiable_wrt_pixels_only(owlvit_dir):
    reward = load(owlvit_dir)
    assert isinstance(reward.detector, OwlViTForObjectDetection) and not reward.owlv2
    assert not reward.training and not reward.detector.training
    assert len(reward.tokenizer) == reward.detector.config.text_config.vocab_size
    x = images(grad=True)
    scores = reward(x, PROMPTS)
    assert scores.shape == (3,) and (scores <= 0).all()
    scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters())


def test_batch_equals_per_image(owlvit_dir):
    reward = load(owlvit_dir)
    x = images()
    with torch.no_grad():
        batch = reward(x, PROMPTS)
        single = torch.cat([reward(x[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)


def test_target_and_object_from_prompt_or_options(owlvit_dir):
    reward = load(owlvit_dir)
    assert reward.queries(PROMPTS) == ([3, 2, 1], ["a photo of an apple", "a photo of a dog", "a photo of a cat"])
    x = images()
    with torch.no_grad():
        counts = soft_count(*reward.detect(x, reward.queries(PROMPTS)[1]), 0.5, 4.0, 0.3)
        torch.testing.assert_close(reward(x, PROMPTS), -(counts - torch.tensor([3.0, 2.0, 1.0])).abs())
        targeted = load(owlvit_dir, target=5)
        assert targeted.queries(PROMPTS)[0] == [5, 5, 5]
        torch.testing.assert_close(targeted(x, PROMPTS), -(counts - 5).abs())
        fixed = load(owlvit_dir, target=2, object="banana")
        assert fixed.queries(["a still life", "a photo of a cat"]) == ([2, 2], ["a photo of a banana"] * 2)
        bananas = soft_count(*reward.detect(x, ["a photo of a banana"] * 3), 0.5, 4.0, 0.3)
        torch.testing.assert_close(fixed(x, PROMPTS), -(bananas - 2).abs())


def test_no_count_is_a_clear_error(owlvit_dir):
    reward = load(owlvit_dir)
    with pytest.raises(ValueError) as err:
        reward(images(batch=2), ["three apples", "a photo of a cat"])
    message = str(err.value)
    assert "a photo of a cat" in message and "`target`" in message and '"three apples"' in message
    assert "\n" not in message
    with pytest.raises(ValueError, match="an object"):  # a target alone does not say what to count
        load(owlvit_dir, target=2)(images(batch=1), ["a still life"])


def test_owlv2_checkpoint_picks_owlv2(tmp_path):
    model_dir = save_detector(tmp_path, Owlv2Config, Owlv2ForObjectDetection)
    reward = load(model_dir)
    assert isinstance(reward.detector, Owlv2ForObjectDetection) and reward.owlv2
    x = images(batch=2, h=24, w=40, grad=True)  # non-square: padded to a square first, as OWLv2 does
    scores = reward(x, PROMPTS[:2])
    assert scores.shape == (2,)
    scores.sum().backward()
    assert x.grad.abs().sum() > 0


def test_other_checkpoints_are_refused(tmp_path):
    CLIPConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="OWL-ViT or OWLv2"):
        ObjectCount(model=str(tmp_path), local_files_only=True)


def test_full_size_owlvit_base_patch32_forward_backward(tmp_path):
    """google/owlvit-base-patch32's real shapes (OwlViTConfig defaults, random weights), one 512×512 image."""
    config = OwlViTConfig()
    vision, text = config.vision_config, config.text_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (768, 32, 768, 12)
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size, text.max_position_embeddings) == \
        (512, 12, 49408, 16)
    tokenizer = build_tiny_tokenizer(16)  # byte-level: ids < 514 fit the 49408-token vocabulary
    torch.manual_seed(0)
    OwlViTForObjectDetection(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    start = time.perf_counter()
    reward = ObjectCount(model=str(tmp_path), local_files_only=True).freeze()
    loaded = time.perf_counter()
    x = images(batch=1, h=512, w=512, grad=True)
    reward(x, ["two dogs"]).sum().backward()
    done = time.perf_counter()
    print(f"\nOWL-ViT B/32 object_count: load {loaded - start:.1f} s, "
          f"forward+backward (1×512²) {done - loaded:.1f} s, |grad| sum {x.grad.abs().sum().item():.3g}")
    assert x.grad is not None and torch.isfinite(x.grad).all()
