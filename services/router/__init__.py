"""The router: model registry → pool → least-outstanding ready Triton replica."""
