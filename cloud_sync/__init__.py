"""The cloud side of edgefn: the offload endpoint (Open Inference Protocol v2) and, later, the fleet server."""
