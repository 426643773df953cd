"""A CPU model actor for ndif 0.1.2, imported by the Ray workers of `scripts/ndif-local` (NDIF_DEFAULT_MODEL_ACTOR_CLASS).

ndif's stock actor loads weights onto a CUDA device and synchronises CUDA when it cleans up after a request; this one
loads them on the CPU and leaves CUDA alone. Everything else (request execution, the kill switch, result upload) is
ndif's own BaseModelDeployment, so requests run exactly as on NDIF.
"""

import gc
import logging

import ray
from ndif.services.ray.deployments.modeling.base import BaseModelDeployment
from nnsight.modeling.huggingface import HuggingFaceModel

logger = logging.getLogger("ndif")


class CPUModelDeployment(BaseModelDeployment):
    CACHEABLE = False  # nothing to park: the weights already live in host memory

    def load_from_disk(self) -> HuggingFaceModel:
        self.gpu_mem_bytes_by_id = {}  # the controller booked the fake GPU Ray advertises; no device memory is used
        # The attention implementation is the client's: nnsight sends it with every request and the server switches.
        model = HuggingFaceModel.from_model_key(self.model_key, dispatch=True, dtype=self.dtype_name, device="cpu",
                                                **self.kwargs)
        model._module.requires_grad_(False)
        logger.info(f"Loaded {self.model_key} on the CPU")
        return model

    def cleanup(self) -> None:  # the stock version calls torch.cuda.synchronize()
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


CPUModelActor = ray.remote(num_cpus=1, max_restarts=-1)(CPUModelDeployment)
