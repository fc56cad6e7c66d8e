"""Benchmarks behind ``peer bench``: the layer (``layer``) and full training steps (``train``)."""
