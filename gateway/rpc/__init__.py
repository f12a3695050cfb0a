"""KServe v2 gRPC (Triton's ``inference.GRPCInferenceService``) over the same data plane as HTTP."""
