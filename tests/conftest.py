"""Test settings shared by every test: offline, deterministic, two threads."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(__file__))  # the slow twins in tests/ import as plain modules

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
