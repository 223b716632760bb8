"""The device side of fleet rollout: fetch and verify releases (TUF), activate them atomically, check, roll back, report."""
