"""Code shared by every mesh service: settings, server bootstrap, logging, deadlines, KServe tensors."""
