"""The toy world: a pretrained 32×32 captioned-shapes pipeline, shipped in `pretrained/`, with its
learned reward models and an analytic judge — a model source like a hub id (`model.pretrained:
toy-world`).

    alignprop toy-world path | eval [DIR] | build DIR | build-rewards [DIR]

| module | holds |
|---|---|
| `scenes.py` | the world itself: caption grammar, train/held-out split, seeded scenes and their rendering |
| `judge.py` | the analytic judge (count, colour, background read off the pixels) and quality reports |
| `text.py` | the toy tokenizer and text encoder |
| `pretrain.py`, `schedule.py` | `alignprop toy-world build`: pretraining the VAE and UNet to a time budget |
| `reward_training.py` | `alignprop toy-world build-rewards`: training the learned count and colour rewards |
| `cli.py` | the `alignprop toy-world` subcommand |
"""

from .scenes import (BACKGROUNDS, COLOURS, COUNTS, GAP, HELDOUT_CAPTIONS, SHAPES, SHIPPED_DIR, SIZE, TRAIN_CAPTIONS,
                     Caption, Scene, all_captions, batch, parse_caption, prompt_colour, prompt_count, render,
                     sample_scene, shown_path, to_tensor, vocabulary, vocabulary_warning)

__all__ = ["BACKGROUNDS", "COLOURS", "COUNTS", "GAP", "HELDOUT_CAPTIONS", "SHAPES", "SHIPPED_DIR", "SIZE",
           "TRAIN_CAPTIONS", "Caption", "Scene", "all_captions", "batch", "parse_caption", "prompt_colour",
           "prompt_count", "render", "sample_scene", "shown_path", "to_tensor", "vocabulary", "vocabulary_warning"]
