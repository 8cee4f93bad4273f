"""CUDA graphs without CUDA, for the engine's graph path on the CPU:

    monkeypatch.setattr(ModelRunner, "_record", eager_record)

then every "capture" returns a graph whose replay runs the recorded forward again on the static
inputs and copies its results into the static outputs, as a real replay rewrites them. Everything
but CUDA's recording is checked that way (tests/test_devices.py checks real graphs on a GPU).
"""

import types


def eager_record(runner, run):
    """ModelRunner._record without CUDA: (a graph whose replay reruns `run`, run's outputs)."""
    outputs = run()

    def replay():
        fresh = run()
        for static, new in zip(outputs, fresh) if isinstance(outputs, tuple) else [(outputs, fresh)]:
            static.copy_(new)

    return types.SimpleNamespace(replay=replay), outputs
