import torch


def pytest_configure(config):
    # Two cores, many small tensors: more threads only add contention.
    torch.set_num_threads(min(2, torch.get_num_threads()))
