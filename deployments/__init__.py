"""Ray Serve deployments of the model catalog (vLLM replicas, the gateway as ingress)."""
