"""Per-tenant quotas: policy, limiter algorithms, reservations, stores behind one protocol."""
