"""Model soups of trained LoRA adapters: `alignprop soup` (mix.py) and its α scan with scores logged to
MLflow (`alignprop soup --sweep`, alpha_scan.py).

    alignprop soup --lora A --lora B --weights 0.7 0.3 --out DIR
"""

from .mix import is_base, lora_weights_file, soup

__all__ = ["is_base", "lora_weights_file", "soup"]
