"""Wire formats shared by the device (edgefn) and the cloud side (cloud_sync): the one module both import."""
