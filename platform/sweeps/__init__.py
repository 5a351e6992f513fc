"""Sweeps: `alignprop tune` (Ray Tune over Ray Train runs), its space files, the closing summary and
the sample-efficiency figure of comparison grids.

    alignprop tune --config tiny-cpu --space k_lr --num-samples 8
"""
