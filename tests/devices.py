"""Where the reference tests run, and how close a fast path must come to the plain-hook reference there.

By default every model a test builds stays on the CPU (wrap() never moves a module), so the suite gives the same
answers on a machine with a GPU as on one without. To run the reference tests on the GPU on purpose:

    SAFETY_HEADS_TEST_DEVICE=cuda python -m pytest -q tests/test_engine.py

families.py then builds every family on that device, and the numeric tests that load a model by name ask for it there
(in float32: the reference comparisons are float32 ones).
"""

from __future__ import annotations

import os

import torch

TEST_DEVICE = os.environ.get("SAFETY_HEADS_TEST_DEVICE", "cpu")

# Largest relative difference (max |fast - reference| / max |reference|) allowed between a fast path and the reference,
# or between two fast paths, per device type and dtype. Float32 on the CPU: the project's standard (measured errors are
# a few 1e-7). Float32 on a GPU: other kernels, other summation orders; the H200 measured 3.2e-6 against plain hooks and
# 1.2e-5 absolute between two batchings of the same rows (../shared/reference/gpu-h200.md), so 5e-5.
RELATIVE = {
    ("cpu", torch.float32): 1e-5,
    ("cuda", torch.float32): 5e-5,
}


# Every ablation an engine test compares must move the logits by at least this much (relative), so that a wrong head
# could not pass: 100 times the CPU tolerance, 20 times the GPU one. It is a property of the test models and prompts,
# not of the device (the H200 measured 1.7e-3 as the smallest effect in test_ablated_token_log_probs_match_reference).
MIN_EFFECT = 1e-3


def device_type(device: str | torch.device = TEST_DEVICE) -> str:
    return torch.device(device).type


def relative_tolerance(device: str | torch.device = TEST_DEVICE, dtype: torch.dtype = torch.float32) -> float:
    key = (device_type(device), dtype)
    if key not in RELATIVE:
        raise KeyError(f"no tolerance for {dtype} on {key[0]}: measure one and add it to tests/devices.py RELATIVE")
    return RELATIVE[key]


def close(device: str | torch.device = TEST_DEVICE, dtype: torch.dtype = torch.float32) -> dict:
    """rtol and atol for torch.testing.assert_close between two fast paths on `device`."""
    tolerance = relative_tolerance(device, dtype)
    return dict(rtol=tolerance, atol=tolerance)


def model_config(**settings):
    """A ModelConfig for a numeric test of a model loaded by name: on the test device, in float32 (not "auto", which
    on a GPU means bfloat16 and would hold the comparison to a looser standard than the test states)."""
    from safety_heads.models import ModelConfig

    return ModelConfig(device=TEST_DEVICE, dtype="float32", **settings)


# The same for a test that runs the command line.
DEVICE_FLAGS = ["--device", TEST_DEVICE, "--dtype", "float32"]
