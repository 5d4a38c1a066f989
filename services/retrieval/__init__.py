"""Retrieval: chunk, embed (through Triton) and index documents in Milvus (HNSW), per tenant; search them."""
