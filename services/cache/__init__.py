"""The cache service: exact responses and embeddings in Redis, a semantic index of prompts in Milvus."""
