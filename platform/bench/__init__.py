"""Speed and memory: `alignprop bench` (steps.py: real recipe steps timed per phase, FLOPs, MFU, peak
memory) and `make gpu-check` (gpu_check.py: the GPU tests + the SD1.5-size grid, one table).

    alignprop bench --config tiny-cpu --json
"""
