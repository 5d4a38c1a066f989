"""The gateway: the one public entry (behind Envoy): auth, validation, deadlines, orchestration."""
