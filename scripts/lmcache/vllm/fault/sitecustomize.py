"""A negative control for shared_hit.sh: the kvgate CPU connector shim
(../sitecustomize.py), except that KV loaded from LMCache is damaged slightly
(values halved) before it reaches vLLM's cache. An instance started with this
directory on PYTHONPATH instead of the shim's must answer with different
logprobs than a cold run, which shows that the comparison shared_hit.sh makes
would notice KV that is loaded wrong.

  SHIM_B=scripts/lmcache/vllm/fault scripts/lmcache/vllm/shared_hit.sh   # expected to fail
"""
import importlib.util
import os
import sys

_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sitecustomize.py")
_spec = importlib.util.spec_from_file_location("kvgate_lmcache_shim", _path)
_shim = importlib.util.module_from_spec(_spec)
sys.modules["kvgate_lmcache_shim"] = _shim
_spec.loader.exec_module(_shim)
_make = _shim._make_connector_class


def _make_faulty():
    base = _make()

    class FaultyConnector(base):
        def to_gpu(self, memory_obj, start, end, **kwargs):
            memory_obj.tensor.mul_(0.5)
            super().to_gpu(memory_obj, start, end, **kwargs)

    _shim._log("FAULT INJECTION: loaded KV is halved")
    return FaultyConnector


_shim._make_connector_class = _make_faulty
