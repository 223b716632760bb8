"""Wire formats and vocabularies shared by the device (edgefn) and the cloud side (cloud_sync). They import
nothing of edgefn but `edgefn.errors`, so either side can use them without loading the other's machinery.

    fleet       the fleet protocol: device reports, desired state, bundles, rollouts (docs/fleet.md)
    fleet_text  the fleet's state in words, as the CLI and the fleet page show it
    oip         the Open Inference Protocol v2 REST wire format of the offload client and the endpoint
    offload     the offload policy values of a manifest and of `edgefn run --offload`
"""
