"""Throughput: model-level train/inference TFLOPS and MFU (bench/model.py), MoE-layer micro-benchmark
against a dense equal-active FFN and HF transformers' Mixtral block (bench/layer.py)."""
