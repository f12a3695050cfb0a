"""In-path screening: detectors as pure batched functions, the fused device job, calibration and
the policy that turns scores into actions."""
