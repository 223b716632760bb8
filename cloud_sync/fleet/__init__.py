"""The cloud side of fleet rollout: devices, bundles (a TUF repository), rollouts and their engine, the fleet page."""
