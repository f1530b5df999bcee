"""Test setup: 4 fake CPU devices for the parallel tests (must be set before jax is imported)."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
